//! Prompt vectors for `wafersim train --phase prompt-tune`: their initial values and their file.
//!
//! The file is a safetensors file with one f32 tensor `prompt` of shape `[P, d]` (what a run
//! writes as `prompt.safetensors`). Initial values are the token embeddings of the first `P` ids
//! of the data (`--prompt-init data`, the usual choice for prompt tuning) or `N(0, 0.02)` drawn
//! from the seed (`--prompt-init random`).

use std::path::Path;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use safetensors::{Dtype, SafeTensors};

use super::bad_input;
use crate::model::{GptParams, Matrix};
use crate::training::Corpus;

/// `len` new prompt vectors for a run: `N(0, 0.02)` from `seed` if `random`, else the token
/// embeddings of the data's first `len` ids.
pub fn initial_prompt(
    random: bool,
    corpus: &Corpus,
    params: &GptParams,
    len: usize,
    seed: u64,
) -> anyhow::Result<Matrix> {
    let d = params.wte.cols;
    if random {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(0x7072_6f6d); // "prom"
        let normal = Normal::new(0.0f32, 0.02).map_err(|e| anyhow::anyhow!("{e}"))?;
        let data = (0..len * d).map(|_| normal.sample(&mut rng)).collect();
        return Ok(Matrix {
            rows: len,
            cols: d,
            data,
        });
    }
    let ids = corpus.first_ids(len);
    if ids.len() < len {
        return Err(bad_input(
            "--prompt-len",
            anyhow::anyhow!(
                "the token file has only {} ids for {len} prompt vectors",
                ids.len()
            ),
        ));
    }
    let data = ids
        .iter()
        .flat_map(|&id| params.wte.row(id as usize).iter().copied())
        .collect();
    Ok(Matrix {
        rows: len,
        cols: d,
        data,
    })
}

/// Reads the `prompt` tensor `[P, d]` of a safetensors file.
pub fn read_prompt(path: &Path, d: usize) -> anyhow::Result<Matrix> {
    read_prompt_for("--prompt", path, d)
}

/// [`read_prompt`] of a file that `flag` leads to (errors name it: `--prompt PATH`, or
/// `--resume DIR/prompt.safetensors`).
pub fn read_prompt_for(flag: &str, path: &Path, d: usize) -> anyhow::Result<Matrix> {
    let what = || format!("{flag} {}", path.display());
    let bytes = std::fs::read(path).map_err(|e| bad_input(what(), e))?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| bad_input(what(), e))?;
    let tensor = file
        .tensor("prompt")
        .map_err(|e| bad_input(what(), anyhow::anyhow!("no tensor `prompt`: {e}")))?;
    let shape = tensor.shape();
    let ok = tensor.dtype() == Dtype::F32 && shape.len() == 2 && shape[1] == d && shape[0] >= 1;
    if !ok {
        return Err(bad_input(
            what(),
            anyhow::anyhow!(
                "tensor `prompt` is {:?} {:?}, expected F32 [P >= 1, {d}]",
                tensor.dtype(),
                shape
            ),
        ));
    }
    let data: Vec<f32> = tensor
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if let Some((index, value)) = data.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(bad_input(
            what(),
            anyhow::anyhow!(
                "tensor `prompt` has a non-finite value ({value}) at row {}, column {}",
                index / d,
                index % d
            ),
        ));
    }
    Ok(Matrix {
        rows: shape[0],
        cols: d,
        data,
    })
}

#[cfg(test)]
mod tests {
    use safetensors::tensor::TensorView;

    use super::*;

    fn write_prompt(path: &Path, values: &[f32], shape: Vec<usize>) {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = TensorView::new(Dtype::F32, shape, &bytes).unwrap();
        std::fs::write(
            path,
            safetensors::serialize([("prompt", view)], None).unwrap(),
        )
        .unwrap();
    }

    /// A NaN in the file is refused as bad input (exit 2), naming where it is; the finite file
    /// reads back as written.
    #[test]
    fn a_non_finite_prompt_is_refused_with_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prompt.safetensors");
        let mut values: Vec<f32> = (0..2 * 3).map(|i| i as f32 * 0.5).collect();
        write_prompt(&path, &values, vec![2, 3]);
        assert_eq!(read_prompt(&path, 3).unwrap().data, values);
        values[5] = f32::NAN;
        write_prompt(&path, &values, vec![2, 3]);
        let err = read_prompt(&path, 3).unwrap_err();
        assert!(err.downcast_ref::<super::super::BadInput>().is_some());
        let line = format!("{err:#}");
        assert!(
            line.contains("non-finite value (NaN) at row 1, column 2"),
            "{line}"
        );
    }
}
