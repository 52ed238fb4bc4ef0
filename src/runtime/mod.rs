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
//! A step runs as the plan's passes ([`crate::compile::StepPlan::passes`]): each pass is the
//! whole schedule over its own sequences, its records appended in order; the weight gradients
//! (and the loss) of the passes are summed, weighted by their share of the predicted tokens, as
//! a host accumulating gradients over micro-batches does. With the attention recomputed, the
//! backward pass of each block first reruns the attention's scores and softmax
//! (`attention_recompute`); only the fast fidelity can cost that ([`RuntimeError::Recompute`]).
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
mod loads;
mod record;
mod walk;

pub use record::{OpRecord, StepCost};

use wafersim_kernels::KernelError;
use wafersim_sim::FabricConfig;

use crate::compile::{Pass, StepPlan};
use crate::model::{GptConfig, GptParams};
use crate::reference::{self, Batch, ReferenceError};
use crate::sparsity::ModelMasks;

/// What costing a step needs: shapes, masks and token ids, no weights (the fast engine reads
/// nothing else, so a step of a billion-parameter model is costed without its parameters).
#[derive(Clone, Copy)]
pub struct CostInputs<'a> {
    pub config: &'a GptConfig,
    pub masks: &'a ModelMasks,
    pub batch: &'a Batch,
    pub fabric: &'a FabricConfig,
    pub plan: &'a StepPlan,
    /// Also time the sparse matrices' kernels with every weight streamed.
    pub dense_baseline: bool,
}

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

impl<'a> StepInputs<'a> {
    /// The part of the inputs costing reads.
    pub fn costing(&self) -> CostInputs<'a> {
        CostInputs {
            config: self.config,
            masks: self.masks,
            batch: self.batch,
            fabric: self.fabric,
            plan: self.plan,
            dense_baseline: self.dense_baseline,
        }
    }
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
    #[error(
        "the exact fidelity cannot recompute the attention probabilities (its attention backward reads stored ones), and even one sequence of {seq} tokens cannot keep them; use --fidelity fast, shorter sequences or a bigger fabric"
    )]
    Recompute { seq: usize },
    #[error("pass {pass} (sequences {first}..{end}): {reason}")]
    Pass {
        pass: usize,
        first: usize,
        end: usize,
        reason: String,
    },
}

/// Runs one training step on the exact engine: the fabric's loss and gradients and the cost,
/// pass by pass.
pub fn run_step(inputs: StepInputs<'_>) -> Result<StepRun, RuntimeError> {
    if inputs.plan.recompute_attention {
        return Err(RuntimeError::Recompute {
            seq: inputs.plan.seq,
        });
    }
    let passes = passes(inputs.costing())?;
    let single = passes.len() == 1;
    let total = inputs.plan.batch.max(1) as f64;
    let mut run = StepRun {
        loss: 0.0,
        grads: GptParams::zeros(inputs.config),
        cost: StepCost::default(),
    };
    for (pass, batch) in passes {
        let pass_inputs = StepInputs {
            batch: &batch,
            plan: &pass.plan,
            ..inputs
        };
        let mut engine = exact::ExactEngine::new(pass_inputs);
        let cost = walk::walk(&mut engine, pass_inputs.costing())?;
        run.cost.records.extend(cost.records);
        if single {
            run.loss = engine.loss;
            run.grads = engine.grads;
        } else {
            let share = pass.sequences.len() as f64 / total;
            run.loss += share * engine.loss;
            accumulate(&mut run.grads, &engine.grads, share as f32);
        }
    }
    Ok(run)
}

/// `sum += share * grads`, tensor by tensor.
fn accumulate(sum: &mut GptParams, grads: &GptParams, share: f32) {
    let grads = grads.tensors();
    for ((_, s), (_, g)) in sum.tensors_mut().into_iter().zip(grads) {
        for (s, g) in s.iter_mut().zip(g.iter()) {
            *s += share * g;
        }
    }
}

/// Each pass of the plan with its batch (the step's own when there is one pass).
fn passes(inputs: CostInputs<'_>) -> Result<Vec<(Pass, Batch)>, RuntimeError> {
    let seq = inputs.batch.seq;
    inputs
        .plan
        .passes()
        .into_iter()
        .enumerate()
        .map(|(p, pass)| {
            let tokens = inputs
                .batch
                .tokens
                .get(pass.sequences.start * seq..pass.sequences.end * seq)
                .unwrap_or_default()
                .to_vec();
            let batch =
                Batch::new(inputs.config, pass.sequences.len(), seq, tokens).map_err(|e| {
                    RuntimeError::Pass {
                        pass: p,
                        first: pass.sequences.start,
                        end: pass.sequences.end,
                        reason: e.to_string(),
                    }
                })?;
            Ok((pass, batch))
        })
        .collect()
}

/// Costs one training step on the fast engine, pass by pass, from shapes and masks only. The
/// passes of one plan share an engine (their kept-entry loads and the kernels' costs, which do
/// not depend on the tokens).
pub fn cost_step(inputs: CostInputs<'_>) -> Result<StepCost, RuntimeError> {
    let passes = passes(inputs)?;
    let mut cost = StepCost::default();
    let mut engine: Option<fast::FastEngine<'_>> = None;
    for (pass, batch) in &passes {
        let pass_inputs = CostInputs {
            batch,
            plan: &pass.plan,
            ..inputs
        };
        let engine = match &mut engine {
            Some(e) if e.plans(&pass.plan) => {
                e.next_pass(pass_inputs);
                e
            }
            _ => engine.insert(fast::FastEngine::new(pass_inputs)),
        };
        cost.records
            .extend(walk::walk(engine, pass_inputs)?.records);
    }
    Ok(cost)
}

/// Runs (exact) or costs (fast) one training step.
pub fn simulate_step(inputs: StepInputs<'_>, mode: StepMode) -> Result<StepReport, RuntimeError> {
    let (cost, numerics) = match mode.fidelity {
        Fidelity::Exact => {
            let run = run_step(inputs)?;
            let numerics = mode.numerics.then_some(Numerics {
                loss: run.loss,
                grads: run.grads,
            });
            (run.cost, numerics)
        }
        Fidelity::Fast => {
            let cost = cost_step(inputs.costing())?;
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
    Ok(StepReport {
        fidelity: mode.fidelity,
        numerics,
        cost,
    })
}
