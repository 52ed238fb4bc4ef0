//! The backward pass of the whole model: from the loss back to every parameter, in the reverse
//! order of [`super::forward`], using its stored [`Activations`].
//!
//! Gradients flow in `f64` and are rounded to `f32` once, when written into the returned
//! [`GptParams`]. Weight gradients of pruned entries are never computed: they are exactly 0.
//! `wte` collects two contributions, the LM head's and the embedding lookup's, added in `f64`.

use super::Batch;
use super::forward::{Activations, BlockActivations, attention_shape};
use super::ops::{self, AttentionShape, LayerNormGrads, LinearGrads};
use super::tensor::{Mat, to_f32};
use crate::model::{Block, GptConfig, GptParams, LayerNorm, Linear, SparseKind};
use crate::sparsity::{Mask, ModelMasks};

/// Gradients of the mean loss with respect to every parameter (validated inputs).
pub(crate) fn backward(
    config: &GptConfig,
    params: &GptParams,
    masks: &ModelMasks,
    batch: &Batch,
    acts: &Activations,
) -> GptParams {
    let (mut grads, dx, dwte_head) = backward_to_input(config, params, masks, batch, acts);
    let (dwte_embed, dwpe) = embedding_backward(&dx, batch, params);
    grads.wte.data = to_f32(&dwte_head.plus(&dwte_embed).data);
    grads.wpe.data = to_f32(&dwpe.data);
    grads
}

/// Gradients of every parameter but the embeddings (wte and wpe left zero), the gradient of the
/// embedded input `[T, d]` and the LM head's part of wte's gradient (in `f64`).
pub(crate) fn backward_to_input(
    config: &GptConfig,
    params: &GptParams,
    masks: &ModelMasks,
    batch: &Batch,
    acts: &Activations,
) -> (GptParams, Mat, Mat) {
    let shape = attention_shape(config, batch);
    let mut grads = GptParams::zeros(config);

    let dlogits = ops::cross_entropy_backward(&acts.logits, &batch.tokens, batch.seq, acts.prefix);
    let (d_ln_f_out, dwte_head) = ops::lm_head_backward(&acts.ln_f.y, &params.wte, &dlogits);
    let ln_f = ops::layer_norm_backward(&acts.ln_f, &params.ln_f, &d_ln_f_out);
    grads.ln_f = layer_norm_grads(&ln_f);

    let mut dx = ln_f.x;
    for (layer, block) in params.blocks.iter().enumerate().rev() {
        let block_masks = &masks.layers()[layer];
        let (dx_in, block_grads) =
            block_backward(block, block_masks, &acts.blocks[layer], &dx, shape);
        grads.blocks[layer] = block_grads;
        dx = dx_in;
    }

    (grads, dx, dwte_head)
}

/// Backward through one block, given the gradient of its output; returns the gradient of its
/// input and of its parameters.
fn block_backward(
    block: &Block,
    masks: &[Mask; 6],
    acts: &BlockActivations,
    d_out: &Mat,
    shape: AttentionShape,
) -> (Mat, Block) {
    let mask = |kind: SparseKind| &masks[kind.index()];

    // out = h + fc_proj(gelu(fc(ln_2(h))))
    let fc_proj = ops::linear_param_grads(&acts.fc_act, d_out, mask(SparseKind::FcProj));
    let d_fc_act = ops::linear_input_grad(d_out, &block.fc_proj.weight);
    let d_fc_pre = elementwise(&d_fc_act, &acts.fc_pre, ops::gelu_grad);
    let fc = ops::linear_param_grads(&acts.ln_2.y, &d_fc_pre, mask(SparseKind::Fc));
    let d_ln_2_out = ops::linear_input_grad(&d_fc_pre, &block.fc.weight);
    let ln_2 = ops::layer_norm_backward(&acts.ln_2, &block.ln_2, &d_ln_2_out);
    let d_mid = d_out.plus(&ln_2.x);

    // h = x + attn_proj(attn(ln_1(x)))
    let attn_proj = ops::linear_param_grads(&acts.ctx, &d_mid, mask(SparseKind::AttnProj));
    let d_ctx = ops::linear_input_grad(&d_mid, &block.attn_proj.weight);
    let (dq, dk, dv) =
        ops::attention_backward(&acts.q, &acts.k, &acts.v, &acts.probs, &d_ctx, shape);
    let a = &acts.ln_1.y;
    let q = ops::linear_param_grads(a, &dq, mask(SparseKind::Q));
    let k = ops::linear_param_grads(a, &dk, mask(SparseKind::K));
    let v = ops::linear_param_grads(a, &dv, mask(SparseKind::V));
    let d_ln_1_out = ops::linear_input_grad(&dq, &block.q.weight)
        .plus(&ops::linear_input_grad(&dk, &block.k.weight))
        .plus(&ops::linear_input_grad(&dv, &block.v.weight));
    let ln_1 = ops::layer_norm_backward(&acts.ln_1, &block.ln_1, &d_ln_1_out);
    let d_in = d_mid.plus(&ln_1.x);

    let grads = Block {
        ln_1: layer_norm_grads(&ln_1),
        q: linear_grads(&q),
        k: linear_grads(&k),
        v: linear_grads(&v),
        attn_proj: linear_grads(&attn_proj),
        ln_2: layer_norm_grads(&ln_2),
        fc: linear_grads(&fc),
        fc_proj: linear_grads(&fc_proj),
    };
    (d_in, grads)
}

/// `dy * f'(x)` element-wise.
fn elementwise(dy: &Mat, x: &Mat, derivative: fn(f64) -> f64) -> Mat {
    let data = dy
        .data
        .iter()
        .zip(&x.data)
        .map(|(g, &v)| g * derivative(v))
        .collect();
    Mat {
        rows: dy.rows,
        cols: dy.cols,
        data,
    }
}

/// Scatters the gradient of the embedded input back to the rows that were looked up:
/// `dwte[token[t]] += dx[t]`, `dwpe[s] += dx[t]`, in increasing `t`.
fn embedding_backward(dx: &Mat, batch: &Batch, params: &GptParams) -> (Mat, Mat) {
    let mut dwte = Mat::zeros(params.wte.rows, params.wte.cols);
    let mut dwpe = Mat::zeros(params.wpe.rows, params.wpe.cols);
    for (t, &id) in batch.tokens.iter().enumerate() {
        let s = t % batch.seq;
        for i in 0..dx.cols {
            dwte.add_at(id as usize, i, dx.at(t, i));
            dwpe.add_at(s, i, dx.at(t, i));
        }
    }
    (dwte, dwpe)
}

fn linear_grads(g: &LinearGrads) -> Linear {
    Linear {
        weight: g.weight.to_matrix(),
        bias: to_f32(&g.bias),
    }
}

fn layer_norm_grads(g: &LayerNormGrads) -> LayerNorm {
    LayerNorm {
        gamma: to_f32(&g.gamma),
        beta: to_f32(&g.beta),
    }
}
