//! The operations of a GPT-2 training step, each as a plain forward function and its backward,
//! written as the textbook loops over `f64` matrices.
//!
//! Conventions: a row of an activation matrix is one token position `t = b * seq + s`; every
//! sum runs in increasing index order, starting from `0.0`, in `f64`. Parameters are read as
//! `f32` and widened. Nothing here knows about layers or masks beyond what it is handed.

use super::tensor::Mat;
use crate::model::{LayerNorm, Linear, Matrix};
use crate::sparsity::Mask;

// ---------------------------------------------------------------------------------------------
// Linear layers `Y = X W + b`, `W` stored `[in, out]`.

/// `Y[t, o] = sum_i X[t, i] W[i, o] + b[o]`.
pub(crate) fn linear_forward(x: &Mat, lin: &Linear) -> Mat {
    let w = &lin.weight;
    let mut y = Mat::zeros(x.rows, w.cols);
    for t in 0..x.rows {
        for o in 0..w.cols {
            let mut acc = 0.0;
            for i in 0..w.rows {
                acc += x.at(t, i) * f64::from(w.at(i, o));
            }
            y.set(t, o, acc + f64::from(lin.bias[o]));
        }
    }
    y
}

/// `dX[t, i] = sum_o dY[t, o] W[i, o]`.
pub(crate) fn linear_input_grad(dy: &Mat, w: &Matrix) -> Mat {
    let mut dx = Mat::zeros(dy.rows, w.rows);
    for t in 0..dy.rows {
        for i in 0..w.rows {
            let mut acc = 0.0;
            for o in 0..w.cols {
                acc += dy.at(t, o) * f64::from(w.at(i, o));
            }
            dx.set(t, i, acc);
        }
    }
    dx
}

/// Gradients of a linear layer's weight and bias.
pub(crate) struct LinearGrads {
    /// `[in, out]`; exactly zero where the mask prunes.
    pub weight: Mat,
    /// `[out]`.
    pub bias: Vec<f64>,
}

/// `dW[i, o] = sum_t X[t, i] dY[t, o]` at kept weights (pruned: exactly 0),
/// `db[o] = sum_t dY[t, o]`.
pub(crate) fn linear_param_grads(x: &Mat, dy: &Mat, mask: &Mask) -> LinearGrads {
    let mut weight = Mat::zeros(x.cols, dy.cols);
    for i in 0..x.cols {
        for o in 0..dy.cols {
            if mask.is_kept(i, o) {
                let mut acc = 0.0;
                for t in 0..x.rows {
                    acc += x.at(t, i) * dy.at(t, o);
                }
                weight.set(i, o, acc);
            }
        }
    }
    LinearGrads {
        weight,
        bias: column_sums(dy),
    }
}

