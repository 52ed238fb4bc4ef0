//! Prompt tuning in the reference: `P` learned vectors in front of every sequence, the model
//! frozen, the gradient of the loss with respect to the vectors only.
//!
//! ```text
//! x[b, p]     = prompt[p] + wpe[p]            p < P
//! x[b, P + s] = wte[token[b, s]] + wpe[P + s]  s < S
//! loss = mean over positions P - 1 .. P + S - 2 of -log softmax(logits)[next token]
//! ```
//!
//! The last prompt position predicts the first token (Hugging Face PEFT's prompt tuning); the
//! others predict nothing. `d prompt[p] = sum over b of d x[b, p]`. Same numerics as the rest of
//! the reference (`f64`, one rounding at the end); it reuses the reference's own forward and
//! backward, nothing of the runtime.

use super::backward::backward_to_input;
use super::forward::forward_embedded;
use super::tensor::to_f32;
use super::{Batch, ReferenceError, check_inputs, ops};
use crate::model::{GptConfig, GptParams, Matrix};
use crate::sparsity::ModelMasks;

/// The loss of `batch` behind the prompt vectors `prompt` (`[P, d]`, `P >= 1`) and the gradient
/// of that loss with respect to them.
pub fn prompt_loss_and_grad(
    config: &GptConfig,
    params: &GptParams,
    prompt: &Matrix,
    batch: &Batch,
) -> Result<(f32, Matrix), ReferenceError> {
    check_inputs(config, params, batch)?;
    let p = prompt.rows;
    let shape_error = |expected: String| ReferenceError::Shape {
        role: "prompt",
        tensor: "prompt".into(),
        expected,
        got: format!("[{}, {}]", prompt.rows, prompt.cols),
    };
    if p == 0 || prompt.cols != config.n_embd || prompt.data.len() != p * prompt.cols {
        return Err(shape_error(format!("[P >= 1, {}]", config.n_embd)));
    }
    let long = Batch {
        batch: batch.batch,
        seq: p + batch.seq,
        tokens: behind_prompt(batch, p),
    };
    long.validate(config)?;
    let mut x = ops::embed(&params.wte, &params.wpe, &long.tokens, long.seq);
    for b in 0..batch.batch {
        for i in 0..p {
            for f in 0..prompt.cols {
                let value = f64::from(prompt.at(i, f)) + f64::from(params.wpe.at(i, f));
                x.set(b * long.seq + i, f, value);
            }
        }
    }
    let acts = forward_embedded(config, params, &long, x, p - 1);
    let dense = ModelMasks::dense(config);
    let (_, dx, _) = backward_to_input(config, params, &dense, &long, &acts);
    let mut grad = vec![0.0f64; p * prompt.cols];
    for b in 0..batch.batch {
        for i in 0..p {
            for f in 0..prompt.cols {
                grad[i * prompt.cols + f] += dx.at(b * long.seq + i, f);
            }
        }
    }
    let grad = Matrix {
        rows: p,
        cols: prompt.cols,
        data: to_f32(&grad),
    };
    Ok((acts.loss as f32, grad))
}

/// The tokens of `batch` with `p` placeholder ids (0) in front of each sequence.
fn behind_prompt(batch: &Batch, p: usize) -> Vec<u32> {
    batch
        .tokens
        .chunks_exact(batch.seq)
        .flat_map(|row| std::iter::repeat_n(0, p).chain(row.iter().copied()))
        .collect()
}
