//! From a model and a batch to a placement on the fabric: the region every kernel of the step
//! runs on, how many sequences go through the fabric at once (the micro-batch), whether the
//! attention probabilities are kept for the backward pass or recomputed, and the check that
//! this fits the PEs' SRAM before anything is simulated.
//!
//! One region serves the whole step, so each kernel's output is already laid out as the next
//! kernel wants its input (tokens over rows, features over columns; see
//! `wafersim_kernels::layout`). The region is the largest the fabric allows with:
//! - no more columns than the model width (every kernel needs a feature per column; attention
//!   lets a head span several columns, summing its partial scores along the rows, so the
//!   columns need not divide the heads);
//! - no more rows than tokens (of one pass).
//!
//! The fit check counts what must stay resident on a PE between the forward and the backward
//! pass (the activations the backward pass reads, per layer), and beside it the largest working
//! set of a kernel (one kernel runs at a time): the weight-streamed kernels' smallest (their
//! chunks are then cut to the SRAM left), the small dense kernels' buffers (LayerNorm, GELU, the
//! residual add, the loss) and the attention kernels' buffers beyond the Q, K, V tiles and
//! probabilities already resident (its K/V window, gradients, dS). Key design
//! decision: the batch is cut into passes of `micro_batch` sequences (forward and backward of
//! one pass, weight gradients accumulated over the passes on the host; a step costs the sum of
//! its passes), the largest micro-batch that fits. The attention either keeps its probabilities
//! (`seq` floats per token and head) for the unblocked kernels, or only their softmax statistics
//! (a maximum and a sum per token and head) and runs as the blocked kernels
//! (`wafersim_kernels::BlockedAttention`, FlashAttention's schedule): key blocks of
//! [`StepPlan::attention_block_rows`] region rows, the most whose working set fits beside the
//! resident activations, the probabilities recomputed block by block in the backward pass. Of
//! the two, the plan takes the one that fits more sequences per pass (fewer passes, each
//! streaming every weight once more), the probabilities on a tie.
//! Where not even blocks of one row fit, the plan is made without counting the attention and
//! says so ([`StepPlan::attention_fits`]): the fast fidelity costs it with a warning and the
//! exact one refuses it. A step whose resident activations do not fit is refused, naming the
//! bytes needed and available and what to change.
//!
//! The region's shape can be limited ([`plan_step_within`]): `crate::tune` costs a few
//! limited shapes with the fast fidelity and keeps the fastest.
//!
//! Not here: a different region per layer (all kernels share one, so no activation is ever
//! re-laid out).

use wafersim_kernels::{
    AttentionShape, Gelu, GeluBackward, KernelError, LayerNorm, LayerNormBackward, MatmulShape,
    Precision, Region, ResidualAdd, SoftmaxCrossEntropy, Split, WeightGradShape, attention,
    cross_entropy, embedding, layernorm, matmul, max_colors, weight_grad,
};
use wafersim_sim::FabricConfig;

use crate::model::GptConfig;

/// Colors a training step's kernels route on (`0..STEP_COLORS`): a fabric needs at least as
/// many. The attention uses the most. (GELU and the residual add route on none.)
pub const STEP_COLORS: u8 = max_colors(&[
    attention::COLORS,
    layernorm::COLORS,
    cross_entropy::COLORS,
    embedding::COLORS,
    matmul::COLORS,
    weight_grad::COLORS,
]);

/// Where and how a training step runs.
#[derive(Clone, Debug, PartialEq)]
pub struct StepPlan {
    /// The region of a full pass (the last pass may use fewer rows: [`StepPlan::passes`]).
    pub region: Region,
    /// Sequences in the step.
    pub batch: usize,
    pub seq: usize,
    pub precision: Precision,
    /// Bytes one PE keeps between the forward and the backward pass of a full pass (the
    /// fullest PE).
    pub resident_bytes: u64,
    /// Sequences per pass through the fabric; the last pass takes what is left.
    pub micro_batch: usize,
    /// Region rows per key block of the blocked attention kernels (the most that fit), which
    /// keep only the softmax statistics (a maximum and a sum per token and head) and recompute
    /// the probabilities in the backward pass; 0 when the probabilities are kept and the
    /// unblocked kernels run ([`StepPlan::recompute_attention`]).
    pub attention_block_rows: usize,
    /// The region of the last pass when it has fewer sequences than `micro_batch`.
    pub last_region: Region,
    /// SRAM a PE has left for the weight-streamed kernels' tiles and partial sums once the
    /// resident activations of a full pass are kept: their plans are cut to fit it.
    pub kernel_sram_bytes: u32,
    /// The attention kernels' buffers fit beside the resident activations. When no micro-batch
    /// allows that, the plan is made without them and this is `false`: the fast fidelity costs
    /// such a step with a warning, the exact one refuses it ([`attention_memory`]).
    pub attention_fits: bool,
}

