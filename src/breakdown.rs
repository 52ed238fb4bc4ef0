//! Why a sparse step's cycle reduction falls short of its FLOP reduction: the gap between the
//! two, in cycles and in reduction units, split into five causes that add up to it exactly
//! (per-nonzero overhead, reductions and other communication, load imbalance, fill and drain,
//! dense operations). `docs/sweep.md` states the definition with its formulas.
//!
//! Key design decision: nothing is fitted. The gap is measured (the steps' cycles, simulated or
//! costed); the dense operations' share follows from the records' cycles and executed FMACs
//! alone; each weight-streamed kernel's own shortfall is split with the terms of its cost
//! formula ([`StreamTerms`]: the per-entry cost, the fill or drain latency) applied to the
//! kept entries each PE column receives ([`StreamLoad`]), and what remains of its cycles is its
//! communication (the reductions, all-gathers and the per-chunk tasks around them). At the exact
//! fidelity that remainder also holds the formula's error (within the validated 5 %).
//!
//! What this is not: a timing model. It never estimates a step's cycles; it only splits them.

use std::collections::HashMap;

use wafersim_kernels::{
    ColumnCounts, KernelError, MatmulShape, StreamLoad, StreamTerms, WeightGradShape,
};
use wafersim_sim::FabricConfig;

use crate::compile::StepPlan;
use crate::flops::{OpKind, Phase};
use crate::model::SparseKind;
use crate::runtime::{OpRecord, StepCost};
use crate::sparsity::{Mask, ModelMasks};

/// Where one weight-streamed kernel run's cycles go, by its cost formula. The four parts add up
/// to the run's cycles (`communication` is what the other three leave).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KernelParts {
    /// The per-entry tasks of a column with the mean load: `per_entry x entries / columns`.
    pub per_nonzero: f64,
    /// The busiest column's entries beyond the mean, per chunk: `per_entry x excess / columns`.
    pub imbalance: f64,
    /// The formula's fill or drain latency.
    pub fill_drain: f64,
    /// The rest: reductions, all-gathers and the per-chunk tasks around them.
    pub communication: f64,
}

impl KernelParts {
    /// Splits `cycles` of a run with `terms` over `load`.
    pub fn split(cycles: u64, terms: StreamTerms, load: &StreamLoad) -> Self {
        let cols = load.cols().max(1) as f64;
        let per_entry = terms.per_entry as f64;
        let per_nonzero = per_entry * load.total() as f64 / cols;
        let imbalance = per_entry * load.excess_over_mean_scaled() as f64 / cols;
        let fill_drain = terms.fill_drain as f64;
        KernelParts {
            per_nonzero,
            imbalance,
            fill_drain,
            communication: cycles as f64 - per_nonzero - imbalance - fill_drain,
        }
    }
}

/// The five causes, each in the same unit (cycles, or reduction units).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Causes {
    pub per_nonzero_overhead: f64,
    pub communication: f64,
    pub load_imbalance: f64,
    pub fill_drain: f64,
    pub dense_operations: f64,
}

impl Causes {
    /// The causes' names as reports spell them, in report order.
    pub const NAMES: [&'static str; 5] = [
        "per_nonzero_overhead",
        "communication",
        "load_imbalance",
        "fill_drain",
        "dense_operations",
    ];

    /// Human-readable labels, in the order of [`Causes::NAMES`].
    pub const LABELS: [&'static str; 5] = [
        "per-nonzero overhead",
        "reductions and other communication",
        "load imbalance",
        "fill and drain",
        "dense operations",
    ];

    /// The values in the order of [`Causes::NAMES`].
    pub fn values(&self) -> [f64; 5] {
        [
            self.per_nonzero_overhead,
            self.communication,
            self.load_imbalance,
            self.fill_drain,
            self.dense_operations,
        ]
    }

    /// Their sum.
    pub fn total(&self) -> f64 {
        self.values().iter().sum()
    }

    /// Every value times `factor`.
    pub fn scaled(&self, factor: f64) -> Self {
        Causes {
            per_nonzero_overhead: self.per_nonzero_overhead * factor,
            communication: self.communication * factor,
            load_imbalance: self.load_imbalance * factor,
            fill_drain: self.fill_drain * factor,
            dense_operations: self.dense_operations * factor,
        }
    }
}

/// The gap of one sparse step against the dense step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GapBreakdown {
    /// Sparse over dense matmul FLOPs, `f = 1 / flop_reduction`.
    pub flop_ratio: f64,
    /// The sparse step's cycles `C`.
    pub cycles: u64,
    /// The dense step's cycles `D`.
    pub dense_cycles: u64,
    /// `C - f D`: the cycles beyond what the FLOP reduction promises.
    pub gap_cycles: f64,
    /// The gap's causes in cycles; they sum to `gap_cycles`.
    pub causes: Causes,
}

