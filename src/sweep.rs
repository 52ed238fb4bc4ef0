//! Training steps of one model at several sparsities, on the fabric: FLOP and cycle reductions
//! against the dense step (the `wafersim sweep` experiment).
//!
//! Each sparsity is an independent step (its own masks, drawn from the seed), so the steps run
//! in parallel (rayon) and the results, collected in the given order, do not depend on the thread
//! count. The dense baseline is the sparsity-0 step, run once whether or not 0 is in the list.
//! Each step runs at the setup's [`Fidelity`]: simulated, or costed by the kernels' formulas.

use rayon::prelude::*;
use wafersim_kernels::Precision;
use wafersim_sim::FabricConfig;

use crate::compile::{CompileError, StepPlan, plan_step};
use crate::flops::{self, FlopError, FlopOptions, NnzSource, StepShape};
use crate::model::{GptConfig, GptParams};
use crate::reference::Batch;
use crate::runtime::{
    Fidelity, GradientSet, RuntimeError, StepCost, StepInputs, StepMode, simulate_step,
};
use crate::sparsity::{ModelMasks, SparsityError};

/// What one sparsity's step measured.
#[derive(Clone, Debug)]
pub struct SweepPoint {
    pub sparsity: f64,
    /// `None` without numerics.
    pub loss: Option<f64>,
    /// Matmul FLOPs of the step (executed = analytic).
    pub flops: u64,
    pub cost: StepCost,
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
    /// Weights before pruning.
    pub params: &'a GptParams,
    pub batch: &'a Batch,
    pub fabric: &'a FabricConfig,
    pub precision: Precision,
    /// Seed of the masks.
    pub seed: u64,
    pub fidelity: Fidelity,
    /// Compute each step's loss (fast: on the CPU reference).
    pub numerics: bool,
}

/// Runs the steps of every sparsity in `sparsities` and the dense baseline.
pub fn run_sweep(setup: &SweepSetup<'_>, sparsities: &[f64]) -> Result<Sweep, SweepError> {
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
        .map(|&s| run_point(setup, &plan, s))
        .collect::<Result<Vec<_>, _>>()?;
    let dense = points[0].clone();
    if !sparsities.contains(&0.0) {
        points.remove(0);
    }
    Ok(Sweep {
        plan,
        fidelity: setup.fidelity,
        dense,
        points,
    })
}

fn run_point(
    setup: &SweepSetup<'_>,
    plan: &StepPlan,
    sparsity: f64,
) -> Result<SweepPoint, SweepError> {
    let config = setup.config;
    let masks = ModelMasks::random(config, sparsity, setup.seed)?;
    let mut params = setup.params.clone();
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
    };
    let mode = StepMode {
        fidelity: setup.fidelity,
        numerics: setup.numerics,
    };
    let step = simulate_step(inputs, mode)?;
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
    Ok(SweepPoint {
        sparsity,
        loss: step.numerics.map(|n| n.loss),
        flops: executed,
        cost: step.cost,
    })
}