/// One pass of a step: which sequences, and the plan its kernels run under.
#[derive(Clone, Debug, PartialEq)]
pub struct Pass {
    /// The sequences of the batch this pass runs.
    pub sequences: std::ops::Range<usize>,
    /// A one-pass plan of those sequences.
    pub plan: StepPlan,
}

impl StepPlan {
    /// Whether only the softmax statistics are kept: the attention runs as the blocked
    /// kernels, whose backward recomputes the probabilities.
    pub fn recompute_attention(&self) -> bool {
        self.attention_block_rows > 0
    }

    /// Tokens in the step.
    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }

    /// `fabric` with the SRAM the weight-streamed kernels may use ([`Self::kernel_sram_bytes`]).
    pub fn streaming_fabric(&self, fabric: &FabricConfig) -> FabricConfig {
        let mut streaming = fabric.clone();
        streaming.sram_bytes = self.kernel_sram_bytes.min(fabric.sram_bytes);
        streaming
    }

    /// Passes through the fabric: `ceil(batch / micro_batch)`.
    pub fn pass_count(&self) -> usize {
        self.batch.div_ceil(self.micro_batch.max(1))
    }

    /// The passes in order, each with a plan of its own sequences only.
    pub fn passes(&self) -> Vec<Pass> {
        let m = self.micro_batch.max(1);
        (0..self.pass_count())
            .map(|p| {
                let sequences = p * m..((p + 1) * m).min(self.batch);
                let region = if sequences.len() == m {
                    self.region
                } else {
                    self.last_region
                };
                let plan = StepPlan {
                    region,
                    batch: sequences.len(),
                    micro_batch: sequences.len(),
                    last_region: region,
                    ..self.clone()
                };
                Pass { sequences, plan }
            })
            .collect()
    }
}

/// Why a step cannot be placed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CompileError {
    #[error(
        "the model does not fit the fabric: even one sequence per pass with the attention recomputed, each PE must keep {needed} bytes of activations for the backward pass ({per_layer} per layer x {layers} layers + {head} for the head) and the largest kernel's working set needs {working} more, but it has {available}; use a bigger fabric or shorter sequences"
    )]
    DoesNotFit {
        needed: u64,
        per_layer: u64,
        layers: usize,
        head: u64,
        /// The largest minimal working set of a kernel (a weight-streamed one with one
        /// partial-sum column, or a small dense one).
        working: u64,
        available: u64,
    },
    #[error("no region fits: {reason}")]
    NoRegion { reason: String },
    #[error(
        "the fabric has {available} colors but a training step's kernels route on {needed} (the attention's K/V gather, dK/dV reduction and head sums); use a fabric with at least {needed}"
    )]
    TooFewColors { needed: u8, available: u8 },
}

/// The most columns and rows a step's region may take (the fabric's, unless a search of
/// region shapes asks for fewer: see `crate::tune`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionLimit {
    pub cols: usize,
    pub rows: usize,
}

impl RegionLimit {
    /// The whole fabric.
    pub fn fabric(fabric: &FabricConfig) -> Self {
        RegionLimit {
            cols: fabric.width as usize,
            rows: fabric.height as usize,
        }
    }
}

/// What one pass of `sequences` sequences keeps per PE on its region.
struct Fit {
    region: Region,
    per_layer: u64,
    head: u64,
    needed: u64,
    /// The largest minimal working set of a kernel on this pass, attention aside.
    working: u64,
    /// What the attention kernels hold beyond the resident activations (0 when not counted).
    attention: u64,
    /// Rows per key block of the blocked kernels (0 when the probabilities are kept).
    block_rows: usize,
}

