//! From a model and a batch to a placement on the fabric: the region every kernel of the step
//! runs on, and the check that the step fits the PEs' SRAM before anything is simulated.
//!
//! One region serves the whole step, so each kernel's output is already laid out as the next
//! kernel wants its input (tokens over rows, features over columns; see
//! `wafersim_kernels::layout`). The region is the largest the fabric allows with:
//! - no more columns than the model width (every kernel needs a feature per column; attention
//!   lets a head span several columns, summing its partial scores along the rows, so the
//!   columns need not divide the heads);
//! - no more rows than tokens.
//!
//! The fit check counts what must stay resident on a PE between the forward and the backward
//! pass (the activations the backward pass reads, per layer) and refuses a step that cannot
//! hold them, naming the bytes needed and available and what to change.
//!
//! Not here: choosing a different region per layer (all kernels share one), micro-batching.

use wafersim_kernels::{Precision, Region, Split};
use wafersim_sim::FabricConfig;

use crate::model::GptConfig;

/// Where and how a training step runs.
#[derive(Clone, Debug, PartialEq)]
pub struct StepPlan {
    pub region: Region,
    pub batch: usize,
    pub seq: usize,
    pub precision: Precision,
    /// Bytes one PE keeps between the forward and the backward pass (the fullest PE).
    pub resident_bytes: u64,
}

impl StepPlan {
    /// Tokens in the step.
    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }
}

/// Why a step cannot be placed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CompileError {
    #[error(
        "the model does not fit the fabric: each PE must keep {needed} bytes of activations for the backward pass ({per_layer} per layer x {layers} layers + {head} for the head) but has {available}; use a bigger fabric or fewer tokens"
    )]
    DoesNotFit {
        needed: u64,
        per_layer: u64,
        layers: usize,
        head: u64,
        available: u64,
    },
    #[error("no region fits: {reason}")]
    NoRegion { reason: String },
}

/// Picks the step's region and checks that its resident activations fit.
pub fn plan_step(
    config: &GptConfig,
    batch: usize,
    seq: usize,
    fabric: &FabricConfig,
    precision: Precision,
) -> Result<StepPlan, CompileError> {
    let tokens = batch * seq;
    let region = choose_region(config, tokens, fabric)?;
    let (per_layer, head) = resident_bytes(config, seq, region, tokens);
    let needed = per_layer * config.n_layer as u64 + head;
    let available = u64::from(fabric.sram_bytes);
    if needed > available {
        return Err(CompileError::DoesNotFit {
            needed,
            per_layer,
            layers: config.n_layer,
            head,
            available,
        });
    }
    Ok(StepPlan {
        region,
        batch,
        seq,
        precision,
        resident_bytes: needed,
    })
}

fn choose_region(
    config: &GptConfig,
    tokens: usize,
    fabric: &FabricConfig,
) -> Result<Region, CompileError> {
    // The attention kernel takes any width up to the features (heads split by the layout's
    // feature split), as every other kernel does: the widest region is the fabric or the model.
    let cols = (fabric.width as usize).min(config.n_embd);
    if cols == 0 {
        return Err(CompileError::NoRegion {
            reason: "the fabric has no column".into(),
        });
    }
    let rows = (fabric.height as usize).min(tokens);
    if rows == 0 {
        return Err(CompileError::NoRegion {
            reason: "the batch has no token".into(),
        });
    }
    Ok(Region::at_origin(cols as u32, rows as u32))
}