/// `sum_t M[t, c]` for every column `c`.
pub(crate) fn column_sums(m: &Mat) -> Vec<f64> {
    (0..m.cols)
        .map(|c| (0..m.rows).map(|t| m.at(t, c)).sum())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// LayerNorm over the feature dimension, biased variance.

/// A LayerNorm's output and what its backward needs.
pub(crate) struct LayerNormOut {
    /// `gamma * xhat + beta`.
    pub y: Mat,
    /// `(x - mean) * rstd`.
    pub xhat: Mat,
    /// `1 / sqrt(var + eps)` per row, `var` the biased variance.
    pub rstd: Vec<f64>,
}

pub(crate) fn layer_norm_forward(x: &Mat, ln: &LayerNorm, eps: f64) -> LayerNormOut {
    let d = x.cols as f64;
    let mut y = Mat::zeros(x.rows, x.cols);
    let mut xhat = Mat::zeros(x.rows, x.cols);
    let mut rstd = Vec::with_capacity(x.rows);
    for t in 0..x.rows {
        let row = x.row(t);
        let mean = row.iter().sum::<f64>() / d;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d;
        let r = 1.0 / (var + eps).sqrt();
        for (i, v) in row.iter().enumerate() {
            let n = (v - mean) * r;
            xhat.set(t, i, n);
            y.set(t, i, f64::from(ln.gamma[i]) * n + f64::from(ln.beta[i]));
        }
        rstd.push(r);
    }
    LayerNormOut { y, xhat, rstd }
}

/// Gradients of a LayerNorm: input, scale, shift.
pub(crate) struct LayerNormGrads {
    pub x: Mat,
    pub gamma: Vec<f64>,
    pub beta: Vec<f64>,
}

/// With `g = dy * gamma`: `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`,
/// `dgamma = sum_t dy * xhat`, `dbeta = sum_t dy`.
pub(crate) fn layer_norm_backward(out: &LayerNormOut, ln: &LayerNorm, dy: &Mat) -> LayerNormGrads {
    let (rows, cols) = (dy.rows, dy.cols);
    let d = cols as f64;
    let mut dx = Mat::zeros(rows, cols);
    for t in 0..rows {
        let g: Vec<f64> = (0..cols)
            .map(|i| dy.at(t, i) * f64::from(ln.gamma[i]))
            .collect();
        let mean_g = g.iter().sum::<f64>() / d;
        let mean_g_xhat = (0..cols).map(|i| g[i] * out.xhat.at(t, i)).sum::<f64>() / d;
        for (i, gi) in g.iter().enumerate() {
            let value = out.rstd[t] * (gi - mean_g - out.xhat.at(t, i) * mean_g_xhat);
            dx.set(t, i, value);
        }
    }
    let gamma = (0..cols)
        .map(|i| (0..rows).map(|t| dy.at(t, i) * out.xhat.at(t, i)).sum())
        .collect();
    LayerNormGrads {
        x: dx,
        gamma,
        beta: column_sums(dy),
    }
}

// ---------------------------------------------------------------------------------------------
// GELU, GPT-2's tanh form.

const GELU_C: f64 = 0.044_715;

/// `sqrt(2 / pi)`.
fn gelu_k() -> f64 {
    (2.0 / std::f64::consts::PI).sqrt()
}

/// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
pub(crate) fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + (gelu_k() * (x + GELU_C * x * x * x)).tanh())
}

/// `d gelu / dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2)`
/// with `u = sqrt(2/pi) (x + 0.044715 x^3)`.
pub(crate) fn gelu_grad(x: f64) -> f64 {
    let th = (gelu_k() * (x + GELU_C * x * x * x)).tanh();
    0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * gelu_k() * (1.0 + 3.0 * GELU_C * x * x)
}

