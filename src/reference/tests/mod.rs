//! Tests of the reference training step, one file per kind of evidence: finite differences,
//! hand-derived cases, PyTorch pins, sparsity, input validation.

mod finite_diff;
mod hand;
mod sparse;
mod torch;
mod validation;

use super::*;
use crate::model::GptConfig;

/// The micro model of the finite-difference tests: 2 layers, d = 8, 2 heads, vocab 11.
fn micro_config() -> GptConfig {
    GptConfig {
        n_layer: 2,
        n_embd: 8,
        n_head: 2,
        n_positions: 6,
        vocab_size: 11,
        n_inner: 32,
        layer_norm_epsilon: 1e-5,
        scale_attn_weights: true,
    }
}

/// A fixed micro batch, B = 2, S = 5, using most of the vocabulary and a repeated token.
fn micro_batch(config: &GptConfig) -> Batch {
    Batch::new(config, 2, 5, vec![3, 7, 1, 10, 3, 0, 5, 5, 9, 2]).unwrap()
}
