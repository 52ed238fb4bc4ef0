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
//! a host accumulating gradients over micro-batches does. Where the plan keeps only the
//! attention's softmax statistics, the attention runs as the blocked kernels, whose backward
//! recomputes the probabilities block by block (its executed FMACs include that recompute's
//! `Q K^T`, checked and then recorded apart from the FLOP convention's).
//!
//! Cycles of a step are the sum of its kernels' cycles: kernels do not overlap. For the dense
//! baseline, the kernels of the six sparse matrices are timed a second time streaming every
//! weight, once per weight shape, and not for a matrix that keeps every weight (all other
//! kernels cost the same either way, since their cycles do not depend on the values). An exact
//! step's numerics can be measured against the CPU reference's ([`check_against_reference`]).
//! The optimizer runs on the host, as in weight streaming (see [`crate::reference::AdamW`]).
//!
//! An exact step scales its loss by a power of two before the backward pass ([`LossScale`]:
//! loss scaling, as fp16 training does) and divides the gradients it reads back by the same
//! power, which leaves `f32` values exact and lifts fp16's small gradients out of its subnormals.

mod attention;
mod backward;
mod check;
mod exact;
mod fast;
mod forward;
mod loads;
mod record;
mod walk;

pub use check::{ReferenceCheck, Tolerance, check_against_reference};
pub use record::{Op, OpRecord, StepCost};

use wafersim_kernels::{KernelError, Precision};
use wafersim_sim::{FabricConfig, Trace, TraceWindow};

use crate::compile::{Pass, StepPlan};
use crate::model::{GptConfig, GptParams, Matrix};
use crate::reference::{self, Batch, BatchError, ReferenceError};
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
    /// Also time the sparse matrices' kernels with every weight streamed (a matrix that keeps
    /// every weight is its own baseline and is not simulated again).
    pub dense_baseline: bool,
    /// Prompt vectors in front of every sequence (their values are not needed to cost them).
    pub prompt_len: usize,
    /// Which gradients the step computes.
    pub gradients: GradientSet,
}

impl CostInputs<'_> {
    /// Positions per sequence on the fabric: the prompt's and the batch's.
    pub fn seq(&self) -> usize {
        self.batch.seq + self.prompt_len
    }

    /// The sequences as the fabric sees them.
    pub(crate) fn sequences(&self) -> Sequences {
        let (p, s, vocab) = (self.prompt_len, self.batch.seq, self.config.vocab_size);
        let mut ids = Vec::with_capacity(self.batch.batch * (p + s));
        let mut targets = Vec::with_capacity(ids.capacity());
        for row in self.batch.tokens.chunks_exact(s) {
            ids.extend((0..p).map(|i| (vocab + i) as u32));
            ids.extend_from_slice(row);
            targets.extend(std::iter::repeat_n(0, p));
            targets.extend_from_slice(row);
        }
        Sequences {
            seq: p + s,
            unscored_prefix: p.saturating_sub(1),
            ids,
            targets,
        }
    }
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
    /// Also time the sparse matrices' kernels with every weight streamed (a matrix that keeps
    /// every weight is its own baseline and is not simulated again).
    pub dense_baseline: bool,
    /// Learned prompt vectors `[P, d]` in front of every sequence, or `None`. The plan must be
    /// made for `seq + P` positions ([`StepInputs::seq`]).
    pub prompt: Option<&'a Matrix>,
    /// Which gradients the step computes.
    pub gradients: GradientSet,
    /// The exact engine's loss scaling (the fast fidelity's numerics need none).
    pub loss_scale: LossScale,
}

