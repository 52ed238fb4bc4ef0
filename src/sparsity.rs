//! Static unstructured sparsity masks: which weights of the six sparsified matrices of every block
//! are pruned (DESIGN.md section 4, the MediSwift / SPDF recipe).
//!
//! What is sparsified: Q, K, V, the attention output projection and both FFN matrices of every
//! block ([`SparseKind::ALL`]). Everything else (embeddings, the tied LM head, LayerNorms, biases)
//! is dense and has no mask.
//!
//! The mask rule, which is part of the reproducibility contract:
//! - a matrix with `numel` weights at sparsity `s` has exactly [`pruned_count`]`(numel, s)` =
//!   `round(s * numel)` zeros: the `f64` product rounded half away from zero (`f64::round`), so
//!   `numel = 10, s = 0.25` prunes 3;
//! - the positions are `rand::seq::index::sample(rng, numel, zeros)` over the row-major flat
//!   index, with `rng = ChaCha8Rng::seed_from_u64(seed)` switched to stream
//!   `6 * layer + kind.index()`. One stream per matrix means a mask depends only on the seed, its
//!   layer, its kind and its own shape: never on other matrices, thread count or drawing order.
//!
//! Not here: applying masks to arithmetic (the reference and the fabric do that), any dynamic
//! sparsity (masks are static for the whole run), structured patterns.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::model::{GptConfig, GptParams, SparseKind};

/// What can go wrong choosing or applying masks.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SparsityError {
    #[error("sparsity {value} is not a fraction in [0, 1)")]
    OutOfRange { value: f64 },
    #[error("sparsity \"{text}\" is not a number")]
    NotANumber { text: String },
    #[error("mask has {got} entries, a {rows} x {cols} matrix needs {expected}")]
    KeepLength {
        rows: usize,
        cols: usize,
        expected: usize,
        got: usize,
    },
    #[error("masks cover {masks} layers but the model has {model}")]
    LayerCount { masks: usize, model: usize },
    #[error(
        "mask of layer {layer} `{kind}` is {mask_rows} x {mask_cols}, the weight is {weight_rows} x {weight_cols}"
    )]
    ShapeMismatch {
        layer: usize,
        kind: &'static str,
        mask_rows: usize,
        mask_cols: usize,
        weight_rows: usize,
        weight_cols: usize,
    },
}

/// Checks a sparsity level: `0 <= s < 1`; NaN, negative values and `s >= 1` are refused.
pub fn validate(sparsity: f64) -> Result<f64, SparsityError> {
    if (0.0..1.0).contains(&sparsity) {
        Ok(sparsity)
    } else {
        Err(SparsityError::OutOfRange { value: sparsity })
    }
}

/// Parses and validates a `--sparsity` value (usable as a clap `value_parser`).
pub fn parse_sparsity(text: &str) -> Result<f64, SparsityError> {
    let value: f64 = text.trim().parse().map_err(|_| SparsityError::NotANumber {
        text: text.to_string(),
    })?;
    validate(value)
}

/// How many of `numel` weights sparsity `s` prunes: `round(s * numel)`, the `f64` product rounded
/// half away from zero. `s` must already be valid (see [`validate`]); the result never exceeds
/// `numel`.
pub fn pruned_count(numel: usize, sparsity: f64) -> usize {
    let zeros = (sparsity * numel as f64).round();
    // `as` saturates: NaN -> 0, negative -> 0; `min` guards the top end.
    (zeros as usize).min(numel)
}

/// The ChaCha stream of matrix `kind` in layer `layer` (the contract documented on
/// [`SparseKind`]).
pub fn stream_of(layer: usize, kind: SparseKind) -> u64 {
    6 * layer as u64 + kind.index() as u64
}

/// Which weights of one `rows x cols` matrix are kept (row-major).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mask {
    rows: usize,
    cols: usize,
    keep: Vec<bool>,
}

