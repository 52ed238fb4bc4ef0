//! wafersim-kernels: the device programs of a training step, as task graphs on a fabric region.
//!
//! Each kernel places its data on a rectangular [`Region`] of PEs in the shared layout
//! ([`layout`]: tokens over rows, features over columns, feature-major tiles), emits the routes,
//! colors and tasks of every PE, runs on `wafersim-sim`, and reads its outputs back. Inputs that
//! stay on the wafer between kernels (activations) are placed in SRAM before cycle 0; weights
//! are streamed from the host during the run, and weight gradients stream out to it.
//!
//! What this crate is not: it knows tensors, tiles and fabric regions, but nothing of GPT. The
//! model, the order of kernels in a training step and the optimizer live in the `wafersim`
//! crate.

#![allow(missing_docs)]

pub mod attention;
pub mod chain;
pub mod cross_entropy;
pub mod elementwise;
pub mod embedding;
mod error;
mod flow;
pub mod join;
pub mod layernorm;
pub mod layout;
pub mod load;
pub mod matmul;
pub mod rowgroup;
pub mod rowmax;
pub mod runs;
pub mod sparse;
mod tiles;
pub mod vchain;
pub mod weight_grad;

/// Colors one linear layer's kernels route on (the product and the weight gradient).
pub const LAYER_COLORS: u8 = max_colors(&[matmul::COLORS, weight_grad::COLORS]);

/// The most colors any of the kernels counted in `counts` routes on: what a fabric running them
/// one after the other needs.
pub const fn max_colors(counts: &[u8]) -> u8 {
    let mut most = 0;
    let mut i = 0;
    while i < counts.len() {
        if counts[i] > most {
            most = counts[i];
        }
        i += 1;
    }
    most
}

/// One more than the highest of a kernel's colors: its chains' pairs and its single colors.
const fn colors_used(pairs: &[chain::ChainColors], singles: &[Color]) -> u8 {
    let mut most = 0;
    let mut i = 0;
    while i < pairs.len() {
        let [a, b] = pairs[i].0;
        most = max_colors(&[most, a.0 + 1, b.0 + 1]);
        i += 1;
    }
    let mut i = 0;
    while i < singles.len() {
        most = max_colors(&[most, singles[i].0 + 1]);
        i += 1;
    }
    most
}

pub use cross_entropy::{CrossEntropyPlan, CrossEntropyRun, SoftmaxCrossEntropy};
pub use elementwise::{ElementwisePlan, ElementwiseRun, Gelu, GeluBackward, ResidualAdd};
pub use embedding::{
    EmbeddingBackward, EmbeddingForward, EmbeddingGradRun, EmbeddingPlan, EmbeddingRun,
    EmbeddingShape,
};

pub use attention::{
    Attention, AttentionBackward, AttentionGrads, AttentionMemory, AttentionPlan, AttentionRun,
    AttentionShape, BlockedAttention, BlockedAttentionBackward, BlockedAttentionGrads,
    BlockedAttentionRun, BlockedPlan,
};
pub use error::KernelError;
pub use layernorm::{
    LayerNorm, LayerNormBackward, LayerNormBackwardRun, LayerNormPlan, LayerNormRun,
    ParameterGradients,
};
pub use layout::{Region, Split, Tiling};
pub use load::{ColumnCounts, StreamLoad, StreamTerms};
pub use matmul::{MatmulPlan, MatmulRun, MatmulShape, StreamMatmul};
pub use rowgroup::GroupAllReduce;
pub use rowmax::RowMaxAllReduce;
pub use runs::Runs;
pub use sparse::StreamedMatrix;
pub use vchain::VerticalChain;
pub use weight_grad::{WeightGrad, WeightGradPlan, WeightGradRun, WeightGradShape};

use wafersim_sim::{Color, FabricConfig};

/// Storage precision of activations and streamed weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Precision {
    /// fp32 everywhere; a streamed weight takes two wavelets (index, value).
    F32,
    /// fp16 activations and weights (one sparse wavelet per weight), fp32 accumulation.
    F16,
}

impl Precision {
    /// The name the command line and the reports use: `fp32` or `fp16`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "fp32",
            Precision::F16 => "fp16",
        }
    }

    /// The simulator's element type for stored activations.
    pub fn dtype(self) -> wafersim_sim::DType {
        match self {
            Precision::F32 => wafersim_sim::DType::F32,
            Precision::F16 => wafersim_sim::DType::F16,
        }
    }

    /// Bytes of one stored activation.
    pub fn bytes(self) -> u64 {
        match self {
            Precision::F32 => 4,
            Precision::F16 => 2,
        }
    }
}

/// Checks that `region` lies on the fabric and has no more rows than `tokens` and no more
/// columns than `features`, so no PE is left without work.
fn check_region(
    kernel: &'static str,
    config: &FabricConfig,
    region: Region,
    tokens: usize,
    features: usize,
) -> Result<(), KernelError> {
    let shape = |reason: String| Err(KernelError::Shape { kernel, reason });
    if region.cols == 0 || region.rows == 0 {
        return shape("the region is empty".into());
    }
    let (x_end, y_end) = (
        u64::from(region.origin.x) + u64::from(region.cols),
        u64::from(region.origin.y) + u64::from(region.rows),
    );
    if x_end > u64::from(config.width) || y_end > u64::from(config.height) {
        return shape(format!(
            "region {} x {} at {} does not fit the {} x {} fabric",
            region.cols, region.rows, region.origin, config.width, config.height
        ));
    }
    if region.rows as usize > tokens {
        return shape(format!(
            "the region has {} rows but there are only {tokens} tokens",
            region.rows
        ));
    }
    if region.cols as usize > features {
        return shape(format!(
            "the region has {} columns but only {features} features to split",
            region.cols
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_color_counts_are_the_kernels_highest_colors_plus_one() {
        // Attention: K/V gather 0-3, dK/dV reduce 4-7, group sums 8-11. Weight gradient:
        // pattern 0, row chain 1-4, column chain 5-6. Product: weights 0, row chain 1-4.
        assert_eq!(
            (attention::COLORS, weight_grad::COLORS, matmul::COLORS),
            (12, 7, 5)
        );
        // LayerNorm: parameters 0, row all-reduce 1-3, column chain 4-5; the loss: row max
        // 0-2, column chain 3-4; the embedding: values 0, column chain 1-2.
        assert_eq!(
            (layernorm::COLORS, cross_entropy::COLORS, embedding::COLORS),
            (6, 5, 3)
        );
        assert_eq!(LAYER_COLORS, 7);
    }
}
