//! Training steps of one model at several sparsities, on the fabric: FLOP and cycle reductions
//! against the dense step (the `wafersim sweep` experiment).
//!
//! Each sparsity is an independent step (its own masks, drawn from the seed), so the steps run
//! in parallel (rayon) and the results, collected in the given order, do not depend on the thread
//! count. The dense baseline is the sparsity-0 step, run once whether or not 0 is in the list.
//! Each step runs at the setup's [`Fidelity`]: simulated, or costed by the kernels' formulas
//! (without weights, when the setup has none: shapes and masks are all the costing reads).
//! Every point carries the split of its gap to the FLOP reduction by cause
//! ([`crate::breakdown`]).

use rayon::prelude::*;
use wafersim_kernels::Precision;
use wafersim_sim::FabricConfig;

use crate::breakdown::{
    self, BreakdownError, Causes, GapBreakdown, KernelParts, StepKernels, StepSide,
};
use crate::compile::{CompileError, StepPlan, plan_step};
use crate::flops::{self, FlopError, FlopOptions, NnzSource, StepShape};
use crate::model::SparseKind;
use crate::model::{GptConfig, GptParams};
use crate::reference::Batch;
use crate::runtime::{
    CostInputs, Fidelity, GradientSet, LossScale, ReferenceCheck, RuntimeError, StepCost,
    StepInputs, StepMode, StepReport, cost_step, simulate_step,
};
use crate::sparsity::{self, Mask, ModelMasks, SparsityError};
use crate::utilisation::{self, Heatmap, LayerKernels};

/// What one sparsity's step measured.
#[derive(Clone, Debug)]
pub struct SweepPoint {
    pub sparsity: f64,
    /// `None` without numerics.
    pub loss: Option<f64>,
    /// Matmul FLOPs of the step (executed = analytic).
    pub flops: u64,
    pub cost: StepCost,
    /// Per record of `cost`, the split of a weight-streamed kernel's cycles.
    pub parts: Vec<Option<KernelParts>>,
    /// The gap between the FLOP and the cycle reduction against the dense step, by cause
    /// (all zero at sparsity 0).
    pub gap: GapBreakdown,
    /// The exact fidelity's loss and gradients against the CPU reference's (`None` without
    /// numerics, or at the fast fidelity, whose numerics are the reference's).
    pub check: Option<ReferenceCheck>,
}

impl SweepPoint {
    /// Where the step's cycles go, in the parts of the cause breakdown (absolute cycles, not a
    /// gap): the weight-streamed kernels' per-entry work, communication, imbalance and fill or
    /// drain ([`KernelParts`]), and every other kernel's cycles as dense operations.
    pub fn cycles_by_part(&self) -> Causes {
        let mut out = Causes::default();
        for (record, part) in self.cost.records.iter().zip(&self.parts) {
            match part {
                Some(k) => {
                    out.per_nonzero_overhead += k.per_nonzero;
                    out.communication += k.communication;
                    out.load_imbalance += k.imbalance;
                    out.fill_drain += k.fill_drain;
                }
                None => out.dense_operations += record.cycles as f64,
            }
        }
        out
    }
}

/// The whole sweep.
#[derive(Clone, Debug)]
pub struct Sweep {
    pub plan: StepPlan,
    /// How the steps' cycles were obtained.
    pub fidelity: Fidelity,
    /// The sparsity-0 step.
    pub dense: SweepPoint,
    /// One point per requested sparsity, sparsity 0 first if it was requested.
    pub points: Vec<SweepPoint>,
    /// The power of two the exact steps scaled their loss by (`None`: fast fidelity).
    pub loss_scale: Option<f32>,
}

impl Sweep {
    /// Dense matmul FLOPs over the point's.
    pub fn flop_reduction(&self, p: &SweepPoint) -> f64 {
        self.dense.flops as f64 / p.flops as f64
    }

    /// Dense cycles over the point's.
    pub fn cycle_reduction(&self, p: &SweepPoint) -> f64 {
        self.dense.cost.cycles() as f64 / p.cost.cycles() as f64
    }
}

/// What can stop a sweep.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SweepError {
    #[error(transparent)]
    Sparsity(#[from] SparsityError),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Flops(#[from] FlopError),
    #[error("the cause breakdown: {0}")]
    Breakdown(#[from] BreakdownError),
    #[error("a sweep without weights can only be costed (fast fidelity, no numerics)")]
    NeedsWeights,
    #[error(
        "sparsity {sparsity}: executed matmul FLOPs {executed} differ from the analytic {analytic}: a simulator bug"
    )]
    FlopMismatch {
        sparsity: f64,
        executed: u64,
        analytic: u64,
    },
}

/// The model, data and machine every step of a sweep shares.
pub struct SweepSetup<'a> {
    pub config: &'a GptConfig,
    /// Weights before pruning; `None` costs the steps from shapes and masks alone (the fast
    /// fidelity without numerics), so a billion-parameter model needs no weights in memory.
    pub params: Option<&'a GptParams>,
    pub batch: &'a Batch,
    pub fabric: &'a FabricConfig,
    pub precision: Precision,
    /// Seed of the masks.
    pub seed: u64,
    pub fidelity: Fidelity,
    /// Compute each step's loss (fast: on the CPU reference).
    pub numerics: bool,
    /// Loss scaling of the exact steps.
    pub loss_scale: LossScale,
}

/// Runs the steps of every sparsity in `sparsities` and the dense baseline.
pub fn run_sweep(setup: &SweepSetup<'_>, sparsities: &[f64]) -> Result<Sweep, SweepError> {
    run_sweep_with(setup, sparsities, &|_| {})
}

