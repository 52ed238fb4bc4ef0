//! Training runs on the simulated fabric: the MediSwift recipe's phases (sparse pre-training,
//! dense fine-tuning, prompt tuning), one optimizer step after another.
//!
//! Each step runs forward, loss and backward on the fabric ([`crate::runtime::simulate_step`],
//! exact or fast fidelity) and applies AdamW on the host, as weight streaming does: the weights
//! live on the host, stream in for every step and their gradients stream out. Batches come from a
//! token file in a seeded order ([`corpus`]); the learning rate follows [`schedule`].
//!
//! Key design decision: a phase is nothing but which masks the step runs with and which
//! parameters the optimizer may change. Sparse pre-training keeps one static mask for the whole
//! run (pruned weights zero, never updated); dense fine-tuning runs with no mask, so the pruned
//! weights (zero in the sparse checkpoint) get gradients and learn, and the step costs what a
//! dense step costs.
//!
//! Prompt tuning learns `P` vectors placed in front of every sequence ([`PromptVectors`]); the
//! step runs with [`GradientSet::PromptOnly`], so the fabric runs no weight-gradient kernel, and
//! only the vectors are updated (AdamW, no weight decay).
//!
//! A run can be continued where it stopped: [`state`] is what a checkpoint holds beside its
//! weights (AdamW's moments and step count, the schedule, the sampler's position, the phase, the
//! loss scale, the log so far), and [`Trainer::resume`] rebuilds the run from it, so that the
//! continued run computes the same bytes as one that never stopped.
//!
//! With dynamic loss scaling ([`loss_scale`], [`Trainer::dynamic_scale`]) an exact step whose
//! loss or gradients overflow is skipped instead of stopping the run: no weight, moment or prompt
//! changes and AdamW's step count (its bias correction's `t`) stays, while the run's step count
//! (the schedule's, the sampler's) moves on, as PyTorch's `GradScaler` skips `optimizer.step()`
//! while the loop still calls `scheduler.step()` and draws the next batch. The skipped step cost
//! its cycles and FLOPs: the fabric ran it.
//!
//! What it is not: a data loader, a tokenizer or a checkpoint writer (the CLI stages and writes
//! the files; [`state`] gives their contents and reads them back).

pub mod corpus;
pub mod loss_scale;
pub mod schedule;
pub mod state;

use wafersim_sim::FabricConfig;

use crate::compile::StepPlan;
use crate::model::{GptConfig, GptParams, Matrix};
use crate::reference::{AdamState, AdamW, Batch, ReferenceError};
use crate::runtime::{
    Fidelity, GradientSet, LossScale, Numerics, ReferenceCheck, RuntimeError, StepCost, StepInputs,
    StepMode, simulate_step,
};
use crate::sparsity::ModelMasks;

pub use corpus::{Corpus, CorpusError, Sampler};
pub use loss_scale::DynamicLossScale;
pub use schedule::LrSchedule;

/// A phase of the recipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrainPhase {
    /// Static masks, fixed for the run; pruned weights stay zero.
    SparsePretrain,
    /// No masks: every weight, the pruned ones (starting at zero) included, is trained.
    DenseFinetune,
    /// Learned prompt vectors in front of every sequence; the model is frozen.
    PromptTune,
}

impl TrainPhase {
    /// `sparse-pretrain`, `dense-finetune` or `prompt-tune`, as the CLI and reports name it.
    pub fn name(self) -> &'static str {
        match self {
            TrainPhase::SparsePretrain => "sparse-pretrain",
            TrainPhase::DenseFinetune => "dense-finetune",
            TrainPhase::PromptTune => "prompt-tune",
        }
    }
}