impl GapBreakdown {
    /// `1 / f`.
    pub fn flop_reduction(&self) -> f64 {
        1.0 / self.flop_ratio
    }

    /// `D / C`.
    pub fn cycle_reduction(&self) -> f64 {
        self.dense_cycles as f64 / self.cycles as f64
    }

    /// `f D`: the step's cycles if they had shrunk with its FLOPs.
    pub fn ideal_cycles(&self) -> f64 {
        self.flop_ratio * self.dense_cycles as f64
    }

    /// Reduction units per gap cycle: `flop_reduction - cycle_reduction = (1 / (f C)) x gap`,
    /// since `1/f - D/C = (C - f D) / (f C)`.
    pub fn reduction_per_cycle(&self) -> f64 {
        1.0 / (self.flop_ratio * self.cycles as f64)
    }

    /// `flop_reduction - cycle_reduction`, computed from the gap in cycles.
    pub fn gap_reduction(&self) -> f64 {
        self.gap_cycles * self.reduction_per_cycle()
    }

    /// The causes in reduction units; they sum to [`Self::gap_reduction`].
    pub fn causes_in_reduction(&self) -> Causes {
        self.causes.scaled(self.reduction_per_cycle())
    }
}

/// What can stop a breakdown.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BreakdownError {
    #[error("record {index}: the sparse step ran {sparse}, the dense step {dense}")]
    Misaligned {
        index: usize,
        sparse: String,
        dense: String,
    },
    #[error("the sparse step has {sparse} records, the dense step {dense}")]
    Length { sparse: usize, dense: usize },
    #[error("{op}: no split of its cycles (not a weight-streamed kernel of the masks)")]
    MissingParts { op: String },
    #[error("{op}: {source}")]
    Kernel {
        op: String,
        #[source]
        source: KernelError,
    },
    #[error("the dense step has no matmul FLOPs")]
    NoFlops,
    #[error("{op} ran in pass {pass}, but the step's plan has {passes} passes")]
    Pass {
        op: String,
        pass: usize,
        passes: usize,
    },
}

/// One step's cycles, FLOPs and the split of its weight-streamed kernels.
#[derive(Clone, Copy)]
pub struct StepSide<'a> {
    pub cost: &'a StepCost,
    /// Matmul FLOPs of the step.
    pub flops: u64,
    /// Per record of `cost`, the split of a weight-streamed kernel (`None` for the others).
    pub parts: &'a [Option<KernelParts>],
}

/// The gap of `sparse` against `dense` (the same schedule with every weight kept), split by
/// cause (see the module doc and `docs/sweep.md`):
///
/// - dense operations: `sum_{r not streamed} (c_r - f d_r) - sum_{r streamed} (f - rho_r) d_r`,
///   the gap left if every weight-streamed kernel took exactly `rho_r` (its kept fraction of
///   FMACs) times its dense cycles;
/// - the four others: `sum_{r streamed} (part_r - rho_r dense_part_r)` for each part of
///   [`KernelParts`].
pub fn gap(sparse: StepSide<'_>, dense: StepSide<'_>) -> Result<GapBreakdown, BreakdownError> {
    let (s, d) = (&sparse.cost.records, &dense.cost.records);
    if s.len() != d.len() {
        return Err(BreakdownError::Length {
            sparse: s.len(),
            dense: d.len(),
        });
    }
    if dense.flops == 0 {
        return Err(BreakdownError::NoFlops);
    }
    let f = sparse.flops as f64 / dense.flops as f64;
    let mut causes = Causes::default();
    for (index, (rs, rd)) in s.iter().zip(d).enumerate() {
        if rs.op != rd.op {
            return Err(BreakdownError::Misaligned {
                index,
                sparse: rs.op.label(),
                dense: rd.op.label(),
            });
        }
        let (c, dc) = (rs.cycles as f64, rd.cycles as f64);
        if !rs.op.sparse {
            causes.dense_operations += c - f * dc;
            continue;
        }
        let rho = kept_fraction(rs, rd);
        causes.dense_operations -= (f - rho) * dc;
        let part = |side: &StepSide<'_>| {
            side.parts
                .get(index)
                .copied()
                .flatten()
                .ok_or_else(|| BreakdownError::MissingParts { op: rs.op.label() })
        };
        let (ps, pd) = (part(&sparse)?, part(&dense)?);
        causes.per_nonzero_overhead += ps.per_nonzero - rho * pd.per_nonzero;
        causes.load_imbalance += ps.imbalance - rho * pd.imbalance;
        causes.fill_drain += ps.fill_drain - rho * pd.fill_drain;
        causes.communication += ps.communication - rho * pd.communication;
    }
    let (cycles, dense_cycles) = (sparse.cost.cycles(), dense.cost.cycles());
    Ok(GapBreakdown {
        flop_ratio: f,
        cycles,
        dense_cycles,
        gap_cycles: cycles as f64 - f * dense_cycles as f64,
        causes,
    })
}