/// How a pass of `sequences` sequences is placed: the region limit, the precision, whether
/// attention is recomputed and whether its kernels' buffers are counted.
#[derive(Clone, Copy)]
struct Placement {
    limit: RegionLimit,
    precision: Precision,
    recompute: bool,
    count_attention: bool,
}

impl Fit {
    /// The resident activations and, beside them, the largest working set of the kernels (one
    /// kernel runs at a time).
    fn fits(&self, available: u64) -> bool {
        self.needed + self.working.max(self.attention) <= available
    }
}

fn fit(
    config: &GptConfig,
    (sequences, seq): (usize, usize),
    fabric: &FabricConfig,
    place: Placement,
) -> Result<Fit, CompileError> {
    let tokens = sequences * seq;
    let region = choose_region(config, tokens, place.limit)?;
    let kept = if place.recompute { 2 } else { seq };
    let (per_layer, head) = resident_bytes(config, kept, region, tokens);
    let needed = per_layer * config.n_layer as u64 + head;
    let streaming = streaming_minimum(config, region, tokens, place.precision, fabric);
    let working = streaming.max(dense_kernels_maximum(config, region, tokens));
    let available = u64::from(fabric.sram_bytes);
    let resident_fit = needed + working <= available;
    let shape = attention_shape(config, sequences, seq);
    // Counted only where it can decide (it takes a pass over the region's PEs). A region the
    // attention refuses counts nothing here: the step reports the kernel's error itself.
    let (attention, block_rows) = match (place.count_attention && resident_fit, place.recompute) {
        (false, recompute) => (0, usize::from(recompute)),
        (true, false) => {
            let memory = shape.memory(fabric, region);
            (memory.map_or(0, |m| m.scratch_bytes), 0)
        }
        (true, true) => blocked_attention(&shape, fabric, region, available - needed),
    };
    Ok(Fit {
        region,
        per_layer,
        head,
        needed,
        working,
        attention,
        block_rows,
    })
}

/// The blocked attention's key block on `region` with `spare` bytes beside the resident
/// activations: `(its scratch bytes, rows per block)`, the most rows that fit, or one row (and
/// its scratch, more than `spare`) if none does.
fn blocked_attention(
    shape: &AttentionShape,
    fabric: &FabricConfig,
    region: Region,
    spare: u64,
) -> (u64, usize) {
    let scratch = |rows| {
        shape
            .blocked_memory(fabric, region, rows)
            .map_or(0, |m| m.scratch_bytes)
    };
    match shape.largest_block_rows(fabric, region, spare) {
        Ok(Some(rows)) => (scratch(rows), rows),
        Ok(None) => (scratch(1), 1),
        Err(_) => (0, 1),
    }
}

/// The attention of `config` over a batch of `batch` sequences of `seq` tokens.
pub(crate) fn attention_shape(config: &GptConfig, batch: usize, seq: usize) -> AttentionShape {
    let scale = if config.scale_attn_weights {
        1.0 / (config.head_dim() as f32).sqrt()
    } else {
        1.0
    };
    AttentionShape {
        batch,
        seq_len: seq,
        heads: config.n_head,
        features: config.n_embd,
        scale,
    }
}

/// The SRAM the attention kernels of `plan` need on the fullest PE of a full pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionBytes {
    pub forward: u64,
    pub backward: u64,
    /// What the kernels hold beyond the activations the step keeps resident.
    pub beyond_resident: u64,
    /// Rows per key block of the blocked kernels (`None`: the unblocked kernels, probabilities
    /// kept).
    pub block_rows: Option<usize>,
}

/// The SRAM the attention kernels of `plan` need on the fullest PE of a full pass: the
/// unblocked kernels' where the plan keeps the probabilities, the blocked kernels' (with the
/// plan's key blocks) where it keeps the statistics. An error when the region refuses them
/// (the step then reports that itself).
pub fn attention_memory(
    config: &GptConfig,
    plan: &StepPlan,
    fabric: &FabricConfig,
) -> Result<AttentionBytes, KernelError> {
    let shape = attention_shape(config, plan.micro_batch, plan.seq);
    if plan.recompute_attention() {
        let rows = plan.attention_block_rows;
        let m = shape.blocked_memory(fabric, plan.region, rows)?;
        return Ok(AttentionBytes {
            forward: m.forward_bytes,
            backward: m.backward_bytes,
            beyond_resident: m.scratch_bytes,
            block_rows: Some(rows),
        });
    }
    let m = shape.memory(fabric, plan.region)?;
    Ok(AttentionBytes {
        forward: m.forward_bytes,
        backward: m.backward_bytes,
        beyond_resident: m.scratch_bytes,
        block_rows: None,
    })
}

