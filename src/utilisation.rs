//! How busy each PE is during the slowest layer of a step: the data of the sweep's utilisation
//! heatmap.
//!
//! The slowest layer is the block whose kernel runs take the most cycles. Its heatmap covers
//! the layer's weight-streamed kernel runs (six matrices, three phases each: where the sparsity
//! acts and where the load imbalance shows):
//!
//! - exact: those runs are run again on the simulator with the step's masks and the busy cycles
//!   of every PE are read from the engine's statistics (cycles do not depend on the values, so
//!   the runs are fed zeros and ones);
//! - fast: the per-PE model of the cost formulas (`busy_per_column` of each kernel): the tasks
//!   of PE column `c` on its slowest row (product) or first row (gradient): the per-entry tasks
//!   of its kept entries and the per-chunk tasks, given to every row of the column.
//!
//! A step of several passes runs the same kernels once per pass; the heatmap is the first
//! pass's (the others but a shorter last one are the same), on that pass's region and tokens
//! and with the SRAM the resident activations leave, as the runtime runs it.
//!
//! What this is not: the step's whole utilisation (attention and the other dense kernels are
//! not in it).

use wafersim_kernels::{
    ColumnCounts, KernelError, MatmulShape, StreamMatmul, StreamedMatrix, WeightGrad,
    WeightGradShape,
};
use wafersim_sim::{Coord, RunOptions, Stats};

use wafersim_sim::FabricConfig;

use crate::compile::StepPlan;
use crate::runtime::{Fidelity, StepCost};
use crate::sparsity::Mask;

/// Busy cycles per PE of one layer's weight-streamed kernel runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Heatmap {
    pub layer: usize,
    pub sparsity: f64,
    pub fidelity: Fidelity,
    /// Region columns and rows.
    pub cols: u32,
    pub rows: u32,
    /// Busy cycles per PE, row-major (`r * cols + c`).
    pub busy: Vec<u64>,
    /// Cycles of the runs covered (their sum).
    pub cycles: u64,
    /// Kernel runs covered.
    pub runs: usize,
}

impl Heatmap {
    /// Busy cycles of PE `(c, r)` over the runs' cycles, in `[0, 1]` (0 outside the region).
    pub fn utilisation(&self, c: u32, r: u32) -> f64 {
        if c >= self.cols || self.cycles == 0 {
            return 0.0;
        }
        let i = r as usize * self.cols as usize + c as usize;
        self.busy
            .get(i)
            .map_or(0.0, |&b| b as f64 / self.cycles as f64)
    }

    /// The mean over the region's PEs.
    pub fn mean(&self) -> f64 {
        let pes = self.busy.len().max(1) as f64;
        self.busy.iter().map(|&b| b as f64).sum::<f64>() / pes / self.cycles.max(1) as f64
    }
}

/// The block whose kernel runs take the most cycles in `cost` (the first of equals).
pub fn slowest_layer(cost: &StepCost) -> Option<usize> {
    let layers = cost.records.iter().filter_map(|r| r.op.layer).max()? + 1;
    let mut cycles = vec![0u64; layers];
    for r in &cost.records {
        if let Some(l) = r.op.layer {
            cycles[l] += r.cycles;
        }
    }
    (0..layers).rev().max_by_key(|&l| cycles[l])
}

/// One block's weight-streamed kernels as a step ran them.
pub struct LayerKernels<'a> {
    pub layer: usize,
    /// The block's six masks (in [`crate::model::SparseKind::ALL`] order).
    pub masks: &'a [Mask],
    /// The step's sparsity (for the plot's title).
    pub sparsity: f64,
    pub plan: &'a StepPlan,
    pub fabric: &'a FabricConfig,
}

/// The heatmap of `kernels`' layer at `fidelity` (see the module doc); `cost` is the step's,
/// for the fast model's cycles.
pub fn layer_heatmap(
    kernels: &LayerKernels<'_>,
    cost: &StepCost,
    fidelity: Fidelity,
) -> Result<Heatmap, KernelError> {
    let (region, layer) = (kernels.plan.region, kernels.layer);
    let mut map = Heatmap {
        layer,
        sparsity: kernels.sparsity,
        fidelity,
        cols: region.cols,
        rows: region.rows,
        busy: vec![0; region.pes() as usize],
        cycles: 0,
        runs: 0,
    };
    let first = FirstPass::of(kernels);
    for mask in kernels.masks {
        match fidelity {
            Fidelity::Exact => add_exact(&first, mask, &mut map)?,
            Fidelity::Fast => add_model(&first, mask, &mut map)?,
        }
    }
    if fidelity == Fidelity::Fast {
        map.cycles = (cost.records.iter())
            .filter(|r| r.pass == 0 && r.op.sparse && r.op.layer == Some(layer))
            .map(|r| r.cycles)
            .sum();
    }
    Ok(map)
}

/// The first pass's plan and the fabric its weight-streamed kernels see.
struct FirstPass {
    plan: StepPlan,
    fabric: FabricConfig,
}

