//! The forward pass of the whole model: embeddings, pre-LN blocks, final LayerNorm, tied LM head,
//! loss. It keeps every intermediate (the [`Activations`]) for the backward pass, and can hand
//! them out rounded to `f32` as a [`ForwardTrace`] for layer-by-layer comparisons.

use super::Batch;
use super::ops::{self, AttentionShape, LayerNormOut};
use super::tensor::Mat;
use crate::model::{Block, GptConfig, GptParams, Matrix};

/// Everything one block computed, in `f64`.
pub(crate) struct BlockActivations {
    pub ln_1: LayerNormOut,
    pub q: Mat,
    pub k: Mat,
    pub v: Mat,
    pub probs: Vec<Mat>,
    pub ctx: Mat,
    pub attn_out: Mat,
    /// `h = x + attn_out`.
    pub residual_mid: Mat,
    pub ln_2: LayerNormOut,
    pub fc_pre: Mat,
    pub fc_act: Mat,
    pub ffn_out: Mat,
    /// `h + ffn_out`: the block's output.
    pub residual_out: Mat,
}

/// Everything the forward pass computed, in `f64`.
pub(crate) struct Activations {
    pub embeddings: Mat,
    pub blocks: Vec<BlockActivations>,
    pub ln_f: LayerNormOut,
    pub logits: Mat,
    pub loss: f64,
    /// Leading positions of each sequence the loss leaves out.
    pub prefix: usize,
}

/// How attention splits `[T, d]` for this config and batch.
pub(crate) fn attention_shape(config: &GptConfig, batch: &Batch) -> AttentionShape {
    let head_dim = config.head_dim();
    let scale = if config.scale_attn_weights {
        1.0 / (head_dim as f64).sqrt()
    } else {
        1.0
    };
    AttentionShape {
        batch: batch.batch,
        seq: batch.seq,
        heads: config.n_head,
        head_dim,
        scale,
    }
}

/// Runs the model on validated inputs (shapes checked by the caller).
pub(crate) fn forward(config: &GptConfig, params: &GptParams, batch: &Batch) -> Activations {
    let embeddings = ops::embed(&params.wte, &params.wpe, &batch.tokens, batch.seq);
    forward_embedded(config, params, batch, embeddings, 0)
}

/// Runs the model from its embedded input `embeddings` (`[T, d]`); the loss leaves out the
/// first `prefix` positions of each sequence (see [`ops::predicted_positions`]).
pub(crate) fn forward_embedded(
    config: &GptConfig,
    params: &GptParams,
    batch: &Batch,
    embeddings: Mat,
    prefix: usize,
) -> Activations {
    let eps = f64::from(config.layer_norm_epsilon);
    let shape = attention_shape(config, batch);
    let mut blocks: Vec<BlockActivations> = Vec::with_capacity(params.blocks.len());
    for block in &params.blocks {
        let x = blocks.last().map_or(&embeddings, |b| &b.residual_out);
        let out = block_forward(x, block, eps, shape);
        blocks.push(out);
    }
    let x = blocks.last().map_or(&embeddings, |b| &b.residual_out);
    let ln_f = ops::layer_norm_forward(x, &params.ln_f, eps);
    let logits = ops::lm_head_forward(&ln_f.y, &params.wte);
    let loss = ops::cross_entropy(&logits, &batch.tokens, batch.seq, prefix);
    Activations {
        embeddings,
        blocks,
        ln_f,
        logits,
        loss,
        prefix,
    }
}