impl Mask {
    /// Every weight kept.
    pub fn dense(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            keep: vec![true; rows * cols],
        }
    }

    /// A mask from an explicit row-major keep pattern.
    pub fn from_keep(rows: usize, cols: usize, keep: Vec<bool>) -> Result<Self, SparsityError> {
        let expected = rows * cols;
        if keep.len() != expected {
            return Err(SparsityError::KeepLength {
                rows,
                cols,
                expected,
                got: keep.len(),
            });
        }
        Ok(Self { rows, cols, keep })
    }

    /// Exactly [`pruned_count`]`(rows * cols, sparsity)` zeros at uniformly random positions drawn
    /// from ChaCha8 seeded with `seed` on stream `stream` (see the module doc).
    pub fn random(
        rows: usize,
        cols: usize,
        sparsity: f64,
        seed: u64,
        stream: u64,
    ) -> Result<Self, SparsityError> {
        let sparsity = validate(sparsity)?;
        Ok(Self::random_validated(rows, cols, sparsity, seed, stream))
    }

    /// [`Mask::random`] for a sparsity already checked by [`validate`].
    fn random_validated(rows: usize, cols: usize, sparsity: f64, seed: u64, stream: u64) -> Self {
        let numel = rows * cols;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        let mut keep = vec![true; numel];
        for index in rand::seq::index::sample(&mut rng, numel, pruned_count(numel, sparsity)) {
            keep[index] = false;
        }
        Self { rows, cols, keep }
    }

    /// The mask whose kept entries are the nonzeros of `data` (a `rows x cols` row-major matrix).
    pub fn from_nonzeros(rows: usize, cols: usize, data: &[f32]) -> Result<Self, SparsityError> {
        Self::from_keep(rows, cols, data.iter().map(|&w| w != 0.0).collect())
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `rows * cols`.
    pub fn numel(&self) -> usize {
        self.keep.len()
    }

    /// Number of kept weights.
    pub fn nnz(&self) -> usize {
        self.keep.iter().filter(|&&k| k).count()
    }

    /// Number of pruned weights.
    pub fn zeros(&self) -> usize {
        self.numel() - self.nnz()
    }

    /// Whether weight `(r, c)` is kept. Positions outside the matrix are not kept.
    pub fn is_kept(&self, r: usize, c: usize) -> bool {
        r < self.rows && c < self.cols && self.keep[r * self.cols + c]
    }

    /// The row-major keep pattern.
    pub fn keep(&self) -> &[bool] {
        &self.keep
    }

    /// Zeroes the pruned entries of `data` (same length as the mask; extra entries untouched).
    pub fn zero_pruned(&self, data: &mut [f32]) {
        for (w, &kept) in data.iter_mut().zip(&self.keep) {
            if !kept {
                *w = 0.0;
            }
        }
    }
}

/// The masks of a whole model: six per block, indexed by [`SparseKind::index`].
#[derive(Clone, Debug, PartialEq)]
pub struct ModelMasks {
    sparsity: f64,
    layers: Vec<[Mask; 6]>,
}

impl ModelMasks {
    /// Every weight kept (sparsity 0).
    pub fn dense(config: &GptConfig) -> Self {
        let layers = (0..config.n_layer)
            .map(|_| {
                SparseKind::ALL.map(|kind| {
                    let (rows, cols) = weight_shape(config, kind);
                    Mask::dense(rows, cols)
                })
            })
            .collect();
        Self {
            sparsity: 0.0,
            layers,
        }
    }

    /// Random masks at `sparsity` for every sparsified matrix, from `seed` (module doc).
    pub fn random(config: &GptConfig, sparsity: f64, seed: u64) -> Result<Self, SparsityError> {
        let sparsity = validate(sparsity)?;
        let layers = (0..config.n_layer)
            .map(|layer| {
                SparseKind::ALL.map(|kind| {
                    let (rows, cols) = weight_shape(config, kind);
                    Mask::random_validated(rows, cols, sparsity, seed, stream_of(layer, kind))
                })
            })
            .collect();
        Ok(Self { sparsity, layers })
    }

