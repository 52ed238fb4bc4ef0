//! The per-element FLOP convention for non-matmul work (LayerNorm, softmax, GELU, adds, loss).
//!
//! There is no standard count for these operations, so this module fixes one and documents it
//! (also in `docs/flops.md`). It is NOT comparable with PyTorch's `FlopCounterMode`, which
//! counts no non-matmul work at all. Rule: every elementwise arithmetic operation and every add
//! of a reduction over elements costs 1 FLOP (`exp`, `tanh` and a division included); a
//! reduction of `n` values counts `n` adds; per-row scalar work (the `1 / sqrt(var + eps)` of a
//! LayerNorm, the `log` of a softmax sum, picking the target logit) and selections (causal mask,
//! one-hot) are free. Backward splits into input-gradient (activations) and weight-gradient
//! (LayerNorm scale and shift, biases, embedding rows).

use super::{Dims, FlopError, OpKind, product};

/// `[forward, input_grad, weight_grad]` FLOPs per element of a non-matmul operation, or `None`
/// for a matmul. The element each figure applies to:
///
/// | op | element | forward | input-grad | weight-grad |
/// |---|---|---|---|---|
/// | LayerNorm (`ln_1`, `ln_2`, `ln_f`) | `T x d` | 7 | 8 | 3 |
/// | bias add | `T x N` | 1 | 0 | 1 |
/// | attention scale | `B x h x S x S` | 1 | 1 | 0 |
/// | softmax | `B x h x S x S` | 5 | 4 | 0 |
/// | GELU (tanh) | `T x d_ffn` | 9 | 18 | 0 |
/// | residual add | `T x d` | 1 | 1 | 0 |
/// | embedding (token + position) | `T x d` | 1 | 0 | 2 |
/// | cross-entropy | `B (S - 1) x V` | 4 | 3 | 0 |
///
/// The operations behind each figure:
/// - LayerNorm forward: sum for the mean, subtract it, square, sum for the variance, multiply by
///   `1/std`, multiply by `gamma`, add `beta` (7). Input-gradient: `g = dy gamma`, sum `g`,
///   `g xhat`, sum that, `xhat * mean(g xhat)`, two subtractions, multiply by `1/std` (8).
///   Weight-gradient: `dgamma += dy xhat` (2), `dbeta += dy` (1).
/// - Bias: the add (1); its gradient sums `dy` over tokens (1); no input-gradient work.
/// - Attention scale: multiply by `1/sqrt(head_dim)`, and the same on the gradient.
/// - Softmax forward: max, subtract, `exp`, sum, divide (5). Backward: `dy y`, sum, subtract,
///   multiply by `y` (4).
/// - GELU forward `0.5 x (1 + tanh(c (x + a x^3)))`: `x x`, `x^2 x`, `a x^3`, `+ x`, `c ()`,
///   `tanh`, `1 +`, `x ()`, `0.5 ()` (9). Backward recomputes `t = tanh(...)` (6), then
///   `c (1 + 3a x^2)` (3), `1 - t t` (2), `0.5 (1 + t)` (2), `0.5 x sech^2 inner'` (3), the sum
///   (1) and the product with `dy` (1): 18.
/// - Residual add: the add; backward adds the branch gradient into the skip gradient.
/// - Embedding: forward adds the position row to the token row; the weight-gradient scatter-adds
///   `dx` into the rows of `dwte` (accumulating onto the tied LM head's gradient, so no separate
///   `V x d` add) and of `dwpe` (2).
/// - Cross-entropy over the `V` logits of each position with a target (Hugging Face shifts the
///   labels, so `S - 1` per sequence): forward max, subtract, `exp`, sum (4); input-gradient
///   subtract the max, `exp`, multiply by `1 / (sum x rows)` (3).
pub fn flops_per_element(op: OpKind) -> Option<[u64; 3]> {
    let per_element = match op {
        OpKind::LayerNorm1 | OpKind::LayerNorm2 | OpKind::FinalLayerNorm => [7, 8, 3],
        OpKind::Bias(_) => [1, 0, 1],
        OpKind::AttnScale => [1, 1, 0],
        OpKind::Softmax => [5, 4, 0],
        OpKind::Gelu => [9, 18, 0],
        OpKind::ResidualAttn | OpKind::ResidualFfn => [1, 1, 0],
        OpKind::Embedding => [1, 0, 2],
        OpKind::CrossEntropy => [4, 3, 0],
        OpKind::Linear(_) | OpKind::AttnScores | OpKind::AttnValues | OpKind::LmHead => {
            return None;
        }
    };
    Some(per_element)
}

/// How many elements `op` works on (see the table of [`flops_per_element`]).
fn elements(dims: &Dims, op: OpKind) -> Result<u64, FlopError> {
    let token_rows = |width: u64| product("an elementwise operation", &[dims.tokens, width]);
    let scores = || {
        product(
            "the attention scores",
            &[dims.batch, dims.heads, dims.seq, dims.seq],
        )
    };
    match op {
        OpKind::Bias(kind) => token_rows(super::matrix_shape(&dims.config, kind).1),
        OpKind::AttnScale | OpKind::Softmax => scores(),
        OpKind::Gelu => token_rows(dims.config.n_inner as u64),
        OpKind::CrossEntropy => product("the loss", &[dims.loss_rows, dims.vocab]),
        _ => token_rows(dims.d),
    }
}

/// `[forward, input_grad, weight_grad]` FLOPs of a non-matmul `op` costing `per_element`.
pub(super) fn op_flops(
    dims: &Dims,
    op: OpKind,
    per_element: [u64; 3],
) -> Result<[u64; 3], FlopError> {
    let count = elements(dims, op)?;
    let mut flops = [0; 3];
    for (out, per) in flops.iter_mut().zip(per_element) {
        *out = product("an elementwise operation", &[count, per])?;
    }
    Ok(flops)
}