/// Loss scaling of an exact step: the loss (and so every gradient) is multiplied by a power of
/// two `L` on the fabric and the gradients read back are divided by `L` on the host. With the
/// mean over `N` predicted positions every gradient shrinks by `N`, and in fp16 the smallest
/// fall into the subnormals (2^-24 to 2^-14), where they keep few bits or none: measured on the
/// tiny model with 16 x 16 tokens on 8 x 8 PEs, the worst gradient tensor is 9.4e-3 from the CPU
/// reference unscaled and 1.0e-3 scaled (`tests/loss_scale.rs`). In `f32` a power of two
/// changes no bit of the result while no value nears the ends of `f32`'s range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LossScale {
    /// fp32: none (1). fp16: the largest power of two not above the positions the smallest pass
    /// predicts, so that the logits' gradient, `L (softmax - onehot) / N`, stays within
    /// [-1, 1] while the mean no longer shrinks it.
    #[default]
    Auto,
    /// `2^exponent` at any precision, at most [`LossScale::MAX_EXPONENT`] (0: no scaling).
    Power(u8),
}

impl LossScale {
    /// The largest exponent the command line accepts (`2^24`). Whether a scale overflows fp16
    /// depends on the positions it offsets (the logits' gradient is about `L / N`).
    pub const MAX_EXPONENT: u8 = 24;

    /// The scale of a step planned as `plan` (for `prompt_len` prompt vectors and then the
    /// tokens of each sequence): [`LossScale::resolve`] on the positions its smallest pass
    /// predicts (every position of a sequence but the last, from the last prompt vector on).
    pub fn of_step(self, plan: &StepPlan, prompt_len: usize) -> f32 {
        2f32.powi(i32::from(self.exponent_of_step(plan, prompt_len)))
    }

    /// The exponent of [`LossScale::of_step`]'s power of two.
    pub fn exponent_of_step(self, plan: &StepPlan, prompt_len: usize) -> u8 {
        let unscored = prompt_len.saturating_sub(1);
        let per_sequence = plan.seq.saturating_sub(1 + unscored);
        let passes = plan.passes();
        let fewest = passes.iter().map(|p| p.sequences.len()).min().unwrap_or(0);
        self.resolve_exponent(plan.precision, fewest * per_sequence)
    }

    /// The scale of a step in `precision` whose smallest pass predicts `predicted` positions.
    pub fn resolve(self, precision: Precision, predicted: usize) -> f32 {
        2f32.powi(i32::from(self.resolve_exponent(precision, predicted)))
    }

    /// The exponent of [`LossScale::resolve`]'s power of two.
    fn resolve_exponent(self, precision: Precision, predicted: usize) -> u8 {
        match (self, precision) {
            (LossScale::Power(e), _) => e.min(Self::MAX_EXPONENT),
            (LossScale::Auto, Precision::F32) => 0,
            (LossScale::Auto, Precision::F16) => {
                predicted.max(1).ilog2().min(u32::from(Self::MAX_EXPONENT)) as u8
            }
        }
    }
}

/// Which gradients a step computes: what the optimizer will update.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GradientSet {
    /// Every parameter (and the prompt vectors, if any). At the fast fidelity with a prompt,
    /// the CPU reference gives the prompt's gradient only (the weight gradients read 0); the
    /// cycles and FLOPs are those of every gradient.
    #[default]
    All,
    /// The prompt vectors only: the model is frozen, so no weight-gradient kernel runs and the
    /// LayerNorm backwards compute no parameter gradient (none is computed on or leaves the
    /// wafer; of the embedding's scatter on the host, only the prompt rows are kept). The input
    /// gradients still run: they carry the gradient back to the prompt.
    PromptOnly,
}

impl StepInputs<'_> {
    /// Prompt vectors in front of each sequence.
    pub fn prompt_len(&self) -> usize {
        self.prompt.map_or(0, |p| p.rows)
    }

    /// Positions per sequence on the fabric: the prompt's and the batch's.
    pub fn seq(&self) -> usize {
        self.costing().seq()
    }

    /// The sequences as the fabric sees them.
    pub(crate) fn sequences(&self) -> Sequences {
        self.costing().sequences()
    }

    /// The loss scale the exact engine applies to this step ([`LossScale::of_step`]).
    pub fn resolved_loss_scale(&self) -> f32 {
        self.loss_scale.of_step(self.plan, self.prompt_len())
    }
}

