//! Static unstructured sparsity masks: which weights of the six sparsified matrices of every block
//! are pruned (the MediSwift / SPDF recipe, `docs/recipe.md`).
//!
//! What is sparsified: Q, K, V, the attention output projection and both FFN matrices of every
//! block ([`SparseKind::ALL`]). Everything else (embeddings, the tied LM head, LayerNorms, biases)
//! is dense and has no mask.
//!
//! The mask rule, which is part of the reproducibility contract:
//! - a matrix with `numel` weights at sparsity `s` has exactly [`pruned_count`]`(numel, s)` =
//!   `round(s * numel)` zeros: the `f64` product rounded half away from zero (`f64::round`), so
//!   `numel = 10, s = 0.25` prunes 3;
//! - the positions are drawn with `rng = ChaCha8Rng::seed_from_u64(seed)` switched to stream
//!   `6 * layer + kind.index()`, in two steps. (1) Every weight is kept independently with
//!   probability `T / 256`, `T = round(256 * kept / numel)` (`kept = numel - zeros`): for each
//!   64 weights (word `w` of the row-major bitset, bit `i` = weight `64 w + i`), eight
//!   `rng.next_u64()` give each weight an 8-bit number (bit `b` of the `b`-th draw), kept if it
//!   is below `T`. (2) The count is then made exact: while too many are kept,
//!   `t = rng.random_range(0..numel)` (as `u64`) and weight `t` is pruned if kept; while too
//!   few, the same draw keeps weight `t` if pruned. Both steps treat every position alike, and
//!   the result always has exactly `zeros` zeros, so the set of zeros is uniformly random over
//!   the whole matrix, as `rand::seq::index::sample` would draw it, but from one random byte per
//!   weight in sequence (about 0.3 s for MediSwift-XL's 1.2 B weights, against about 25 s for
//!   `sample`'s random accesses; see `docs/scale.md`) plus `O(sqrt(numel) + numel / 512)`
//!   corrections. One stream per matrix means a mask depends only on the seed, its layer, its
//!   kind and its own shape: never on other matrices, thread count or drawing order, so the
//!   matrices are drawn in parallel.
//!
//! Key design decision: a mask is a bitset (one bit per weight, row-major, with its kept count),
//! so MediSwift-XL's masks take 150 MB, not 1.2 GB, and the kept entries of a row segment are
//! counted by `popcount` ([`Mask::kept_in_row`]): what the fast timing mode needs without
//! listing the entries. The exact engine reads the same bits ([`Mask::keep`]).
//!
//! Not here: applying masks to arithmetic (the reference and the fabric do that), any dynamic
//! sparsity (masks are static for the whole run), structured patterns.

use std::ops::Range;