    /// The masks a loaded sparse checkpoint implies: kept = nonzero. The recorded sparsity is the
    /// measured fraction of zeros over all sparsified matrices (0 for a model without any).
    pub fn from_params_zeros(params: &GptParams) -> Self {
        let layers: Vec<[Mask; 6]> = params
            .blocks
            .iter()
            .map(|block| {
                SparseKind::ALL.map(|kind| {
                    let w = &block.linear(kind).weight;
                    let keep = (0..w.rows * w.cols)
                        .map(|i| w.data.get(i).is_some_and(|&x| x != 0.0))
                        .collect();
                    Mask {
                        rows: w.rows,
                        cols: w.cols,
                        keep,
                    }
                })
            })
            .collect();
        let numel: usize = layers.iter().flatten().map(Mask::numel).sum();
        let zeros: usize = layers.iter().flatten().map(Mask::zeros).sum();
        let sparsity = if numel == 0 {
            0.0
        } else {
            zeros as f64 / numel as f64
        };
        Self { sparsity, layers }
    }

    /// The requested sparsity (or the measured one, for [`ModelMasks::from_params_zeros`]).
    pub fn sparsity(&self) -> f64 {
        self.sparsity
    }

    /// The six masks of each block, in [`SparseKind::ALL`] order.
    pub fn layers(&self) -> &[[Mask; 6]] {
        &self.layers
    }

    /// The mask of matrix `kind` in block `layer`, if the model has that block.
    pub fn get(&self, layer: usize, kind: SparseKind) -> Option<&Mask> {
        self.layers.get(layer).map(|masks| &masks[kind.index()])
    }

    /// Kept weights over all sparsified matrices.
    pub fn nnz(&self) -> usize {
        self.layers.iter().flatten().map(Mask::nnz).sum()
    }

    /// Weights over all sparsified matrices.
    pub fn numel(&self) -> usize {
        self.layers.iter().flatten().map(Mask::numel).sum()
    }

    /// Checks that these masks fit `params`: one set per block, each mask shaped like its weight.
    pub fn check_matches(&self, params: &GptParams) -> Result<(), SparsityError> {
        if self.layers.len() != params.blocks.len() {
            return Err(SparsityError::LayerCount {
                masks: self.layers.len(),
                model: params.blocks.len(),
            });
        }
        for (layer, (masks, block)) in self.layers.iter().zip(&params.blocks).enumerate() {
            for kind in SparseKind::ALL {
                let mask = &masks[kind.index()];
                let w = &block.linear(kind).weight;
                let fits =
                    mask.rows == w.rows && mask.cols == w.cols && mask.numel() == w.data.len();
                if !fits {
                    return Err(SparsityError::ShapeMismatch {
                        layer,
                        kind: kind.name(),
                        mask_rows: mask.rows,
                        mask_cols: mask.cols,
                        weight_rows: w.rows,
                        weight_cols: w.cols,
                    });
                }
            }
        }
        Ok(())
    }

    /// Zeroes every pruned weight of `params` (the masks must fit, see
    /// [`ModelMasks::check_matches`]).
    pub fn apply(&self, params: &mut GptParams) -> Result<(), SparsityError> {
        self.check_matches(params)?;
        for (masks, block) in self.layers.iter().zip(&mut params.blocks) {
            for kind in SparseKind::ALL {
                masks[kind.index()].zero_pruned(&mut block.linear_mut(kind).weight.data);
            }
        }
        Ok(())
    }
}

/// `(rows, cols)` of the weight of `kind` (`[in, out]`).
fn weight_shape(config: &GptConfig, kind: SparseKind) -> (usize, usize) {
    let (d, f) = (config.n_embd, config.n_inner);
    match kind {
        SparseKind::Q | SparseKind::K | SparseKind::V | SparseKind::AttnProj => (d, d),
        SparseKind::Fc => (d, f),
        SparseKind::FcProj => (f, d),
    }
}

#[cfg(test)]
mod tests;