/// The token rows of a step on the fabric: each sequence is its `P` prompt vectors, then its
/// tokens. The embedding looks the prompt rows up as rows `vocab..vocab + P` of the token table
/// extended by the prompt; the loss scores every position from the last prompt vector on (it
/// predicts the first token, as Hugging Face PEFT's prompt tuning does).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Sequences {
    /// Positions per sequence.
    pub seq: usize,
    /// Embedding rows: prompt `i` is `vocab + i`.
    pub ids: Vec<u32>,
    /// Targets for the loss: the tokens, 0 at the (never scored) prompt positions.
    pub targets: Vec<u32>,
    /// Positions of each sequence that predict nothing: all prompt positions but the last.
    pub unscored_prefix: usize,
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
            prompt_len: self.prompt_len(),
            gradients: self.gradients,
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
    /// Also measure an exact step's numerics against the CPU reference
    /// ([`check_against_reference`]; nothing to measure at the fast fidelity, whose numerics
    /// are the reference's, or without numerics).
    pub check: bool,
}

/// What a step computed and cost, on the exact engine.
#[derive(Clone, Debug)]
pub struct StepRun {
    /// Mean next-token cross-entropy, as the fabric computed it.
    pub loss: f64,
    /// Gradient of every parameter (pruned entries zero).
    pub grads: GptParams,
    /// Gradient of the prompt vectors, when there are any.
    pub prompt_grad: Option<Matrix>,
    pub cost: StepCost,
}

/// The loss and the gradients of a step.
#[derive(Clone, Debug)]
pub struct Numerics {
    /// Mean next-token cross-entropy.
    pub loss: f64,
    /// Gradient of every parameter (pruned entries zero); with [`GradientSet::PromptOnly`] the
    /// parameters' gradients are not computed and read 0.
    pub grads: GptParams,
    /// Gradient of the prompt vectors, `[P, d]`, when there are any.
    pub prompt_grad: Option<Matrix>,
}

/// What a step cost at a fidelity, and its numerics if they were asked for.
#[derive(Clone, Debug)]
pub struct StepReport {
    pub fidelity: Fidelity,
    /// From the fabric (exact) or the CPU reference (fast); `None` if not asked for.
    pub numerics: Option<Numerics>,
    pub cost: StepCost,
    /// The exact numerics against the CPU reference's, when [`StepMode::check`] asked for it.
    pub check: Option<ReferenceCheck>,
}