/// `rho_r`: the sparse run's FMACs over the dense run's (its kept fraction of the weights).
fn kept_fraction(sparse: &OpRecord, dense: &OpRecord) -> f64 {
    if dense.fmacs == 0 {
        1.0
    } else {
        sparse.fmacs as f64 / dense.fmacs as f64
    }
}

/// What a step's weight-streamed kernels were given: the model's masks on the plan's region.
pub struct StepKernels<'a> {
    pub masks: &'a ModelMasks,
    pub plan: &'a StepPlan,
    pub fabric: &'a FabricConfig,
}

/// The split of every weight-streamed kernel of `cost` (a step run with `kernels`), per record.
/// The kernels' shapes are the runtime's: forward `x W + b` (`K x N`), input gradient
/// `dy W^T` (no bias), weight gradient over the pattern with the bias gradient, each on its
/// pass's region and tokens and with the SRAM the resident activations leave. The kept-entry
/// counts of one matrix at a time are held, so memory stays at one matrix's counts.
pub fn step_parts(
    kernels: &StepKernels<'_>,
    cost: &StepCost,
) -> Result<Vec<Option<KernelParts>>, BreakdownError> {
    let passes = kernels.plan.passes();
    let mut at: HashMap<(usize, usize), Vec<usize>> = HashMap::new();
    for (i, r) in cost.records.iter().enumerate() {
        if let (true, Some(layer), [OpKind::Linear(kind)]) = (r.op.sparse, r.op.layer, r.op.matmuls)
        {
            at.entry((layer, kind.index())).or_default().push(i);
        }
    }
    let mut parts = vec![None; cost.records.len()];
    let mut keys: Vec<_> = at.keys().copied().collect();
    keys.sort_unstable();
    for key in keys {
        let (layer, kind) = key;
        let mask = kernels
            .masks
            .get(layer, SparseKind::ALL[kind])
            .ok_or_else(|| BreakdownError::MissingParts {
                op: format!("layer {layer} {}", SparseKind::ALL[kind].name()),
            })?;
        // Counts per number of region columns: the last pass may run on another region.
        let mut counts: HashMap<usize, MatrixCounts> = HashMap::new();
        for &i in &at[&key] {
            let record = &cost.records[i];
            let plan = &passes
                .get(record.pass)
                .ok_or_else(|| BreakdownError::Pass {
                    op: record.op.label(),
                    pass: record.pass,
                    passes: passes.len(),
                })?
                .plan;
            let cols = plan.region.cols as usize;
            let counts = counts
                .entry(cols)
                .or_insert_with(|| MatrixCounts::new(mask, cols));
            let split = kernels
                .record_parts(plan, mask, counts, record)
                .map_err(|source| BreakdownError::Kernel {
                    op: record.op.label(),
                    source,
                })?;
            parts[i] = Some(split);
        }
    }
    Ok(parts)
}

/// One matrix's kept entries per output column and PE column, both ways it is streamed.
struct MatrixCounts {
    forward: ColumnCounts,
    transposed: ColumnCounts,
}

impl MatrixCounts {
    fn new(mask: &Mask, cols: usize) -> Self {
        let (forward, transposed) =
            ColumnCounts::both_ways(mask.rows(), mask.cols(), &mask.keep(), cols);
        MatrixCounts {
            forward,
            transposed,
        }
    }
}

