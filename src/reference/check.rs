//! Input checks run before any arithmetic, so the numeric code can index freely: parameter
//! shapes against the config, masks against the parameters, pruned weights being zero.

use super::ReferenceError;
use crate::model::{GptConfig, GptParams, Matrix, SparseKind};
use crate::sparsity::ModelMasks;

/// Checks every tensor of `params` (called `role` in errors: "params", "grads", "adam m", ...)
/// against the shapes `config` implies.
pub(crate) fn check_shapes(
    config: &GptConfig,
    params: &GptParams,
    role: &'static str,
) -> Result<(), ReferenceError> {
    if params.blocks.len() != config.n_layer {
        return Err(ReferenceError::LayerCount {
            role,
            expected: config.n_layer,
            got: params.blocks.len(),
        });
    }
    for (name, matrix, rows, cols) in expected_matrices(config, params) {
        check_matrix(role, &name, matrix, rows, cols)?;
    }
    for (name, vector, len) in expected_vectors(config, params) {
        if vector.len() != len {
            return Err(ReferenceError::Shape {
                role,
                tensor: name,
                expected: format!("[{len}]"),
                got: format!("[{}]", vector.len()),
            });
        }
    }
    Ok(())
}

fn check_matrix(
    role: &'static str,
    name: &str,
    m: &Matrix,
    rows: usize,
    cols: usize,
) -> Result<(), ReferenceError> {
    if m.rows != rows || m.cols != cols || m.data.len() != rows * cols {
        return Err(ReferenceError::Shape {
            role,
            tensor: name.to_string(),
            expected: format!("[{rows}, {cols}]"),
            got: format!("[{}, {}] with {} values", m.rows, m.cols, m.data.len()),
        });
    }
    Ok(())
}

/// Every matrix with its name and expected `(rows, cols)`.
fn expected_matrices<'a>(
    c: &GptConfig,
    p: &'a GptParams,
) -> Vec<(String, &'a Matrix, usize, usize)> {
    let (d, f) = (c.n_embd, c.n_inner);
    let mut out = vec![
        ("wte.weight".to_string(), &p.wte, c.vocab_size, d),
        ("wpe.weight".to_string(), &p.wpe, c.n_positions, d),
    ];
    for (l, block) in p.blocks.iter().enumerate() {
        for kind in SparseKind::ALL {
            let (rows, cols) = match kind {
                SparseKind::Fc => (d, f),
                SparseKind::FcProj => (f, d),
                _ => (d, d),
            };
            let name = format!("h.{l}.{}.weight", hf_name(kind));
            out.push((name, &block.linear(kind).weight, rows, cols));
        }
    }
    out
}

/// Every vector (biases, LayerNorm scales and shifts) with its name and expected length.
fn expected_vectors<'a>(c: &GptConfig, p: &'a GptParams) -> Vec<(String, &'a [f32], usize)> {
    let d = c.n_embd;
    let mut out: Vec<(String, &[f32], usize)> = Vec::new();
    for (l, block) in p.blocks.iter().enumerate() {
        for (ln_name, ln) in [("ln_1", &block.ln_1), ("ln_2", &block.ln_2)] {
            out.push((format!("h.{l}.{ln_name}.weight"), &ln.gamma, d));
            out.push((format!("h.{l}.{ln_name}.bias"), &ln.beta, d));
        }
        for kind in SparseKind::ALL {
            let len = if kind == SparseKind::Fc { c.n_inner } else { d };
            let name = format!("h.{l}.{}.bias", hf_name(kind));
            out.push((name, &block.linear(kind).bias, len));
        }
    }
    out.push(("ln_f.weight".into(), &p.ln_f.gamma, d));
    out.push(("ln_f.bias".into(), &p.ln_f.beta, d));
    out
}

/// The tensor name of `kind` as [`GptParams::tensors`] spells it (without `.weight`).
fn hf_name(kind: SparseKind) -> &'static str {
    match kind {
        SparseKind::Q => "attn.q",
        SparseKind::K => "attn.k",
        SparseKind::V => "attn.v",
        SparseKind::AttnProj => "attn.c_proj",
        SparseKind::Fc => "mlp.c_fc",
        SparseKind::FcProj => "mlp.c_proj",
    }
}

/// Refuses a pruned weight that is not zero: the fabric never sees it, so computing with it
/// would make the oracle answer a different question.
pub(crate) fn check_pruned_are_zero(
    params: &GptParams,
    masks: &ModelMasks,
) -> Result<(), ReferenceError> {
    masks.check_matches(params)?;
    for (layer, (block, block_masks)) in params.blocks.iter().zip(masks.layers()).enumerate() {
        for kind in SparseKind::ALL {
            let w = &block.linear(kind).weight;
            let keep = block_masks[kind.index()].keep();
            let stray = w.data.iter().zip(&keep).position(|(&x, &k)| !k && x != 0.0);
            if let Some(i) = stray {
                return Err(ReferenceError::UnmaskedWeight {
                    layer,
                    kind: kind.name(),
                    row: i / w.cols,
                    col: i % w.cols,
                    value: w.data[i],
                });
            }
        }
    }
    Ok(())
}

/// Checks that `other` (called `role` in errors) has exactly the tensors of `params`: same
/// names, same lengths, same order.
pub(crate) fn check_same_layout(
    params: &GptParams,
    other: &GptParams,
    role: &'static str,
) -> Result<(), ReferenceError> {
    if params.blocks.len() != other.blocks.len() {
        return Err(ReferenceError::LayerCount {
            role,
            expected: params.blocks.len(),
            got: other.blocks.len(),
        });
    }
    for ((name, want), (_, got)) in params.tensors().iter().zip(other.tensors()) {
        if want.len() != got.len() {
            return Err(ReferenceError::Shape {
                role,
                tensor: name.clone(),
                expected: format!("{} values", want.len()),
                got: format!("{} values", got.len()),
            });
        }
    }
    Ok(())
}