/// The largest of the small dense kernels' buffers on the fullest PE of `region` (LayerNorm and
/// GELU both ways, the residual add, the loss), as each kernel's plan counts them, tiles it reads
/// included. The embedding's are fewer than the LayerNorm's: a tile and a scratch that shrinks
/// to what is left (at least one element).
fn dense_kernels_maximum(config: &GptConfig, region: Region, tokens: usize) -> u64 {
    let (d, f, v) = (config.n_embd, config.n_inner, config.vocab_size);
    [
        LayerNorm::sram_bytes(region, tokens, d),
        LayerNormBackward::sram_bytes(region, tokens, d, true),
        Gelu::sram_bytes(region, tokens, f),
        GeluBackward::sram_bytes(region, tokens, f),
        ResidualAdd::sram_bytes(region, tokens, d),
        SoftmaxCrossEntropy::sram_bytes(region, tokens, v),
    ]
    .into_iter()
    .max()
    .unwrap_or(0)
}

/// The largest of the weight-streamed kernels' minimal working sets (tiles, bias and one
/// partial-sum column), as their plans state it when given no SRAM at all: every product and
/// weight gradient of the six matrices and of the head, both ways round.
fn streaming_minimum(
    config: &GptConfig,
    region: Region,
    tokens: usize,
    precision: Precision,
    fabric: &FabricConfig,
) -> u64 {
    let mut empty = fabric.clone();
    empty.sram_bytes = 0;
    let (d, f, v) = (config.n_embd, config.n_inner, config.vocab_size);
    let needed = |result: Result<(), KernelError>| match result {
        Err(KernelError::DoesNotFit { needed, .. }) => needed,
        _ => 0,
    };
    let shapes = [(d, d), (d, f), (f, d), (d, v), (v, d)];
    shapes
        .iter()
        .flat_map(|&(k, n)| {
            let matmul = MatmulShape {
                region,
                tokens,
                k,
                n,
                bias: false,
                precision,
            };
            let grad = WeightGradShape {
                region,
                tokens,
                k,
                n,
                bias: false,
                precision,
            };
            [
                needed(matmul.plan(&empty).map(drop)),
                needed(grad.plan(&empty).map(drop)),
            ]
        })
        .max()
        .unwrap_or(0)
}

/// Picks the step's micro-batch, whether attention is recomputed and the region, and checks
/// that the resident activations fit: the largest micro-batch that keeps the probabilities and
/// the largest that keeps only their statistics (the blocked attention), both with the attention
/// kernels' buffers counted, and of the two the one with fewer passes (the probabilities on a
/// tie); if neither fits, the same without counting the attention.
pub fn plan_step(
    config: &GptConfig,
    batch: usize,
    seq: usize,
    fabric: &FabricConfig,
    precision: Precision,
) -> Result<StepPlan, CompileError> {
    let limit = RegionLimit::fabric(fabric);
    plan_step_within(config, (batch, seq), fabric, precision, limit)
}