use rand::{Rng, RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

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
    #[error(
        "sparsity {sparsity} prunes every weight of the {rows} x {cols} `{kind}` matrices: nothing would be streamed; use a smaller sparsity"
    )]
    PrunesEverything {
        sparsity: f64,
        kind: &'static str,
        rows: usize,
        cols: usize,
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

/// Checks a sparsity level: `0 <= s < 1`; NaN, negative values and `s >= 1` are refused. `-0` is
/// returned as `0` (adding `+0` does that), so it prints as `0`.
pub fn validate(sparsity: f64) -> Result<f64, SparsityError> {
    if (0.0..1.0).contains(&sparsity) {
        Ok(sparsity + 0.0)
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

/// Checks that `sparsity` keeps at least one weight of every sparsified matrix of `config` (the
/// smallest decides): a matrix without weights has nothing to stream, and no per-layer ratio.
pub fn check_keeps_weights(config: &GptConfig, sparsity: f64) -> Result<(), SparsityError> {
    for kind in SparseKind::ALL {
        let (rows, cols) = kind.shape(config);
        if pruned_count(rows * cols, sparsity) == rows * cols {
            return Err(SparsityError::PrunesEverything {
                sparsity,
                kind: kind.name(),
                rows,
                cols,
            });
        }
    }
    Ok(())
}

/// The ChaCha stream of matrix `kind` in layer `layer` (the contract documented on
/// [`SparseKind`]).
pub fn stream_of(layer: usize, kind: SparseKind) -> u64 {
    6 * layer as u64 + kind.index() as u64
}

/// Which weights of one `rows x cols` matrix are kept: a row-major bitset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mask {
    rows: usize,
    cols: usize,
    /// Bit `i % 64` of word `i / 64` is weight `i` (row-major); bits past `rows * cols` are 0.
    bits: Vec<u64>,
    /// Kept weights (set bits).
    nnz: usize,
}

impl Mask {
    /// Every weight kept.
    pub fn dense(rows: usize, cols: usize) -> Self {
        let numel = rows * cols;
        let mut bits = vec![0; numel.div_ceil(64)];
        set_bits(&mut bits, 0..numel);
        Self {
            rows,
            cols,
            bits,
            nnz: numel,
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
        Ok(Self::from_flags(rows, cols, keep))
    }

    /// `keep` must hold `rows * cols` flags.
    fn from_flags(rows: usize, cols: usize, keep: impl IntoIterator<Item = bool>) -> Self {
        let mut bits = vec![0u64; (rows * cols).div_ceil(64)];
        let mut nnz = 0;
        for (i, kept) in keep.into_iter().enumerate().take(rows * cols) {
            if kept {
                bits[i / 64] |= 1 << (i % 64);
                nnz += 1;
            }
        }
        Self {
            rows,
            cols,
            bits,
            nnz,
        }
    }

    /// Exactly [`pruned_count`]`(rows * cols, sparsity)` zeros at uniformly random positions drawn
    /// from ChaCha8 seeded with `seed` on stream `stream`: one random byte per weight,
    /// then single draws until the count is exact (see the module doc).
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
        let kept = numel - pruned_count(numel, sparsity);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        let threshold = threshold_of(kept, numel);
        let mut bits: Vec<u64> = (0..numel.div_ceil(64))
            .map(|w| below(&mut rng, threshold) & low_mask(numel - 64 * w))
            .collect();
        let mut count: usize = bits.iter().map(|w| w.count_ones() as usize).sum();
        while count != kept {
            let t = rng.random_range(0..numel as u64) as usize;
            let (word, bit) = (t / 64, 1u64 << (t % 64));
            if let Some(w) = bits.get_mut(word) {
                let is_kept = *w & bit != 0;
                if count > kept && is_kept {
                    *w &= !bit;
                    count -= 1;
                } else if count < kept && !is_kept {
                    *w |= bit;
                    count += 1;
                }
            }
        }
        Self {
            rows,
            cols,
            bits,
            nnz: kept,
        }
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
        self.rows * self.cols
    }

    /// Number of kept weights.
    pub fn nnz(&self) -> usize {
        self.nnz
    }

    /// Number of pruned weights.
    pub fn zeros(&self) -> usize {
        self.numel() - self.nnz
    }

    /// Whether every weight is kept.
    pub fn is_dense(&self) -> bool {
        self.nnz == self.numel()
    }

    /// Whether weight `(r, c)` is kept. Positions outside the matrix are not kept.
    pub fn is_kept(&self, r: usize, c: usize) -> bool {
        r < self.rows && c < self.cols && self.bit(r * self.cols + c)
    }

    fn bit(&self, i: usize) -> bool {
        self.bits
            .get(i / 64)
            .is_some_and(|w| w >> (i % 64) & 1 == 1)
    }

    /// The row-major keep pattern, one flag per weight (for the small models the exact engine
    /// and the CPU reference run).
    pub fn keep(&self) -> Vec<bool> {
        (0..self.numel()).map(|i| self.bit(i)).collect()
    }

    /// Kept weights of row `r` in columns `columns` (clamped to the matrix), by popcount.
    pub fn kept_in_row(&self, r: usize, columns: Range<usize>) -> u64 {
        if r >= self.rows {
            return 0;
        }
        let (start, end) = (columns.start.min(self.cols), columns.end.min(self.cols));
        let base = r * self.cols;
        count_bits(&self.bits, base + start..base + end.max(start))
    }

    /// Calls `each(c)` for every kept column `c` of row `r`, in increasing order.
    pub fn for_each_kept_in_row(&self, r: usize, mut each: impl FnMut(usize)) {
        if r >= self.rows {
            return;
        }
        let (start, end) = (r * self.cols, (r + 1) * self.cols);
        let mut i = start;
        while i < end {
            let (word, offset) = (i / 64, i % 64);
            let span = (64 - offset).min(end - i);
            let mut w = self
                .bits
                .get(word)
                .map_or(0, |w| (w >> offset) & low_mask(span));
            while w != 0 {
                each(i - start + w.trailing_zeros() as usize);
                w &= w - 1;
            }
            i += span;
        }
    }

    /// Zeroes the pruned entries of `data` (same length as the mask; extra entries untouched).
    pub fn zero_pruned(&self, data: &mut [f32]) {
        for (i, w) in data.iter_mut().enumerate().take(self.numel()) {
            if !self.bit(i) {
                *w = 0.0;
            }
        }
    }
}

/// The lowest `n` bits set (`n <= 64`).
fn low_mask(n: usize) -> u64 {
    if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }
}

/// Sets bits `range` of `bits`.
fn set_bits(bits: &mut [u64], range: Range<usize>) {
    let mut i = range.start;
    while i < range.end {
        let (word, offset) = (i / 64, i % 64);
        let span = (64 - offset).min(range.end - i);
        if let Some(w) = bits.get_mut(word) {
            *w |= low_mask(span) << offset;
        }
        i += span;
    }
}

/// Set bits of `bits` in `range`.
fn count_bits(bits: &[u64], range: Range<usize>) -> u64 {
    let mut i = range.start;
    let mut count = 0;
    while i < range.end {
        let (word, offset) = (i / 64, i % 64);
        let span = (64 - offset).min(range.end - i);
        let w = bits.get(word).map_or(0, |w| (w >> offset) & low_mask(span));
        count += u64::from(w.count_ones());
        i += span;
    }
    count
}

/// `round(256 * kept / numel)`: the byte values below which a weight is kept in the first
/// step of the draw (module doc).
fn threshold_of(kept: usize, numel: usize) -> u32 {
    if numel == 0 {
        return 0;
    }
    (256.0 * kept as f64 / numel as f64)
        .round()
        .clamp(0.0, 256.0) as u32
}

/// 64 independent bits, each set with probability `threshold / 256`: eight draws give each
/// lane a byte (bit `b` from draw `b`), compared with `threshold` most significant bit first.
fn below(rng: &mut impl Rng, threshold: u32) -> u64 {
    let draws: [u64; 8] = std::array::from_fn(|_| rng.next_u64());
    if threshold >= 256 {
        return u64::MAX;
    }
    let (mut less, mut equal) = (0u64, u64::MAX);
    for b in (0..8).rev() {
        let r = draws[b];
        if threshold >> b & 1 == 1 {
            less |= equal & !r;
            equal &= r;
        } else {
            equal &= !r;
        }
    }
    less
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
                    let (rows, cols) = kind.shape(config);
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
        check_keeps_weights(config, sparsity)?;
        // One stream per matrix: the layers are drawn in parallel, in any order.
        let layers = (0..config.n_layer)
            .into_par_iter()
            .map(|layer| {
                SparseKind::ALL.map(|kind| {
                    let (rows, cols) = kind.shape(config);
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
                    let keep =
                        (0..w.rows * w.cols).map(|i| w.data.get(i).is_some_and(|&x| x != 0.0));
                    Mask::from_flags(w.rows, w.cols, keep)
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

    /// Masks given whole (a resumed run's, read back from its state), with the sparsity the run
    /// recorded for them. Their shapes are checked against the weights where they are used
    /// ([`ModelMasks::check_matches`]).
    pub fn from_layers(sparsity: f64, layers: Vec<[Mask; 6]>) -> Self {
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

    /// The masks of the first `layers` blocks only (all of them if there are fewer).
    pub fn first_layers(&self, layers: usize) -> Self {
        Self {
            sparsity: self.sparsity,
            layers: self.layers.iter().take(layers).cloned().collect(),
        }
    }

    /// Whether every weight of every matrix is kept.
    pub fn is_dense(&self) -> bool {
        self.layers.iter().flatten().all(Mask::is_dense)
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

#[cfg(test)]
mod tests;