impl StepReport {
    /// A step costed from shapes alone ([`cost_step`]): no numerics, nothing checked.
    pub fn costed(fidelity: Fidelity, cost: StepCost) -> Self {
        StepReport {
            fidelity,
            numerics: None,
            cost,
            check: None,
        }
    }
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
    #[error("pass {pass} (sequences {first}..{end}): {source}")]
    Pass {
        pass: usize,
        first: usize,
        end: usize,
        #[source]
        source: BatchError,
    },
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

/// Runs one training step on the exact engine: the fabric's loss and gradients and the cost,
/// pass by pass.
pub fn run_step(inputs: StepInputs<'_>) -> Result<StepRun, RuntimeError> {
    run_exact(inputs, StepHooks::default()).map(|(run, _)| run)
}

/// [`run_step`] with `hooks` (progress and a trace window, which runs on across the passes).
fn run_exact(
    inputs: StepInputs<'_>,
    hooks: StepHooks<'_>,
) -> Result<(StepRun, Option<Trace>), RuntimeError> {
    let passes = passes(inputs.costing())?;
    let single = passes.len() == 1;
    let loss_scale = inputs.resolved_loss_scale();
    let total = inputs.plan.batch.max(1) as f64;
    let mut run = StepRun {
        loss: 0.0,
        grads: GptParams::zeros(inputs.config),
        prompt_grad: None,
        cost: StepCost::default(),
    };
    let mut trace = hooks.trace.map(exact::StepTrace::new);
    for (index, (pass, batch)) in passes.into_iter().enumerate() {
        let pass_inputs = StepInputs {
            batch: &batch,
            plan: &pass.plan,
            ..inputs
        };
        let mut engine = exact::ExactEngine::new(pass_inputs, loss_scale);
        engine.trace = trace.take().map(std::cell::RefCell::new);
        let cost = walk::walk(&mut engine, pass_inputs.costing(), index, hooks.progress)?;
        trace = engine.trace.take().map(std::cell::RefCell::into_inner);
        engine.unscale_gradients();
        run.cost.records.extend(cost.records);
        if single {
            run.loss = engine.loss;
            run.grads = engine.grads;
            run.prompt_grad = engine.prompt_grad;
        } else {
            let share = pass.sequences.len() as f64 / total;
            run.loss += share * engine.loss;
            accumulate(&mut run.grads, &engine.grads, share as f32);
            if let Some(g) = &engine.prompt_grad {
                let sum = run
                    .prompt_grad
                    .get_or_insert_with(|| Matrix::zeros(g.rows, g.cols));
                add_scaled(&mut sum.data, &g.data, share as f32);
            }
        }
    }
    Ok((run, trace.map(exact::StepTrace::finish)))
}

/// `sum += share * grads`, tensor by tensor.
fn accumulate(sum: &mut GptParams, grads: &GptParams, share: f32) {
    let grads = grads.tensors();
    for ((_, s), (_, g)) in sum.tensors_mut().into_iter().zip(grads) {
        add_scaled(s, g, share);
    }
}

fn add_scaled(sum: &mut [f32], values: &[f32], share: f32) {
    for (s, v) in sum.iter_mut().zip(values) {
        *s += share * v;
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
                Batch::new(inputs.config, pass.sequences.len(), seq, tokens).map_err(|source| {
                    RuntimeError::Pass {
                        pass: p,
                        first: pass.sequences.start,
                        end: pass.sequences.end,
                        source,
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
    cost_step_with(inputs, None)
}

/// [`cost_step`], handing each record to `on_record` as it is made.
fn cost_step_with(
    inputs: CostInputs<'_>,
    on_record: walk::OnRecord<'_>,
) -> Result<StepCost, RuntimeError> {
    let passes = passes(inputs)?;
    let mut cost = StepCost::default();
    let mut engine: Option<fast::FastEngine<'_>> = None;
    for (index, (pass, batch)) in passes.iter().enumerate() {
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
            .extend(walk::walk(engine, pass_inputs, index, on_record)?.records);
    }
    Ok(cost)
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
                prompt_grad: run.prompt_grad,
            });
            (run.cost, numerics)
        }
        Fidelity::Fast => {
            let cost = cost_step_with(inputs.costing(), hooks.progress)?;
            let numerics = if mode.numerics {
                Some(reference_numerics(inputs)?)
            } else {
                None
            };
            (cost, numerics)
        }
    };
    let check = match &numerics {
        Some(fabric) if mode.check && mode.fidelity == Fidelity::Exact => {
            Some(check_against_reference(inputs, fabric)?)
        }
        _ => None,
    };
    let report = StepReport {
        fidelity: mode.fidelity,
        numerics,
        cost,
        check,
    };
    Ok((report, trace))
}

/// The loss and gradients of `inputs` from the CPU reference (the fast fidelity's numerics).
fn reference_numerics(inputs: StepInputs<'_>) -> Result<Numerics, RuntimeError> {
    let (config, params, batch) = (inputs.config, inputs.params, inputs.batch);
    match inputs.prompt {
        None => {
            let (loss, grads) = reference::loss_and_grads(config, params, inputs.masks, batch)?;
            Ok(Numerics {
                loss: f64::from(loss),
                grads,
                prompt_grad: None,
            })
        }
        Some(prompt) => {
            let (loss, prompt_grad) =
                reference::prompt_loss_and_grad(config, params, prompt, batch)?;
            Ok(Numerics {
                loss: f64::from(loss),
                grads: GptParams::zeros(config),
                prompt_grad: Some(prompt_grad),
            })
        }
    }
}