/// [`plan_step`] on a region of at most `limit` columns and rows (of the fabric's).
pub fn plan_step_within(
    config: &GptConfig,
    (batch, seq): (usize, usize),
    fabric: &FabricConfig,
    precision: Precision,
    limit: RegionLimit,
) -> Result<StepPlan, CompileError> {
    if fabric.colors < STEP_COLORS {
        return Err(CompileError::TooFewColors {
            needed: STEP_COLORS,
            available: fabric.colors,
        });
    }
    let limit = RegionLimit {
        cols: limit.cols.min(fabric.width as usize),
        rows: limit.rows.min(fabric.height as usize),
    };
    let available = u64::from(fabric.sram_bytes);
    let placement = |count_attention, recompute| Placement {
        limit,
        precision,
        recompute,
        count_attention,
    };
    let fitting = |place| largest_fitting(config, (batch, seq), fabric, place);
    // With the attention placed: the probabilities kept, or the blocked kernels, whichever
    // takes fewer passes (each streams every weight once more); the probabilities on a tie.
    // Without it (it fits neither way), the same order.
    let (kept, blocked) = (placement(true, false), placement(true, true));
    let passes = |micro_batch: usize| batch.div_ceil(micro_batch);
    let placed = match (fitting(kept)?, fitting(blocked)?) {
        (Some(k), Some(b)) if passes(b.0) < passes(k.0) => Some((blocked, b)),
        (Some(k), _) => Some((kept, k)),
        (None, b) => b.map(|b| (blocked, b)),
    };
    let placed = match placed {
        Some(placed) => Some(placed),
        None => {
            let mut unplaced = None;
            for place in [placement(false, false), placement(false, true)] {
                if let Some(found) = fitting(place)? {
                    unplaced = Some((place, found));
                    break;
                }
            }
            unplaced
        }
    };
    if let Some((place, (micro_batch, full))) = placed {
        let last = batch % micro_batch;
        let last_region = if last == 0 {
            full.region
        } else {
            fit(config, (last, seq), fabric, place)?.region
        };
        return Ok(StepPlan {
            region: full.region,
            batch,
            seq,
            precision,
            resident_bytes: full.needed,
            micro_batch,
            attention_block_rows: full.block_rows,
            last_region,
            kernel_sram_bytes: (available - full.needed) as u32,
            attention_fits: place.count_attention,
        });
    }
    let place = Placement {
        limit,
        precision,
        recompute: true,
        count_attention: false,
    };
    let one = fit(config, (batch.min(1), seq), fabric, place)?;
    Err(CompileError::DoesNotFit {
        needed: one.needed,
        per_layer: one.per_layer,
        layers: config.n_layer,
        head: one.head,
        working: one.working,
        available,
    })
}

/// The largest micro-batch (at most `batch`) whose pass fits, with its fit. Resident bytes grow
/// with the tokens of a pass, so the search stops at the first fit from the top.
fn largest_fitting(
    config: &GptConfig,
    (batch, seq): (usize, usize),
    fabric: &FabricConfig,
    place: Placement,
) -> Result<Option<(usize, Fit)>, CompileError> {
    let available = u64::from(fabric.sram_bytes);
    for micro_batch in (1..=batch).rev() {
        let f = fit(config, (micro_batch, seq), fabric, place)?;
        if f.fits(available) {
            return Ok(Some((micro_batch, f)));
        }
    }
    Ok(None)
}