/// What can stop a training run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    #[error("step {step}: {source}")]
    Step {
        step: u64,
        #[source]
        source: RuntimeError,
    },
    #[error("step {step}: the optimizer: {source}")]
    Optimizer {
        step: u64,
        #[source]
        source: ReferenceError,
    },
    #[error("step {step}: the step computed no loss or gradients")]
    NoNumerics { step: u64 },
    /// The loss or a gradient overflowed: the step computed them from the weights (updated by the
    /// earlier steps) and the data, in the run's precision and with its loss scale.
    #[error(
        "step {step}: {what} is not finite ({value}{at}): the step overflowed with these weights and this data (nothing of this step was kept; with --dtype fp16 a smaller --loss-scale, or --loss-scale dynamic, may help{lr})",
        at = index.map_or(String::new(), |i| format!(" at flat index {i}")),
        lr = if *step > 1 { "; the earlier updates made these weights: a smaller --lr may too" } else { "" }
    )]
    NonFiniteStep {
        step: u64,
        /// `the loss`, or the gradient of a named tensor.
        what: String,
        value: f64,
        /// Where in the tensor (a gradient).
        index: Option<usize>,
    },
    /// Dynamic loss scaling met an overflow at its floor, a scale of 1: nothing lower to try.
    #[error(
        "step {step}: {what} is not finite ({value}{at}) at loss scale 1, the floor of dynamic loss scaling: the step overflows unscaled, so the run stops rather than skip on (nothing of this step was kept{lr})",
        at = index.map_or(String::new(), |i| format!(" at flat index {i}")),
        lr = if *step > 1 { "; the earlier updates made these weights: a smaller --lr may help" } else { "" }
    )]
    OverflowAtScaleOne {
        step: u64,
        what: String,
        value: f64,
        index: Option<usize>,
    },
    /// The update of finite gradients overflowed: the learning rate is too large.
    #[error(
        "step {step}: {what} is not finite ({value}); lower --lr (nothing of this step was kept)"
    )]
    NonFiniteUpdate { step: u64, what: String, value: f64 },
}

/// One line of `train.csv`: what one optimizer step computed and cost.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepRecord {
    /// 1-based step number.
    pub step: u64,
    /// The loss of the batch before the update (a skipped step's may be NaN or infinite; the
    /// state's JSON writes those as the strings `NaN`, `inf`, `-inf`).
    #[serde(with = "loss_json")]
    pub loss: f64,
    /// The learning rate of the update (of the schedule's step, if skipped).
    pub lr: f64,
    /// Matmul FLOPs executed on the fabric.
    pub flops: u64,
    /// Cycles of the step.
    pub cycles: u64,
    /// The power of two the step scaled its loss by (exact fidelity; `None` at the fast one,
    /// whose numerics take no scale). States written before the field existed read `None`.
    #[serde(default)]
    pub loss_scale: Option<f64>,
    /// The step's loss or gradients overflowed and dynamic loss scaling skipped its update.
    #[serde(default)]
    pub skipped: bool,
}

