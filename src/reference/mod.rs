//! The reference training step: a plain, independent CPU implementation of one step of the GPT
//! in [`crate::model`] (forward, loss, backward, AdamW). It is the oracle the simulated fabric is
//! checked against (loss within 1e-5 relative, gradients within 1e-4 relative L2).
//!
//! The model (pre-LN GPT-2, Hugging Face `GPT2LMHeadModel` semantics):
//!
//! ```text
//! x   = wte[token] + wpe[position]
//! per block:  h = x + attn_proj(attn(ln_1(x)));   x = h + fc_proj(gelu_tanh(fc(ln_2(h))))
//! logits = ln_f(x) wte^T                           (tied LM head)
//! loss   = mean over the batch * (seq - 1) predicted positions of -log softmax(logits)[next]
//! ```
//!
//! with causal multi-head attention scaled by `1 / sqrt(head_dim)` (if `scale_attn_weights`),
//! LayerNorm with the biased variance and `layer_norm_epsilon`, and GELU's tanh form.
//!
//! Key design decision, numerics: parameters are `f32` (the shared [`GptParams`]), but every
//! activation, gradient and reduction is computed and kept in `f64`, in a fixed loop order;
//! results (loss, gradients, trace, updated weights) are rounded to `f32` once at the end. This
//! makes the oracle the more accurate side of any comparison with an `f32` implementation (its
//! own error is ~1e-7 relative: the final rounding), and makes it deterministic. It also lets the
//! finite-difference test check gradients against the very same code path to ~1e-7.
//!
//! What it is NOT: fast (textbook loops, no blocking, no threads), or sharing any numeric code
//! with `wafersim-kernels` or `wafersim-sim` (it only uses the [`crate::model`] types and
//! [`crate::sparsity`] masks). Sparsity here means: pruned weights must be zero in the inputs
//! (checked), their gradients are exactly zero, and AdamW keeps them and their moments at zero.

mod adamw;
mod backward;
mod batch;
mod check;
pub mod fixtures;
mod forward;
mod ops;
pub mod products;
mod prompt;
mod run;
mod tensor;

pub use adamw::{AdamState, AdamW};
pub use batch::{Batch, BatchError};
pub use forward::{ForwardTrace, LayerTrace};
pub use prompt::prompt_loss_and_grad;
pub use run::{RunOutput, train_run};

use crate::model::{GptConfig, GptParams, ModelError};
use crate::sparsity::{ModelMasks, SparsityError};

/// What can go wrong running the reference.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReferenceError {
    #[error(transparent)]
    Config(#[from] ModelError),
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error(transparent)]
    Mask(#[from] SparsityError),
    #[error("{role} has {got} blocks, expected {expected}")]
    LayerCount {
        role: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("{role} tensor `{tensor}`: expected {expected}, got {got}")]
    Shape {
        role: &'static str,
        tensor: String,
        expected: String,
        got: String,
    },
    #[error("weight h.{layer}.{kind}[{row}, {col}] = {value} is pruned by the mask but not zero")]
    UnmaskedWeight {
        layer: usize,
        kind: &'static str,
        row: usize,
        col: usize,
        value: f32,
    },
    #[error("AdamW {field} = {value} {reason}")]
    Optimizer {
        field: &'static str,
        value: f64,
        reason: &'static str,
    },
}

/// The result of [`train_step`].
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutput {
    /// Loss of the parameters before the update.
    pub loss: f32,
    /// Gradients of that loss (pruned weights: exactly 0).
    pub grads: GptParams,
    /// Parameters after one AdamW step.
    pub updated: GptParams,
}

/// Checks config, batch and parameter shapes.
fn check_inputs(
    config: &GptConfig,
    params: &GptParams,
    batch: &Batch,
) -> Result<(), ReferenceError> {
    config.validate()?;
    batch.validate(config)?;
    check::check_shapes(config, params, "params")
}

/// The mean next-token cross-entropy of `batch` under `params`.
pub fn forward_loss(
    config: &GptConfig,
    params: &GptParams,
    batch: &Batch,
) -> Result<f32, ReferenceError> {
    Ok(forward_loss_f64(config, params, batch)? as f32)
}

/// [`forward_loss`] before the final rounding (for finite-difference checks).
pub(crate) fn forward_loss_f64(
    config: &GptConfig,
    params: &GptParams,
    batch: &Batch,
) -> Result<f64, ReferenceError> {
    check_inputs(config, params, batch)?;
    Ok(forward::forward(config, params, batch).loss)
}

/// Every intermediate value of the forward pass, for layer-by-layer comparisons.
pub fn forward_trace(
    config: &GptConfig,
    params: &GptParams,
    batch: &Batch,
) -> Result<ForwardTrace, ReferenceError> {
    check_inputs(config, params, batch)?;
    let acts = forward::forward(config, params, batch);
    Ok(ForwardTrace::from_activations(&acts))
}

/// The loss and its gradient with respect to every parameter. Pruned weights must be zero in
/// `params` (else [`ReferenceError::UnmaskedWeight`]); their gradients are exactly zero.
pub fn loss_and_grads(
    config: &GptConfig,
    params: &GptParams,
    masks: &ModelMasks,
    batch: &Batch,
) -> Result<(f32, GptParams), ReferenceError> {
    check_inputs(config, params, batch)?;
    check::check_pruned_are_zero(params, masks)?;
    let acts = forward::forward(config, params, batch);
    let grads = backward::backward(config, params, masks, batch, &acts);
    Ok((acts.loss as f32, grads))
}

/// One training step: loss and gradients at `params`, then one AdamW step (advancing `state`).
pub fn train_step(
    config: &GptConfig,
    params: &GptParams,
    masks: &ModelMasks,
    batch: &Batch,
    opt: &AdamW,
    state: &mut AdamState,
) -> Result<StepOutput, ReferenceError> {
    opt.validate()?;
    let (loss, grads) = loss_and_grads(config, params, masks, batch)?;
    let mut updated = params.clone();
    opt.step(&mut updated, &grads, masks, state)?;
    Ok(StepOutput {
        loss,
        grads,
        updated,
    })
}

#[cfg(test)]
mod tests;
