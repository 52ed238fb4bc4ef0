//! The host side of a training step on the fabric (weight streaming): every operation of the
//! forward pass, the loss and the backward pass as a kernel on the step's region, weights
//! streamed in (kept entries only for the sparse matrices) and gradients out, at one of two
//! timing fidelities:
//!
//! - [`Fidelity::Exact`]: every kernel runs on the event-driven simulator, wavelet by wavelet, on
//!   real data; the loss and the gradients come out of the fabric (`exact.rs`).
//! - [`Fidelity::Fast`]: every kernel is costed by its analytic formula from the same shapes and
//!   kept-entry patterns; nothing is simulated, executed FLOPs are the analytic count, and the
//!   loss and gradients (if asked for) come from the CPU reference (`fast.rs`).
//!
//! Key design decision: both walk one schedule (`walk.rs`): the same kernel instances in the same
//! order, recorded as the same [`OpRecord`]s, so a fast report lines up with an exact one
//! operation by operation.
//!
//! Cycles of a step are the sum of its kernels' cycles: kernels do not overlap. For the dense
//! baseline, the kernels of the six sparse matrices are timed a second time streaming every
//! weight (all other kernels cost the same either way, since their cycles do not depend on the
//! values). The optimizer runs on the host, as in weight streaming
//! (see [`crate::reference::AdamW`]).

mod attention;
mod backward;
mod exact;
mod fast;
mod forward;
mod record;
mod walk;

pub use record::{Op, OpRecord, StepCost};

use wafersim_kernels::KernelError;
use wafersim_sim::{FabricConfig, Trace, TraceWindow};

use crate::compile::StepPlan;
use crate::model::{GptConfig, GptParams};
use crate::reference::{self, Batch, ReferenceError};
use crate::sparsity::ModelMasks;

/// How a step's cycles are obtained.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fidelity {
    /// Event-driven simulation of every wavelet: the ground truth, for small fabrics and models.
    #[default]
    Exact,
    /// The kernels' analytic cost formulas: no simulation, any size.
    Fast,
}

impl Fidelity {
    /// `exact` or `fast`, as reports name it.
    pub fn name(self) -> &'static str {
        match self {
            Fidelity::Exact => "exact",
            Fidelity::Fast => "fast",
        }
    }
}

/// One training step to run.
#[derive(Clone, Copy)]
pub struct StepInputs<'a> {
    pub config: &'a GptConfig,
    /// The weights, pruned entries zero.
    pub params: &'a GptParams,
    pub masks: &'a ModelMasks,
    pub batch: &'a Batch,
    pub fabric: &'a FabricConfig,
    pub plan: &'a StepPlan,
    /// Also time the sparse matrices' kernels with every weight streamed.
    pub dense_baseline: bool,
}

/// How to run a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepMode {
    pub fidelity: Fidelity,
    /// Compute the loss and the gradients (the exact engine computes them anyway; the fast one
    /// asks the CPU reference).
    pub numerics: bool,
}

/// What a step computed and cost, on the exact engine.
#[derive(Clone, Debug)]
pub struct StepRun {
    /// Mean next-token cross-entropy, as the fabric computed it.
    pub loss: f64,
    /// Gradient of every parameter (pruned entries zero).
    pub grads: GptParams,
    pub cost: StepCost,
}

/// The loss and the gradients of a step.
#[derive(Clone, Debug)]
pub struct Numerics {
    /// Mean next-token cross-entropy.
    pub loss: f64,
    /// Gradient of every parameter (pruned entries zero).
    pub grads: GptParams,
}

/// What a step cost at a fidelity, and its numerics if they were asked for.
#[derive(Clone, Debug)]
pub struct StepReport {
    pub fidelity: Fidelity,
    /// From the fabric (exact) or the CPU reference (fast); `None` if not asked for.
    pub numerics: Option<Numerics>,
    pub cost: StepCost,
}

/// What can stop a step.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    #[error("{op}: {source}")]
    Kernel {
        op: String,
        #[source]
        source: KernelError,
    },
    #[error("{op}: executed {executed} FLOPs, the analytic count is {analytic}: a simulator bug")]
    FlopMismatch {
        op: String,
        executed: u64,
        analytic: u64,
    },
    #[error("the CPU reference: {0}")]
    Reference(#[from] ReferenceError),
    #[error("a trace needs the exact fidelity (the fast one simulates no wavelet)")]
    TraceNeedsExact,
}

/// What a step can report while it runs, besides its cost.
#[derive(Clone, Copy, Default)]
pub struct StepHooks<'a> {
    /// Called after every kernel run with its record, in execution order.
    pub progress: Option<&'a dyn Fn(&OpRecord)>,
    /// Record a Chrome / Perfetto trace of this window of the step, in cycles from the step's
    /// start (exact fidelity only).
    pub trace: Option<TraceWindow>,
}

/// Runs one training step on the exact engine: the fabric's loss and gradients and the cost.
pub fn run_step(inputs: StepInputs<'_>) -> Result<StepRun, RuntimeError> {
    run_exact(inputs, StepHooks::default()).map(|(run, _)| run)
}

fn run_exact(
    inputs: StepInputs<'_>,
    hooks: StepHooks<'_>,
) -> Result<(StepRun, Option<Trace>), RuntimeError> {
    let mut engine = exact::ExactEngine::new(inputs);
    engine.trace = hooks
        .trace
        .map(|w| std::cell::RefCell::new(exact::StepTrace::new(w)));
    let cost = walk::walk(&mut engine, inputs, hooks.progress)?;
    let trace = engine.trace.map(|t| t.into_inner().finish());
    let run = StepRun {
        loss: engine.loss,
        grads: engine.grads,
        cost,
    };
    Ok((run, trace))
}

/// Runs (exact) or costs (fast) one training step.
pub fn simulate_step(inputs: StepInputs<'_>, mode: StepMode) -> Result<StepReport, RuntimeError> {
    simulate_step_with(inputs, mode, StepHooks::default()).map(|(report, _)| report)
}

/// [`simulate_step`] with `hooks`: progress after every kernel run, and the trace of a window
/// (returned; exact fidelity only, [`RuntimeError::TraceNeedsExact`] otherwise).
pub fn simulate_step_with(
    inputs: StepInputs<'_>,
    mode: StepMode,
    hooks: StepHooks<'_>,
) -> Result<(StepReport, Option<Trace>), RuntimeError> {
    if hooks.trace.is_some() && mode.fidelity != Fidelity::Exact {
        return Err(RuntimeError::TraceNeedsExact);
    }
    let mut trace = None;
    let (cost, numerics) = match mode.fidelity {
        Fidelity::Exact => {
            let (run, recorded) = run_exact(inputs, hooks)?;
            trace = recorded;
            let numerics = mode.numerics.then_some(Numerics {
                loss: run.loss,
                grads: run.grads,
            });
            (run.cost, numerics)
        }
        Fidelity::Fast => {
            let cost = walk::walk(&mut fast::FastEngine::new(inputs), inputs, hooks.progress)?;
            let numerics = if mode.numerics {
                let (loss, grads) = reference::loss_and_grads(
                    inputs.config,
                    inputs.params,
                    inputs.masks,
                    inputs.batch,
                )?;
                Some(Numerics {
                    loss: f64::from(loss),
                    grads,
                })
            } else {
                None
            };
            (cost, numerics)
        }
    };
    let report = StepReport {
        fidelity: mode.fidelity,
        numerics,
        cost,
    };
    Ok((report, trace))
}