/// `h = x + attn_proj(attn(ln_1(x)))`, `out = h + fc_proj(gelu(fc(ln_2(h))))`.
fn block_forward(x: &Mat, block: &Block, eps: f64, shape: AttentionShape) -> BlockActivations {
    let ln_1 = ops::layer_norm_forward(x, &block.ln_1, eps);
    let q = ops::linear_forward(&ln_1.y, &block.q);
    let k = ops::linear_forward(&ln_1.y, &block.k);
    let v = ops::linear_forward(&ln_1.y, &block.v);
    let (probs, ctx) = ops::attention_forward(&q, &k, &v, shape);
    let attn_out = ops::linear_forward(&ctx, &block.attn_proj);
    let residual_mid = x.plus(&attn_out);
    let ln_2 = ops::layer_norm_forward(&residual_mid, &block.ln_2, eps);
    let fc_pre = ops::linear_forward(&ln_2.y, &block.fc);
    let fc_act = ops::map(&fc_pre, ops::gelu);
    let ffn_out = ops::linear_forward(&fc_act, &block.fc_proj);
    let residual_out = residual_mid.plus(&ffn_out);
    BlockActivations {
        ln_1,
        q,
        k,
        v,
        probs,
        ctx,
        attn_out,
        residual_mid,
        ln_2,
        fc_pre,
        fc_act,
        ffn_out,
        residual_out,
    }
}

/// The intermediate values of one block, rounded to `f32`. Matrices are `[T, width]` with row
/// `t = b * seq + s`.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerTrace {
    /// `ln_1(x)`, `[T, d]`.
    pub ln_1: Matrix,
    /// Query, key and value projections, `[T, d]`; head `h` is columns `h*hd .. (h+1)*hd`.
    pub q: Matrix,
    pub k: Matrix,
    pub v: Matrix,
    /// Attention probabilities, one `[seq, seq]` matrix per `(b, h)` at index
    /// `b * n_head + h`; row `i` is the query position, zero above the diagonal.
    pub attn_probs: Vec<Matrix>,
    /// Attention output before the projection (heads concatenated), `[T, d]`.
    pub attn_context: Matrix,
    /// After the output projection, `[T, d]`.
    pub attn_out: Matrix,
    /// `x + attn_out`, `[T, d]`.
    pub residual_mid: Matrix,
    /// `ln_2(residual_mid)`, `[T, d]`.
    pub ln_2: Matrix,
    /// FFN pre-activation `ln_2 W_fc + b_fc`, `[T, n_inner]`.
    pub fc_pre: Matrix,
    /// `gelu(fc_pre)`, `[T, n_inner]`.
    pub fc_act: Matrix,
    /// `fc_act W_fc_proj + b`, `[T, d]`.
    pub ffn_out: Matrix,
    /// The block's output `residual_mid + ffn_out`, `[T, d]`.
    pub residual_out: Matrix,
}

/// Every intermediate value of the forward pass, rounded to `f32` (computed in `f64`).
#[derive(Clone, Debug, PartialEq)]
pub struct ForwardTrace {
    /// `wte[token] + wpe[position]`, `[T, d]`.
    pub embeddings: Matrix,
    pub layers: Vec<LayerTrace>,
    /// Final LayerNorm output, `[T, d]`.
    pub ln_f: Matrix,
    /// `ln_f wte^T`, `[T, vocab]`.
    pub logits: Matrix,
    /// Mean next-token cross-entropy.
    pub loss: f32,
}

impl ForwardTrace {
    pub(crate) fn from_activations(acts: &Activations) -> Self {
        Self {
            embeddings: acts.embeddings.to_matrix(),
            layers: acts.blocks.iter().map(layer_trace).collect(),
            ln_f: acts.ln_f.y.to_matrix(),
            logits: acts.logits.to_matrix(),
            loss: acts.loss as f32,
        }
    }
}

fn layer_trace(b: &BlockActivations) -> LayerTrace {
    LayerTrace {
        ln_1: b.ln_1.y.to_matrix(),
        q: b.q.to_matrix(),
        k: b.k.to_matrix(),
        v: b.v.to_matrix(),
        attn_probs: b.probs.iter().map(Mat::to_matrix).collect(),
        attn_context: b.ctx.to_matrix(),
        attn_out: b.attn_out.to_matrix(),
        residual_mid: b.residual_mid.to_matrix(),
        ln_2: b.ln_2.y.to_matrix(),
        fc_pre: b.fc_pre.to_matrix(),
        fc_act: b.fc_act.to_matrix(),
        ffn_out: b.ffn_out.to_matrix(),
        residual_out: b.residual_out.to_matrix(),
    }
}