impl StepKernels<'_> {
    /// The split of `record`, a kernel of `mask`'s matrix in the pass planned by `plan`.
    fn record_parts(
        &self,
        plan: &StepPlan,
        mask: &Mask,
        counts: &MatrixCounts,
        record: &OpRecord,
    ) -> Result<KernelParts, KernelError> {
        let (region, tokens) = (plan.region, plan.tokens());
        let precision = plan.precision;
        let fabric = &plan.streaming_fabric(self.fabric);
        let (rows, cols) = (mask.rows(), mask.cols());
        if record.op.phase == Phase::WeightGrad {
            let shape = WeightGradShape {
                region,
                tokens,
                k: rows,
                n: cols,
                bias: true,
                precision,
            };
            let plan = shape.plan(fabric)?;
            let load = counts.forward.load(&plan.chunks);
            let terms = shape.terms(fabric, &plan);
            return Ok(KernelParts::split(record.cycles, terms, &load));
        }
        let forward = record.op.phase == Phase::Forward;
        let (k, n, counts) = if forward {
            (rows, cols, &counts.forward)
        } else {
            (cols, rows, &counts.transposed)
        };
        let shape = MatmulShape {
            region,
            tokens,
            k,
            n,
            bias: forward,
            precision,
        };
        let plan = shape.plan(fabric)?;
        let load = counts.load(&plan.chunks);
        let terms = shape.terms(fabric, &plan);
        Ok(KernelParts::split(record.cycles, terms, &load))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{Op, OpRecord};

    fn record(sparse: bool, cycles: u64, fmacs: u64) -> OpRecord {
        let op = if sparse {
            Op::linear(0, SparseKind::Fc, Phase::Forward)
        } else {
            Op::plain(Some(0), "gelu", Phase::Forward)
        };
        OpRecord {
            op,
            pass: 0,
            cycles,
            dense_cycles: cycles,
            fmacs,
            busy_cycles: None,
            router_forwards: None,
        }
    }

    /// A worked case. Dense step: a streamed kernel of 200 cycles (100 FMACs) and a dense
    /// operation of 40 cycles, D = 240. Sparse step: the kernel keeps a quarter (25 FMACs,
    /// rho = 0.25) and takes 60 cycles, C = 100. Matmul FLOPs 60 against 200: f = 0.3,
    /// FLOP reduction 3.333x, cycle reduction 2.4x, ideal f D = 72, gap C - f D = 28 cycles.
    /// Dense operations: (40 - 0.3 x 40) - (0.3 - 0.25) x 200 = 28 - 10 = 18.
    /// The kernel's own shortfall 60 - 0.25 x 200 = 10, split with the parts below:
    /// per nonzero 40 - 0.25 x 160 = 0, imbalance 6 - 0 = 6, fill 4 - 0.25 x 4 = 3,
    /// communication 10 - 0.25 x 36 = 1. In reduction units, x 1 / (f C) = 1/30:
    /// the gap is 28/30 = 0.9333 = 3.3333 - 2.4.
    #[test]
    fn worked_case_adds_up_to_the_gap() {
        let dense = StepCost {
            records: vec![record(true, 200, 100), record(false, 40, 0)],
        };
        let sparse = StepCost {
            records: vec![record(true, 60, 25), record(false, 40, 0)],
        };
        let dense_parts = [
            Some(KernelParts {
                per_nonzero: 160.0,
                imbalance: 0.0,
                fill_drain: 4.0,
                communication: 36.0,
            }),
            None,
        ];
        let sparse_parts = [
            Some(KernelParts {
                per_nonzero: 40.0,
                imbalance: 6.0,
                fill_drain: 4.0,
                communication: 10.0,
            }),
            None,
        ];
        let g = gap(
            StepSide {
                cost: &sparse,
                flops: 60,
                parts: &sparse_parts,
            },
            StepSide {
                cost: &dense,
                flops: 200,
                parts: &dense_parts,
            },
        )
        .unwrap();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(g.ideal_cycles(), 72.0));
        assert!(close(g.gap_cycles, 28.0));
        let c = g.causes;
        assert!(close(c.dense_operations, 18.0), "{c:?}");
        assert!(close(c.per_nonzero_overhead, 0.0), "{c:?}");
        assert!(close(c.load_imbalance, 6.0), "{c:?}");
        assert!(close(c.fill_drain, 3.0), "{c:?}");
        assert!(close(c.communication, 1.0), "{c:?}");
        assert!(close(g.flop_reduction() - g.cycle_reduction(), 28.0 / 30.0));
        assert!(close(g.gap_reduction(), 28.0 / 30.0));
        assert!(close(g.causes_in_reduction().total(), 28.0 / 30.0));
    }

    #[test]
    fn parts_add_up_to_the_cycles() {
        let counts = ColumnCounts::streamed(2, 3, &[true, true, true, true, false, false], 2);
        // Row 0 (column 0) keeps 3 outputs, row 1 (column 1) keeps 1: one chunk (3, 1).
        let one_chunk: Vec<std::ops::Range<usize>> = std::iter::once(0..3).collect();
        let load = counts.load(&one_chunk);
        let terms = StreamTerms {
            per_entry: 10,
            fill_drain: 7,
        };
        let p = KernelParts::split(100, terms, &load);
        // per nonzero 10 x 4 / 2 = 20, imbalance 10 x (2 x 3 - 4) / 2 = 10, fill 7.
        assert_eq!(
            (p.per_nonzero, p.imbalance, p.fill_drain, p.communication),
            (20.0, 10.0, 7.0, 63.0)
        );
    }

    #[test]
    fn misaligned_steps_are_refused() {
        let a = StepCost {
            records: vec![record(true, 1, 1)],
        };
        let b = StepCost {
            records: vec![record(false, 1, 1)],
        };
        let side = |cost| StepSide {
            cost,
            flops: 1,
            parts: &[],
        };
        let err = gap(side(&a), side(&b)).unwrap_err();
        assert!(
            matches!(err, BreakdownError::Misaligned { index: 0, .. }),
            "{err}"
        );
    }
}