/// A loss in the state's JSON: a number, or (JSON has none) `NaN`, `inf`, `-inf` as strings.
mod loss_json {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(loss: &f64, serializer: S) -> Result<S::Ok, S::Error> {
        match *loss {
            l if l.is_finite() => serializer.serialize_f64(l),
            l if l.is_nan() => serializer.serialize_str("NaN"),
            l if l > 0.0 => serializer.serialize_str("inf"),
            _ => serializer.serialize_str("-inf"),
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Loss {
        Number(f64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
        match Loss::deserialize(deserializer)? {
            Loss::Number(l) => Ok(l),
            Loss::Text(t) => match t.as_str() {
                "NaN" => Ok(f64::NAN),
                "inf" => Ok(f64::INFINITY),
                "-inf" => Ok(f64::NEG_INFINITY),
                _ => Err(serde::de::Error::custom(format!(
                    "loss {t:?}: expected a number, \"NaN\", \"inf\" or \"-inf\""
                ))),
            },
        }
    }
}

/// The machine and the step shape a run is fixed to.
#[derive(Clone, Copy)]
pub struct RunShape<'a> {
    pub config: &'a GptConfig,
    pub fabric: &'a FabricConfig,
    pub plan: &'a StepPlan,
    pub fidelity: Fidelity,
    /// Loss scaling of the exact steps' backward pass (`LossScale::Auto`: none in fp32); a run
    /// with dynamic loss scaling ([`Trainer::dynamic_scale`]) uses its scale instead.
    pub loss_scale: LossScale,
}

/// A training run in progress: the weights, masks and optimizer state.
#[derive(Clone, Debug)]
pub struct Trainer {
    pub phase: TrainPhase,
    pub params: GptParams,
    pub masks: ModelMasks,
    pub schedule: LrSchedule,
    adam: AdamState,
    /// Prompt tuning: the prompt vectors `[P, d]` and their AdamW moments.
    pub prompt: Option<PromptVectors>,
    /// Steps taken.
    pub steps: u64,
    /// At the exact fidelity, the first applied (not skipped) step's loss and gradients against
    /// the CPU reference's (one reference pass per run: enough to catch arithmetic that cannot
    /// represent the model).
    pub first_check: Option<ReferenceCheck>,
    /// Dynamic loss scaling: the next exact step's scale, halved after an overflow (the step is
    /// skipped) and doubled after a window of clean steps. `None`: the run's fixed scale, and an
    /// overflow stops the run.
    pub dynamic_scale: Option<DynamicLossScale>,
}

/// Learned prompt vectors and their optimizer state.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptVectors {
    /// `[P, d]`.
    pub vectors: Matrix,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl PromptVectors {
    /// Vectors to learn, starting at `vectors`, moments zero.
    pub fn new(vectors: Matrix) -> Self {
        let n = vectors.data.len();
        Self {
            vectors,
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    /// Vectors with the moments of an earlier run (`None` unless both have one value per
    /// element of `vectors`).
    pub fn with_moments(vectors: Matrix, m: Vec<f32>, v: Vec<f32>) -> Option<Self> {
        let n = vectors.data.len();
        (m.len() == n && v.len() == n).then_some(Self { vectors, m, v })
    }

    /// AdamW's first and second moments of the vectors.
    pub fn moments(&self) -> (&[f32], &[f32]) {
        (&self.m, &self.v)
    }
}

impl Trainer {
    /// A run of `phase` from `params` with `masks` (pruned weights must already be zero).
    pub fn new(
        phase: TrainPhase,
        params: GptParams,
        masks: ModelMasks,
        schedule: LrSchedule,
    ) -> Self {
        Self {
            phase,
            adam: AdamState::new(&params),
            params,
            masks,
            schedule,
            first_check: None,
            prompt: None,
            steps: 0,
            dynamic_scale: None,
        }
    }

    /// A prompt-tuning run: `prompt` learned in front of every sequence, `params` frozen.
    pub fn prompt_tuning(
        params: GptParams,
        masks: ModelMasks,
        prompt: Matrix,
        schedule: LrSchedule,
    ) -> Self {
        let mut trainer = Self::new(TrainPhase::PromptTune, params, masks, schedule);
        trainer.prompt = Some(PromptVectors::new(prompt));
        trainer
    }

    /// A run continued after `steps` steps: its weights, masks, schedule, AdamW's moments (of
    /// the model, or, for prompt tuning, in `prompt`) as they were after its last step. The next
    /// step is step `steps + 1`, at the schedule's rate for it, with AdamW's bias correction at
    /// `t = steps + 1` (a run that skipped steps sets its count with [`Trainer::with_updates`]).
    pub fn resume(
        phase: TrainPhase,
        params: GptParams,
        masks: ModelMasks,
        schedule: LrSchedule,
        moments: Option<(GptParams, GptParams)>,
        prompt: Option<PromptVectors>,
        steps: u64,
    ) -> Self {
        let mut trainer = Self::new(phase, params, masks, schedule);
        if let Some((m, v)) = moments {
            trainer.adam = AdamState { m, v, t: steps };
        }
        trainer.adam.t = steps;
        trainer.prompt = prompt;
        trainer.steps = steps;
        trainer
    }

    /// AdamW's step count set to `updates`, the steps that were applied: a run with dynamic loss
    /// scaling that skipped steps has taken fewer updates than steps.
    pub fn with_updates(mut self, updates: u64) -> Self {
        self.adam.t = updates;
        self
    }

    /// Updates applied so far (AdamW's `t`; below [`Trainer::steps`] by the skipped steps).
    pub fn updates(&self) -> u64 {
        self.adam.t
    }

    /// AdamW's state of the model's parameters (zero moments in prompt tuning: the model is
    /// frozen).
    pub fn adam(&self) -> &AdamState {
        &self.adam
    }

    /// Which gradients this run's steps compute.
    pub fn gradients(&self) -> GradientSet {
        match self.phase {
            TrainPhase::PromptTune => GradientSet::PromptOnly,
            _ => GradientSet::All,
        }
    }

    fn inputs<'a>(&'a self, shape: RunShape<'a>, batch: &'a Batch) -> StepInputs<'a> {
        StepInputs {
            config: shape.config,
            params: &self.params,
            masks: &self.masks,
            batch,
            fabric: shape.fabric,
            plan: shape.plan,
            dense_baseline: false,
            prompt: self.prompt.as_ref().map(|p| &p.vectors),
            gradients: self.gradients(),
            loss_scale: shape.loss_scale,
        }
    }

    /// The cost of one step of this run on `batch` (no numerics, no update).
    pub fn cost(&self, shape: RunShape<'_>, batch: &Batch) -> Result<StepCost, RuntimeError> {
        costed(self.inputs(shape, batch), shape.fidelity)
    }

    /// The cost of one step on `batch` with every gradient computed, and with this run's
    /// gradients: for prompt tuning, what skipping the frozen weights' gradients saves.
    pub fn cost_with_all_gradients(
        &self,
        shape: RunShape<'_>,
        batch: &Batch,
    ) -> Result<(StepCost, StepCost), RuntimeError> {
        let run = self.inputs(shape, batch);
        let all = StepInputs {
            gradients: GradientSet::All,
            ..run
        };
        Ok((costed(all, shape.fidelity)?, costed(run, shape.fidelity)?))
    }

    /// One optimizer step on `batch`: the step on the fabric, then AdamW on the host. On error
    /// the weights and optimizer state are left as they were. With dynamic loss scaling, an exact
    /// step whose loss or gradients are not finite is skipped (its record says so): the weights,
    /// the moments, the prompt and AdamW's step count stay, the scale halves, and the run's step
    /// count moves on; at a scale of 1 it is [`TrainError::OverflowAtScaleOne`] instead.
    pub fn step(&mut self, shape: RunShape<'_>, batch: &Batch) -> Result<StepRecord, TrainError> {
        let step = self.steps + 1;
        let lr = self.schedule.at(self.steps);
        let exact = shape.fidelity == Fidelity::Exact;
        let dynamic = self.dynamic_scale.filter(|_| exact);
        let shape = RunShape {
            loss_scale: dynamic.map_or(shape.loss_scale, |d| d.loss_scale()),
            ..shape
        };
        let inputs = self.inputs(shape, batch);
        let loss_scale = exact.then(|| f64::from(inputs.resolved_loss_scale()));
        let mode = StepMode {
            fidelity: shape.fidelity,
            numerics: true,
            // The first update's step: step 1, unless dynamic scaling skipped steps before it.
            check: self.adam.t == 0 && self.first_check.is_none(),
        };
        let report =
            simulate_step(inputs, mode).map_err(|source| TrainError::Step { step, source })?;
        let numerics = report.numerics.ok_or(TrainError::NoNumerics { step })?;
        let mut record = StepRecord {
            step,
            loss: numerics.loss,
            lr,
            flops: report.cost.executed_matmul_flops(),
            cycles: report.cost.cycles(),
            loss_scale,
            skipped: false,
        };
        match (self.update(step, lr, &numerics), dynamic) {
            (Ok(()), _) => {
                if let Some(scale) = &mut self.dynamic_scale
                    && exact
                {
                    scale.after_clean();
                }
                if report.check.is_some() {
                    self.first_check = report.check;
                }
            }
            (Err(overflow @ TrainError::NonFiniteStep { .. }), Some(mut scale)) => {
                if scale.after_overflow().is_none() {
                    return Err(at_scale_one(overflow));
                }
                self.dynamic_scale = Some(scale);
                record.skipped = true;
            }
            (Err(e), _) => return Err(e),
        }
        self.steps = step;
        Ok(record)
    }

    /// AdamW's update of the trained tensors from the step's gradients, all or nothing: checked
    /// finite first ([`TrainError::NonFiniteStep`]), and the updated values after.
    fn update(&mut self, step: u64, lr: f64, numerics: &Numerics) -> Result<(), TrainError> {
        check_loss_finite(step, numerics.loss)?;
        let t = self.adam.t + 1;
        if let Some(prompt) = &self.prompt {
            let grad = numerics
                .prompt_grad
                .as_ref()
                .ok_or(TrainError::NoNumerics { step })?;
            check_gradient_finite(step, "the prompt", &grad.data)?;
            let mut next = prompt.clone();
            AdamW::new(lr)
                .step_tensor(
                    &mut next.vectors.data,
                    &grad.data,
                    &mut next.m,
                    &mut next.v,
                    t,
                    false,
                )
                .map_err(|source| TrainError::Optimizer { step, source })?;
            if let Some(v) = next.vectors.data.iter().find(|v| !v.is_finite()) {
                return Err(TrainError::NonFiniteUpdate {
                    step,
                    what: "an updated prompt vector".into(),
                    value: f64::from(*v),
                });
            }
            self.prompt = Some(next);
            self.adam.t = t;
            return Ok(());
        }
        for (name, values) in numerics.grads.tensors() {
            check_gradient_finite(step, &format!("`{name}`"), values)?;
        }
        let mut params = self.params.clone();
        let mut adam = self.adam.clone();
        AdamW::new(lr)
            .step(&mut params, &numerics.grads, &self.masks, &mut adam)
            .map_err(|source| TrainError::Optimizer { step, source })?;
        check_params_finite(step, &params)?;
        self.params = params;
        self.adam = adam;
        Ok(())
    }
}

/// The cycles and FLOPs of the step `inputs` describes at `fidelity`, without its numerics.
fn costed(inputs: StepInputs<'_>, fidelity: Fidelity) -> Result<StepCost, RuntimeError> {
    let mode = StepMode {
        fidelity,
        numerics: false,
        check: false,
    };
    Ok(simulate_step(inputs, mode)?.cost)
}

/// The overflow that dynamic loss scaling met at a scale of 1, as the error that stops the run.
fn at_scale_one(overflow: TrainError) -> TrainError {
    match overflow {
        TrainError::NonFiniteStep {
            step,
            what,
            value,
            index,
        } => TrainError::OverflowAtScaleOne {
            step,
            what,
            value,
            index,
        },
        other => other,
    }
}

fn check_loss_finite(step: u64, loss: f64) -> Result<(), TrainError> {
    if loss.is_finite() {
        Ok(())
    } else {
        Err(TrainError::NonFiniteStep {
            step,
            what: "the loss".into(),
            value: loss,
            index: None,
        })
    }
}

/// The gradient of `tensor` (named for the message) holds no NaN or infinity: checked before the
/// update, so that an overflow in the step is not blamed on the learning rate.
fn check_gradient_finite(step: u64, tensor: &str, grad: &[f32]) -> Result<(), TrainError> {
    match grad.iter().enumerate().find(|(_, g)| !g.is_finite()) {
        Some((index, value)) => Err(TrainError::NonFiniteStep {
            step,
            what: format!("the gradient of {tensor}"),
            value: f64::from(*value),
            index: Some(index),
        }),
        None => Ok(()),
    }
}

fn check_params_finite(step: u64, params: &GptParams) -> Result<(), TrainError> {
    for (name, values) in params.tensors() {
        if let Some(v) = values.iter().find(|v| !v.is_finite()) {
            return Err(TrainError::NonFiniteUpdate {
                step,
                what: format!("updated weight `{name}`"),
                value: f64::from(*v),
            });
        }
    }
    Ok(())
}
