//! Deterministic model weights and token batches defined by a closed formula, so that another
//! implementation (PyTorch in `scripts/torch_reference.py`, or a later fabric test) can build
//! the very same inputs without sharing an RNG.
//!
//! The formula, for the tensor at position `k` of [`GptParams::tensors`] and its row-major flat
//! element index `i` (both as `f64`):
//!
//! ```text
//! a = 0.37 * i + 0.011 * i * i + 0.71 * k + 0.13        (evaluated left to right in f64)
//! LayerNorm scales (ln_1/ln_2/ln_f .weight): 1 + 0.2 * sin(a)
//! every other tensor:                            0.2 * sin(a)
//! ```
//!
//! rounded to `f32`. The quadratic term keeps the weight matrices from being rank 2 (a plain
//! `sin(c * i + phase)` over a row-major matrix is `sin(alpha_r + beta_c)`, rank 2).
//! Tokens: `tokens[b * seq + s] = (7 b + 5 s^2 + 3 s + 1) mod vocab_size`.

use super::{Batch, BatchError};
use crate::model::{GptConfig, GptParams};

/// The formula's value for element `i` of tensor number `k` (see the module doc).
pub fn sine_value(k: usize, i: usize, layer_norm_scale: bool) -> f32 {
    let (k, x) = (k as f64, i as f64);
    let a = 0.37 * x + 0.011 * x * x + 0.71 * k + 0.13;
    let offset = if layer_norm_scale { 1.0 } else { 0.0 };
    (offset + 0.2 * a.sin()) as f32
}

/// Parameters for `config` filled by the formula of the module doc.
pub fn sine_params(config: &GptConfig) -> GptParams {
    let mut params = GptParams::zeros(config);
    for (k, (name, tensor)) in params.tensors_mut().into_iter().enumerate() {
        let layer_norm_scale = name.contains("ln_") && name.ends_with(".weight");
        for (i, w) in tensor.iter_mut().enumerate() {
            *w = sine_value(k, i, layer_norm_scale);
        }
    }
    params
}

/// The batch `tokens[b * seq + s] = (7 b + 5 s^2 + 3 s + 1) mod vocab_size`, validated.
pub fn formula_batch(config: &GptConfig, batch: usize, seq: usize) -> Result<Batch, BatchError> {
    let vocab = config.vocab_size as u64;
    let tokens = (0..batch as u64)
        .flat_map(|b| (0..seq as u64).map(move |s| (7 * b + 5 * s * s + 3 * s + 1) % vocab.max(1)))
        .map(|id| id as u32)
        .collect();
    Batch::new(config, batch, seq, tokens)
}
