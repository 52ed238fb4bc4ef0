//! Runs of several reference training steps: the oracle for a training run on the fabric.
//!
//! Step `i` computes the loss and gradients of `batches[i]` at the parameters left by step
//! `i - 1` and applies AdamW with learning rate `lrs[i]` (moments carried over), exactly as
//! [`super::train_step`] does one step. Nothing here is shared with the runtime's training loop.

use super::{AdamState, AdamW, Batch, ReferenceError, train_step};
use crate::model::{GptConfig, GptParams};
use crate::sparsity::ModelMasks;

/// What a reference run computed.
#[derive(Clone, Debug, PartialEq)]
pub struct RunOutput {
    /// The loss of each step, before its update.
    pub losses: Vec<f32>,
    /// The gradients of each step.
    pub grads: Vec<GptParams>,
    /// The parameters after the last step.
    pub params: GptParams,
}

/// `batches.len()` AdamW steps from `params`, step `i` at learning rate `lrs[i]` (the GPT-3
/// hyperparameters of [`AdamW::new`] otherwise).
pub fn train_run(
    config: &GptConfig,
    params: &GptParams,
    masks: &ModelMasks,
    batches: &[Batch],
    lrs: &[f64],
) -> Result<RunOutput, ReferenceError> {
    if lrs.len() != batches.len() {
        return Err(ReferenceError::Optimizer {
            field: "lrs",
            value: lrs.len() as f64,
            reason: "must give one learning rate per batch",
        });
    }
    let mut state = AdamState::new(params);
    let mut current = params.clone();
    let (mut losses, mut grads) = (Vec::new(), Vec::new());
    for (batch, &lr) in batches.iter().zip(lrs) {
        let out = train_step(config, &current, masks, batch, &AdamW::new(lr), &mut state)?;
        losses.push(out.loss);
        grads.push(out.grads);
        current = out.updated;
    }
    Ok(RunOutput {
        losses,
        grads,
        params: current,
    })
}