impl FirstPass {
    fn of(kernels: &LayerKernels<'_>) -> Self {
        let plan = kernels
            .plan
            .passes()
            .into_iter()
            .next()
            .map_or_else(|| kernels.plan.clone(), |pass| pass.plan);
        let fabric = plan.streaming_fabric(kernels.fabric);
        FirstPass { plan, fabric }
    }
}

/// Runs the three kernels of `mask`'s matrix on the simulator and adds their PEs' busy cycles.
fn add_exact(first: &FirstPass, mask: &Mask, map: &mut Heatmap) -> Result<(), KernelError> {
    let (plan, fabric) = (&first.plan, &first.fabric);
    let (k, n, t) = (mask.rows(), mask.cols(), plan.tokens());
    let w = StreamedMatrix::from_dense(k, n, &vec![1.0; k * n], Some(&mask.keep()));
    let wt = w.transpose();
    let (x, dy, bias) = (vec![0.0; t * k], vec![0.0; t * n], vec![0.0; n]);
    let forward = StreamMatmul {
        region: plan.region,
        tokens: t,
        x: &x,
        w: &w,
        bias: Some(&bias),
        precision: plan.precision,
    };
    add_stats(
        map,
        plan.region.origin,
        &forward.run(fabric, RunOptions::default())?.stats,
    );
    let input_grad = StreamMatmul {
        x: &dy,
        w: &wt,
        bias: None,
        ..forward
    };
    add_stats(
        map,
        plan.region.origin,
        &input_grad.run(fabric, RunOptions::default())?.stats,
    );
    let weight_grad = WeightGrad {
        region: plan.region,
        tokens: t,
        x: &x,
        dy: &dy,
        pattern: &w,
        bias: true,
        precision: plan.precision,
    };
    add_stats(
        map,
        plan.region.origin,
        &weight_grad.run(fabric, RunOptions::default())?.stats,
    );
    Ok(())
}

/// Adds a run's cycles and its PEs' busy cycles (PEs outside the region at `origin` ignored).
fn add_stats(map: &mut Heatmap, origin: Coord, stats: &Stats) {
    map.cycles += stats.cycles;
    map.runs += 1;
    for (coord, pe) in &stats.pes {
        let (Some(c), Some(r)) = (coord.x.checked_sub(origin.x), coord.y.checked_sub(origin.y))
        else {
            continue;
        };
        if c < map.cols && r < map.rows {
            map.busy[(r * map.cols + c) as usize] += pe.busy_cycles;
        }
    }
}

/// Adds the per-entry busy cycles of the three kernels of `mask`'s matrix, by the formula.
fn add_model(first: &FirstPass, mask: &Mask, map: &mut Heatmap) -> Result<(), KernelError> {
    let (plan, fabric) = (&first.plan, &first.fabric);
    let (k, n, cols) = (mask.rows(), mask.cols(), plan.region.cols as usize);
    let (forward_counts, transposed) = ColumnCounts::both_ways(k, n, &mask.keep(), cols);
    let shape = |k, n, bias| MatmulShape {
        region: plan.region,
        tokens: plan.tokens(),
        k,
        n,
        bias,
        precision: plan.precision,
    };
    for (shape, counts) in [
        (shape(k, n, true), &forward_counts),
        (shape(n, k, false), &transposed),
    ] {
        let matmul_plan = shape.plan(fabric)?;
        let load = counts.load(&matmul_plan.chunks);
        add_columns(map, &shape.busy_per_column(fabric, &matmul_plan, &load));
    }
    let grad = WeightGradShape {
        region: plan.region,
        tokens: plan.tokens(),
        k,
        n,
        bias: true,
        precision: plan.precision,
    };
    let grad_plan = grad.plan(fabric)?;
    let load = forward_counts.load(&grad_plan.chunks);
    add_columns(map, &grad.busy_per_column(fabric, &grad_plan, &load));
    Ok(())
}

/// Adds one run's busy cycles per PE column to every row of the column.
fn add_columns(map: &mut Heatmap, per_column: &[u64]) {
    map.runs += 1;
    for (c, &busy) in per_column.iter().enumerate().take(map.cols as usize) {
        for r in 0..map.rows as usize {
            map.busy[r * map.cols as usize + c] += busy;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flops::Phase;
    use crate::runtime::{Op, OpRecord};

    fn record(layer: usize, cycles: u64) -> OpRecord {
        OpRecord {
            op: Op::plain(Some(layer), "gelu", Phase::Forward),
            pass: 0,
            cycles,
            dense_cycles: cycles,
            fmacs: 0,
            busy_cycles: None,
            router_forwards: None,
        }
    }

    #[test]
    fn the_slowest_layer_sums_its_runs() {
        // Layer 0: 5 + 6 = 11, layer 1: 10, layer 2: 11 (the first of equals wins).
        let cost = StepCost {
            records: vec![record(0, 5), record(1, 10), record(2, 11), record(0, 6)],
        };
        assert_eq!(slowest_layer(&cost), Some(0));
        assert_eq!(slowest_layer(&StepCost::default()), None);
    }
}