fn choose_region(
    config: &GptConfig,
    tokens: usize,
    limit: RegionLimit,
) -> Result<Region, CompileError> {
    // The attention kernel takes any width up to the features (heads split by the layout's
    // feature split), as every other kernel does: the widest region is the fabric or the model.
    let cols = limit.cols.min(config.n_embd);
    if cols == 0 {
        return Err(CompileError::NoRegion {
            reason: "the fabric has no column".into(),
        });
    }
    let rows = limit.rows.min(tokens);
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
/// and the attention context, the FFN pre-activation and its GELU: `8 d + 2 d_ffn` features
/// over the columns, two LayerNorm statistics each, and `per_head` floats of attention per head
/// the column touches (the `seq` probabilities, or the softmax's maximum and sum when they are
/// recomputed).
/// The head keeps the final LayerNorm's input and output and the logits.
fn resident_bytes(
    config: &GptConfig,
    per_head: usize,
    region: Region,
    tokens: usize,
) -> (u64, u64) {
    let cols = region.cols as usize;
    let t_r = Split::new(tokens, region.rows as usize).max_len() as u64;
    let width = |features: usize| Split::new(features, cols).max_len() as u64;
    let d = width(config.n_embd);
    let f = width(config.n_inner);
    let heads = heads_per_column(config, cols);
    let per_token_layer = 8 * d + 2 * f + 4 + heads * per_head as u64;
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

    fn fabric_with_sram(width: u32, height: u32, sram_bytes: u32) -> FabricConfig {
        let mut fabric = FabricConfig::rectangle(width, height).unwrap();
        fabric.sram_bytes = sram_bytes;
        fabric
    }

    #[test]
    fn mediswift_xl_on_wse2_runs_blocked_attention_in_passes_of_three_sequences() {
        let xl = GptConfig::preset("mediswift-xl").unwrap();
        let plan = plan_step(&xl, 8, 2048, &FabricConfig::wse2(), Precision::F32).unwrap();
        // Region 750 columns x 994 rows; per column 3 of d = 2048 (750 x 2 + 548), 11 of
        // d_ffn = 8192 (750 x 10 + 692), 68 of the vocabulary 50257 (750 x 67 + 7), and up to
        // 2 heads of 128. Keeping probabilities, one sequence (3 tokens per row) needs
        // 4 x 3 x (8 x 3 + 2 x 11 + 4 + 2 x 2048) = 49,752 bytes per layer: more than the
        // 49,152 of a PE before anything else. With the softmax's maximum and sum per head
        // instead, per token and layer 8 x 3 + 2 x 11 + 4 + 2 x 2 = 54 floats and for the head
        // 2 x 3 + 2 + 68 = 76: 4 t (24 x 54 + 76) = 5,488 t bytes with t tokens per row.
        // The streamed kernels need at least, with t tokens per row, the largest of (fp32)
        // the head's product 4t (3 + 68) + 4 x 68 + 4 + 4t = 288 t + 276 and its weight
        // gradient 4t (3 + 68) + 4 x 68 + 8 + 4t + 4 x 3 = 288 t + 292 (either way round).
        // Four sequences (8192 tokens, t = 9: 994 x 8 + 240): 49,392 + 2,884 = 52,276, too
        // many; three (6144 tokens, t = 7: 994 x 6 + 180): 38,416 + 2,308 = 40,724.
        let wse2 = FabricConfig::wse2();
        assert_eq!(plan.region, Region::at_origin(750, 994));
        assert!(plan.recompute_attention());
        assert_eq!((plan.micro_batch, plan.pass_count()), (3, 3));
        assert_eq!(plan.resident_bytes, 38_416);
        assert_eq!(plan.kernel_sram_bytes, 49_152 - 38_416);
        let sizes: Vec<usize> = plan.passes().iter().map(|p| p.sequences.len()).collect();
        assert_eq!(sizes, vec![3, 3, 2]);
        // The unblocked attention's K/V window alone would be 2 x 3 features x 4,098 tokens
        // (two sequences meet on a row) = 98,352 bytes; the blocked kernels take the most rows
        // per key block whose buffers beyond the resident activations fit the 10,736 bytes
        // left (by the kernels' own count, which their tests hold to the simulator's).
        assert!(plan.attention_fits);
        let shape = attention_shape(&xl, 3, 2048);
        let scratch = |rows| {
            shape
                .blocked_memory(&wse2, plan.region, rows)
                .unwrap()
                .scratch_bytes
        };
        let rows = plan.attention_block_rows;
        assert!(scratch(rows) <= 10_736 && scratch(rows + 1) > 10_736);
        assert_eq!(rows, 8);
        let one = plan_step(&xl, 1, 2048, &wse2, Precision::F32).unwrap();
        // One sequence: 5,488 x 3 = 16,464 bytes.
        assert_eq!((one.micro_batch, one.resident_bytes), (1, 16_464));
    }

    #[test]
    fn the_micro_batch_leaves_room_for_the_attention_kernels_and_the_fewest_passes_win() {
        let tiny = GptConfig::preset("tiny").unwrap();
        // Tiny on one column of 32 PEs with 32-token sequences: all 64 features, 256 FFN
        // features, the 256-entry vocabulary and the 4 heads on the column; m sequences put
        // n = m tokens on each row. Kept per token and layer 8 x 64 + 2 x 256 + 4 + 4 x 32 =
        // 1,156 floats, for the head 2 x 64 + 2 + 256 = 386: 4 n (2 x 1,156 + 386) = 10,792 n
        // bytes. The attention backward holds besides its Q, K, V tiles and the probabilities
        // dO (64 n), the window and partial dK/dV of the sequence's 32 tokens (4 x 64 x 32 =
        // 8,192), dS and two rows (32 n + 2 n), dQ, dK, dV (192 n) and a counter: 4 (8,193 +
        // 290 n) bytes. One sequence: 10,792 + 33,932 = 44,724 fits 49,152; two: 21,584 +
        // 35,092 = 56,676 do not, though their resident 21,584 alone would.
        let kept = |sram| {
            let fabric = fabric_with_sram(1, 32, sram);
            let place = Placement {
                limit: RegionLimit::fabric(&fabric),
                precision: Precision::F32,
                recompute: false,
                count_attention: true,
            };
            let (micro_batch, fit) = largest_fitting(&tiny, (4, 32), &fabric, place)
                .unwrap()
                .unwrap();
            (micro_batch, fit.needed)
        };
        assert_eq!(kept(49_152), (1, 10_792));
        // With 56,676 bytes two sequences fit; four (n = 4: 43,168 + 37,412) do not.
        assert_eq!(kept(56_676), (2, 21_584));
        assert_eq!(kept(56_675), (1, 10_792));
        // The blocked attention, keeping the softmax's maximum and sum instead of the 32
        // probabilities (1,036 floats per token and layer: 9,832 n bytes), fits three sequences
        // per pass in 49,152 bytes (29,496 kept; four, 39,328, leave less than the GELU
        // backward's 4 x 4 x 4 x 256 = 16,384): fewer passes than one sequence each, so the
        // plan runs it.
        let plan = plan_step(
            &tiny,
            4,
            32,
            &fabric_with_sram(1, 32, 49_152),
            Precision::F32,
        );
        let plan = plan.unwrap();
        assert_eq!(plan.region, Region::at_origin(1, 32));
        assert!(plan.recompute_attention() && plan.attention_fits);
        assert_eq!((plan.micro_batch, plan.resident_bytes), (3, 29_496));
    }

    #[test]
    fn the_largest_micro_batch_that_fits_keeps_the_probabilities() {
        let tiny = GptConfig::preset("tiny").unwrap();
        // Tiny (d 64, 4 heads of 16, d_ffn 256, vocabulary 256) on 16 x 16 with 8-token
        // sequences: 4 features, 16 FFN features, 16 vocabulary entries and 1 head per column.
        // Per token and layer 8 x 4 + 2 x 16 + 4 + 8 = 76 floats, the head 2 x 4 + 2 + 16 = 26.
        // Two sequences (16 tokens, 1 per row): 4 x (2 x 76 + 26) = 712 bytes; three (24
        // tokens, 2 per row) 1,424. Beside them the attention backward's buffers (on top of the
        // probabilities and tiles) for one token per row: dO, dQ, dK, dV 4 x 4, the window of
        // the sequence's 8 tokens and its partial dK, dV 2 x 2 x 4 x 8, dS and its rows
        // 8 + 2, the shared head's dP 8, a counter: 163 elements, 652 bytes. With 1,400 bytes:
        // passes of 2, 2, 1 sequences (712 + 652 = 1,364), the last on 8 rows.
        let plan = plan_step(
            &tiny,
            5,
            8,
            &fabric_with_sram(16, 16, 1_400),
            Precision::F32,
        )
        .unwrap();
        assert!(!plan.recompute_attention() && plan.attention_fits);
        assert_eq!((plan.micro_batch, plan.pass_count()), (2, 3));
        assert_eq!(plan.resident_bytes, 712);
        let passes = plan.passes();
        let sequences: Vec<_> = passes.iter().map(|p| p.sequences.clone()).collect();
        assert_eq!(sequences, vec![0..2, 2..4, 4..5]);
        assert_eq!(passes[2].plan.region, Region::at_origin(16, 8));
        assert_eq!(passes[2].plan.tokens(), 8);
        assert_eq!(passes[0].plan.region, Region::at_origin(16, 16));
        // Enough memory: one pass of all five.
        let all = plan_step(
            &tiny,
            5,
            8,
            &FabricConfig::rectangle(16, 16).unwrap(),
            Precision::F32,
        )
        .unwrap();
        assert_eq!((all.micro_batch, all.pass_count()), (5, 1));
    }

    #[test]
    fn attention_is_recomputed_only_when_one_sequence_cannot_keep_its_probabilities() {
        let tiny = GptConfig::preset("tiny").unwrap();
        // 64-token sequences on 16 x 16, 4 tokens per row each: per layer and token
        // 8 x 4 + 2 x 16 + 4 = 68 floats besides attention. Keeping the 64 probabilities of one
        // head: 4 x 4 x (2 x (68 + 64) + 26) = 4,640 bytes; with two statistics:
        // 4 x 4 x (2 x 70 + 26) = 2,656. The largest kernel working set beside them is the GELU
        // backward's: X, dY, dX and a scratch tile of 4 tokens x 16 of the 256 hidden features,
        // 4 x 4 x 64 = 1,024 bytes (the streamed kernels need at most 424: the weight gradient
        // of c_fc, X 4 x 4 and dY 4 x 16 tiles (4 x 80), 16 bias slots, a counter pair (8) and
        // one column (4 x 4 gathered + 4 x 4 slots): 320 + 64 + 8 + 32). The blocked attention
        // in key blocks of one row needs less than that: its backward holds dO, dQ, dK, dV
        // (4 x 4 x 4), the block window and partial dK, dV (4 x 4 x 4), D (4), the scores and
        // dP of one row's 4 keys for 4 tokens (2 x 16) and a counter: 165 elements, 660 bytes.
        // One sequence, so both ways take one pass and the probabilities are kept when they fit.
        let plan = |sram| {
            plan_step(
                &tiny,
                1,
                64,
                &fabric_with_sram(16, 16, sram),
                Precision::F32,
            )
        };
        assert!(plan(3_679).is_err(), "2,656 + 1,024 = 3,680 bytes");
        let recompute = plan(3_680).unwrap();
        assert!(recompute.recompute_attention() && recompute.attention_fits);
        assert_eq!(
            (recompute.micro_batch, recompute.resident_bytes),
            (1, 2_656)
        );
        let shape = attention_shape(&tiny, 1, 64);
        let region = recompute.region;
        let fabric = fabric_with_sram(16, 16, 3_680);
        let scratch = |rows| {
            shape
                .blocked_memory(&fabric, region, rows)
                .unwrap()
                .scratch_bytes
        };
        assert_eq!(scratch(1), 660);
        let rows = recompute.attention_block_rows;
        assert!(
            scratch(rows) <= 1_024 && scratch(rows + 1) > 1_024,
            "{rows}"
        );
        // Keeping the probabilities takes room for the unblocked backward's buffers beyond
        // them too: dO, dQ, dK, dV (4 x 16), the window of the sequence's 64 tokens and its
        // partial dK, dV (2 x 2 x 4 x 64), dS and its rows (64 x 4 + 8), the dP of the head
        // (shared by 4 columns: 4 x 64), a counter: 1,609 elements, 6,436 bytes. Short of
        // 4,640 + 6,436 = 11,076, the blocked kernels run (their attention fits; the
        // unblocked one would not).
        let just_short = plan(11_075).unwrap();
        assert!(just_short.recompute_attention() && just_short.attention_fits);
        let keep = plan(11_076).unwrap();
        assert!(!keep.recompute_attention() && keep.attention_fits);
        assert_eq!((keep.micro_batch, keep.resident_bytes), (1, 4_640));
        assert_eq!(keep.attention_block_rows, 0);
    }

    /// The attention's K/V gather (0-3), dK/dV reduction (4-7) and head sums (8-11) use the most
    /// colors of a step's kernels.
    #[test]
    fn a_step_routes_on_the_attentions_twelve_colors() {
        assert_eq!(STEP_COLORS, 12);
    }

    #[test]
    fn a_model_too_big_is_refused_with_bytes_and_advice() {
        let xl = GptConfig::preset("mediswift-xl").unwrap();
        // 100 x 100 PEs: per column 21 of d, 82 of d_ffn, 503 of the vocabulary, 2 heads; 21
        // tokens per row. Even one sequence with the attention recomputed:
        // 4 x 21 x (8 x 21 + 2 x 82 + 4 + 2 x 2) = 28,560 bytes per layer, the head
        // 4 x 21 x (2 x 21 + 2 + 503) = 45,948: 24 x 28,560 + 45,948 = 731,388. The head's
        // weight gradient needs 4 x 21 x (21 + 503) + 4 x 503 + 8 + 4 x 21 + 4 x 21 = 46,204.
        let fabric = FabricConfig::rectangle(100, 100).unwrap();
        let err = plan_step(&xl, 1, 2048, &fabric, Precision::F32)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "the model does not fit the fabric: even one sequence per pass with the attention recomputed, each PE must keep 731388 bytes"
            ),
            "{err}"
        );
        assert!(
            err.contains("(28560 per layer x 24 layers + 45948 for the head) and the largest kernel's working set needs 46204 more, but it has 49152; use a bigger fabric or shorter sequences"),
            "{err}"
        );
    }
}