/// Steps in a sweep: the dense baseline and every other sparsity of `sparsities`.
pub fn step_count(sparsities: &[f64]) -> usize {
    1 + sparsities.iter().filter(|&&s| s != 0.0).count()
}

/// [`run_sweep`], calling `on_step` as each step finishes (from the thread that ran it, in
/// any order; [`step_count`] of them).
pub fn run_sweep_with(
    setup: &SweepSetup<'_>,
    sparsities: &[f64],
    on_step: &(dyn Fn(&SweepPoint) + Sync),
) -> Result<Sweep, SweepError> {
    let plan = plan_step(
        setup.config,
        setup.batch.batch,
        setup.batch.seq,
        setup.fabric,
        setup.precision,
    )?;
    let mut all: Vec<f64> = vec![0.0];
    all.extend(sparsities.iter().filter(|&&s| s != 0.0));
    let mut points = all
        .par_iter()
        .map(|&s| {
            let point = run_point(setup, &plan, s)?;
            on_step(&point);
            Ok(point)
        })
        .collect::<Result<Vec<_>, SweepError>>()?;
    let dense = points[0].clone();
    for point in &mut points {
        point.gap = breakdown::gap(side(point), side(&dense))?;
    }
    let dense = points[0].clone();
    if !sparsities.contains(&0.0) {
        points.remove(0);
    }
    let loss_scale =
        (setup.fidelity == Fidelity::Exact).then(|| setup.loss_scale.of_step(&plan, 0));
    Ok(Sweep {
        plan,
        fidelity: setup.fidelity,
        dense,
        points,
        loss_scale,
    })
}

/// The PE-utilisation heatmap of the slowest layer of `point`'s step, at the sweep's fidelity
/// (see [`crate::utilisation`]); `None` for a model without blocks. That layer's masks are drawn
/// again from the seed, as the step drew them (the other layers' are not needed).
pub fn slowest_layer_heatmap(
    setup: &SweepSetup<'_>,
    sweep: &Sweep,
    point: &SweepPoint,
) -> Result<Option<Heatmap>, SweepError> {
    let Some(layer) = utilisation::slowest_layer(&point.cost) else {
        return Ok(None);
    };
    if layer >= setup.config.n_layer {
        return Ok(None);
    }
    let masks = SparseKind::ALL
        .iter()
        .map(|&kind| {
            let (rows, cols) = kind.shape(setup.config);
            let stream = sparsity::stream_of(layer, kind);
            Mask::random(rows, cols, point.sparsity, setup.seed, stream)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let kernels = LayerKernels {
        layer,
        masks: &masks,
        sparsity: point.sparsity,
        plan: &sweep.plan,
        fabric: setup.fabric,
    };
    let map =
        utilisation::layer_heatmap(&kernels, &point.cost, sweep.fidelity).map_err(|source| {
            RuntimeError::Kernel {
                op: format!("layer {layer} heatmap"),
                source,
            }
        })?;
    Ok(Some(map))
}

fn side(point: &SweepPoint) -> StepSide<'_> {
    StepSide {
        cost: &point.cost,
        flops: point.flops,
        parts: &point.parts,
    }
}

fn run_point(
    setup: &SweepSetup<'_>,
    plan: &StepPlan,
    sparsity: f64,
) -> Result<SweepPoint, SweepError> {
    let config = setup.config;
    let masks = ModelMasks::random(config, sparsity, setup.seed)?;
    let mode = StepMode {
        fidelity: setup.fidelity,
        numerics: setup.numerics,
        check: true,
    };
    let step = match setup.params {
        Some(weights) => {
            let mut params = weights.clone();
            masks.apply(&mut params)?;
            let inputs = StepInputs {
                config,
                params: &params,
                masks: &masks,
                batch: setup.batch,
                fabric: setup.fabric,
                plan,
                dense_baseline: false,
                prompt: None,
                gradients: GradientSet::All,
                loss_scale: setup.loss_scale,
            };
            simulate_step(inputs, mode)?
        }
        None if mode.numerics || mode.fidelity == Fidelity::Exact => {
            return Err(SweepError::NeedsWeights);
        }
        None => {
            let inputs = CostInputs {
                config,
                masks: &masks,
                batch: setup.batch,
                fabric: setup.fabric,
                plan,
                dense_baseline: false,
                prompt_len: 0,
                gradients: GradientSet::All,
            };
            StepReport::costed(mode.fidelity, cost_step(inputs)?)
        }
    };
    let nnz = NnzSource::from_fn(config, |l, k| masks.get(l, k).map_or(0, |m| m.nnz() as u64))?;
    let shape = StepShape {
        batch: setup.batch.batch,
        seq: setup.batch.seq,
    };
    let analytic = flops::step_flops(config, shape, &nnz, FlopOptions::default())?.matmul_sparse();
    let executed = step.cost.executed_matmul_flops();
    if executed != analytic {
        return Err(SweepError::FlopMismatch {
            sparsity,
            executed,
            analytic,
        });
    }
    let kernels = StepKernels {
        masks: &masks,
        plan,
        fabric: setup.fabric,
    };
    let parts = breakdown::step_parts(&kernels, &step.cost)?;
    let cycles = step.cost.cycles();
    Ok(SweepPoint {
        sparsity,
        loss: step.numerics.map(|n| n.loss),
        check: step.check,
        flops: executed,
        cost: step.cost,
        parts,
        // Against itself until `run_sweep` knows the dense step.
        gap: GapBreakdown {
            flop_ratio: 1.0,
            cycles,
            dense_cycles: cycles,
            gap_cycles: 0.0,
            causes: Default::default(),
        },
    })
}