pub(crate) fn map(m: &Mat, f: impl Fn(f64) -> f64) -> Mat {
    Mat {
        rows: m.rows,
        cols: m.cols,
        data: m.data.iter().map(|&x| f(x)).collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// Causal multi-head self-attention (the part between the Q/K/V and output projections).

/// How the `[T, d]` Q, K, V matrices split into sequences and heads.
#[derive(Clone, Copy)]
pub(crate) struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// `1 / sqrt(head_dim)`, or 1 without `scale_attn_weights`.
    pub scale: f64,
}

impl AttentionShape {
    /// Row of token `s` of sequence `b`.
    fn row(&self, b: usize, s: usize) -> usize {
        b * self.seq + s
    }

    /// `sum_e A[row_a, h*hd + e] * B[row_b, h*hd + e]`: a dot product inside head `h`.
    fn head_dot(&self, a: &Mat, row_a: usize, b: &Mat, row_b: usize, h: usize) -> f64 {
        let base = h * self.head_dim;
        (0..self.head_dim)
            .map(|e| a.at(row_a, base + e) * b.at(row_b, base + e))
            .sum()
    }
}

/// Attention probabilities, one `[seq, seq]` matrix per `(b, h)` at index `b * heads + h`
/// (zero above the diagonal), and the context `ctx[t, h*hd + e] = sum_j P[i, j] V[j, h*hd + e]`.
pub(crate) fn attention_forward(q: &Mat, k: &Mat, v: &Mat, sh: AttentionShape) -> (Vec<Mat>, Mat) {
    let mut probs = Vec::with_capacity(sh.batch * sh.heads);
    let mut ctx = Mat::zeros(q.rows, q.cols);
    for b in 0..sh.batch {
        for h in 0..sh.heads {
            let p = causal_softmax_scores(q, k, b, h, sh);
            for i in 0..sh.seq {
                for e in 0..sh.head_dim {
                    let c = h * sh.head_dim + e;
                    let acc: f64 = (0..=i).map(|j| p.at(i, j) * v.at(sh.row(b, j), c)).sum();
                    ctx.set(sh.row(b, i), c, acc);
                }
            }
            probs.push(p);
        }
    }
    (probs, ctx)
}

/// `P[i, j] = softmax_{j <= i}(scale * q_i . k_j)`, 0 for `j > i`.
fn causal_softmax_scores(q: &Mat, k: &Mat, b: usize, h: usize, sh: AttentionShape) -> Mat {
    let mut p = Mat::zeros(sh.seq, sh.seq);
    for i in 0..sh.seq {
        let scores: Vec<f64> = (0..=i)
            .map(|j| sh.scale * sh.head_dot(q, sh.row(b, i), k, sh.row(b, j), h))
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = exps.iter().sum();
        for (j, e) in exps.iter().enumerate() {
            p.set(i, j, e / total);
        }
    }
    p
}

/// Gradients of attention with respect to Q, K, V, given `dctx`:
/// `dP[i,j] = dctx_i . v_j`, `dV_j = sum_i P[i,j] dctx_i`,
/// `dS[i,j] = P[i,j] (dP[i,j] - sum_j' P[i,j'] dP[i,j'])`,
/// `dQ_i = scale sum_j dS[i,j] k_j`, `dK_j = scale sum_i dS[i,j] q_i` (all within one head).
pub(crate) fn attention_backward(
    q: &Mat,
    k: &Mat,
    v: &Mat,
    probs: &[Mat],
    dctx: &Mat,
    sh: AttentionShape,
) -> (Mat, Mat, Mat) {
    let mut dq = Mat::zeros(q.rows, q.cols);
    let mut dk = Mat::zeros(k.rows, k.cols);
    let mut dv = Mat::zeros(v.rows, v.cols);
    for b in 0..sh.batch {
        for h in 0..sh.heads {
            let p = &probs[b * sh.heads + h];
            let ds = score_grads(p, v, dctx, b, h, sh);
            for i in 0..sh.seq {
                for j in 0..=i {
                    for e in 0..sh.head_dim {
                        let c = h * sh.head_dim + e;
                        let (ri, rj) = (sh.row(b, i), sh.row(b, j));
                        dv.add_at(rj, c, p.at(i, j) * dctx.at(ri, c));
                        dq.add_at(ri, c, sh.scale * ds.at(i, j) * k.at(rj, c));
                        dk.add_at(rj, c, sh.scale * ds.at(i, j) * q.at(ri, c));
                    }
                }
            }
        }
    }
    (dq, dk, dv)
}

/// Gradient with respect to the (scaled) scores `S = scale q k^T` through the causal softmax.
fn score_grads(p: &Mat, v: &Mat, dctx: &Mat, b: usize, h: usize, sh: AttentionShape) -> Mat {
    let mut ds = Mat::zeros(sh.seq, sh.seq);
    for i in 0..sh.seq {
        let dp: Vec<f64> = (0..=i)
            .map(|j| sh.head_dot(dctx, sh.row(b, i), v, sh.row(b, j), h))
            .collect();
        let weighted: f64 = (0..=i).map(|j| p.at(i, j) * dp[j]).sum();
        for (j, dpj) in dp.iter().enumerate() {
            ds.set(i, j, p.at(i, j) * (dpj - weighted));
        }
    }
    ds
}

// ---------------------------------------------------------------------------------------------
// Embeddings and the tied LM head.

/// `x[t] = wte[token[t]] + wpe[s]` for `t = b * seq + s`. Token ids must be validated.
pub(crate) fn embed(wte: &Matrix, wpe: &Matrix, tokens: &[u32], seq: usize) -> Mat {
    let mut x = Mat::zeros(tokens.len(), wte.cols);
    for (t, &id) in tokens.iter().enumerate() {
        let s = t % seq;
        for i in 0..wte.cols {
            let value = f64::from(wte.at(id as usize, i)) + f64::from(wpe.at(s, i));
            x.set(t, i, value);
        }
    }
    x
}

/// `logits[t, v] = sum_i x[t, i] wte[v, i]` (the LM head is `wte^T`).
pub(crate) fn lm_head_forward(x: &Mat, wte: &Matrix) -> Mat {
    let mut logits = Mat::zeros(x.rows, wte.rows);
    for t in 0..x.rows {
        for v in 0..wte.rows {
            let acc: f64 = (0..x.cols)
                .map(|i| x.at(t, i) * f64::from(wte.at(v, i)))
                .sum();
            logits.set(t, v, acc);
        }
    }
    logits
}

/// `(dx, dwte)` of the LM head: `dx[t, i] = sum_v dlogits[t, v] wte[v, i]`,
/// `dwte[v, i] = sum_t dlogits[t, v] x[t, i]`.
pub(crate) fn lm_head_backward(x: &Mat, wte: &Matrix, dlogits: &Mat) -> (Mat, Mat) {
    let mut dx = Mat::zeros(x.rows, x.cols);
    for t in 0..x.rows {
        for i in 0..x.cols {
            let acc: f64 = (0..wte.rows)
                .map(|v| dlogits.at(t, v) * f64::from(wte.at(v, i)))
                .sum();
            dx.set(t, i, acc);
        }
    }
    let mut dwte = Mat::zeros(wte.rows, wte.cols);
    for v in 0..wte.rows {
        for i in 0..wte.cols {
            let acc: f64 = (0..x.rows).map(|t| dlogits.at(t, v) * x.at(t, i)).sum();
            dwte.set(v, i, acc);
        }
    }
    (dx, dwte)
}

// ---------------------------------------------------------------------------------------------
// Next-token cross-entropy, mean over the `batch * (seq - 1)` predicted positions.

/// The predicted positions `(row, target id)`: every row but the last of each sequence and the
/// first `prefix` of each (prompt rows that predict nothing), whose target is the next token.
pub(crate) fn predicted_positions(
    tokens: &[u32],
    seq: usize,
    prefix: usize,
) -> Vec<(usize, usize)> {
    (0..tokens.len())
        .filter(|t| t % seq != seq - 1 && t % seq >= prefix)
        .map(|t| (t, tokens[t + 1] as usize))
        .collect()
}

/// `log sum_v exp(logits[t, v])`, computed around the row maximum.
fn log_sum_exp(row: &[f64]) -> f64 {
    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    max + row.iter().map(|l| (l - max).exp()).sum::<f64>().ln()
}

/// Mean over predicted positions of `logsumexp(logits[t]) - logits[t, target]`.
pub(crate) fn cross_entropy(logits: &Mat, tokens: &[u32], seq: usize, prefix: usize) -> f64 {
    let positions = predicted_positions(tokens, seq, prefix);
    let total: f64 = positions
        .iter()
        .map(|&(t, target)| log_sum_exp(logits.row(t)) - logits.at(t, target))
        .sum();
    total / positions.len() as f64
}

/// `dlogits[t, v] = (softmax(logits[t])[v] - [v == target]) / N` at predicted positions, 0 on
/// the last position of each sequence.
pub(crate) fn cross_entropy_backward(
    logits: &Mat,
    tokens: &[u32],
    seq: usize,
    prefix: usize,
) -> Mat {
    let positions = predicted_positions(tokens, seq, prefix);
    let n = positions.len() as f64;
    let mut d = Mat::zeros(logits.rows, logits.cols);
    for &(t, target) in &positions {
        let lse = log_sum_exp(logits.row(t));
        for v in 0..logits.cols {
            let indicator = if v == target { 1.0 } else { 0.0 };
            d.set(t, v, ((logits.at(t, v) - lse).exp() - indicator) / n);
        }
    }
    d
}