/// `(per layer, head)` bytes the fullest PE keeps for the backward pass, in `f32`.
///
/// Per layer and token, the backward pass reads: the block input and the attention residual
/// (LayerNorm inputs), both LayerNorm outputs (inputs of the matmuls' weight gradients), Q, K, V
/// and the attention context, the FFN pre-activation and its GELU: `16 d` features over the
/// columns, two LayerNorm statistics each, and the attention probabilities (`seq` per head). The
/// head keeps the final LayerNorm's input and output and the logits.
fn resident_bytes(config: &GptConfig, seq: usize, region: Region, tokens: usize) -> (u64, u64) {
    let cols = region.cols as usize;
    let t_r = Split::new(tokens, region.rows as usize).max_len() as u64;
    let width = |features: usize| Split::new(features, cols).max_len() as u64;
    let d = width(config.n_embd);
    let f = width(config.n_inner);
    let heads = heads_per_column(config, cols);
    let per_token_layer = 8 * d + 2 * f + 4 + heads * seq as u64;
    let per_token_head = 2 * d + 2 + width(config.vocab_size);
    (4 * t_r * per_token_layer, 4 * t_r * per_token_head)
}

/// The most attention heads any of `cols` columns holds features of (whole or in part): the
/// heads whose probabilities it keeps.
fn heads_per_column(config: &GptConfig, cols: usize) -> u64 {
    let features = Split::new(config.n_embd, cols);
    let hd = config.head_dim().max(1);
    (0..cols)
        .map(|c| features.block(c))
        .filter(|f| !f.is_empty())
        .map(|f| (f.end - 1) / hd - f.start / hd + 1)
        .max()
        .unwrap_or(0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_on_a_16x16_fabric_uses_all_16_columns_and_16_rows() {
        let tiny = GptConfig::preset("tiny").unwrap();
        let plan = plan_step(
            &tiny,
            2,
            32,
            &FabricConfig::rectangle(16, 16).unwrap(),
            Precision::F32,
        )
        .unwrap();
        // 4 heads of 16 over 16 columns: each head spans 4 columns.
        assert_eq!(plan.region, Region::at_origin(16, 16));
        // 4 tokens per row, 64 / 16 = 4 model features, 256 / 16 = 16 FFN features and
        // 256 / 16 = 16 vocabulary entries per column; each column touches one head. Per layer
        // and token 8 * 4 + 2 * 16 + 4 + 1 * 32 = 100 floats; head 2 * 4 + 2 + 16 = 26 floats:
        // 4 * 4 * (2 * 100 + 26) = 3,616 bytes.
        assert_eq!(plan.resident_bytes, 3_616);
    }

    #[test]
    fn columns_span_the_fabric_up_to_the_model_width() {
        let mut c = GptConfig::preset("tiny").unwrap();
        c.n_head = 8; // 64 / 8 = 8 per head
        let plan = |width: u32| {
            plan_step(
                &c,
                1,
                8,
                &FabricConfig::rectangle(width, 8).unwrap(),
                Precision::F32,
            )
            .unwrap()
            .region
        };
        // 6 columns do not divide the 8 heads: heads split by the feature split (11, 11, 11,
        // 11, 10, 10 features).
        assert_eq!(plan(6), Region::at_origin(6, 8));
        // No more columns than the 64 features.
        assert_eq!(plan(100), Region::at_origin(64, 8));
    }

    #[test]
    fn each_column_keeps_the_probabilities_of_every_head_it_touches() {
        let tiny = GptConfig::preset("tiny").unwrap(); // 4 heads of 16
        // 4 columns: one whole head each; 2 columns: two whole heads.
        assert_eq!(
            (heads_per_column(&tiny, 4), heads_per_column(&tiny, 2)),
            (1, 2)
        );
        // 16 columns of 4 features: a quarter of one head each.
        assert_eq!(heads_per_column(&tiny, 16), 1);
        // 6 columns of 11, 11, 11, 11, 10, 10 features: column 1 holds features 11-21, the end
        // of head 0 and the start of head 1.
        assert_eq!(heads_per_column(&tiny, 6), 2);
    }

    #[test]
    fn a_model_too_big_is_refused_with_bytes_and_advice() {
        let xl = GptConfig::preset("mediswift-xl").unwrap();
        let err = plan_step(&xl, 1, 2048, &FabricConfig::wse2(), Precision::F32)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("the model does not fit the fabric: each PE must keep"),
            "{err}"
        );
        assert!(
            err.contains("has 49152; use a bigger fabric or fewer tokens"),
            "{err}"
        );
    }
}
