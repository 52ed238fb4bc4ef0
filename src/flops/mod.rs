//! Analytic FLOP accounting for one training step of a GPT model, dense and sparse.
//!
//! What it is: for every operation of a step (each linear layer, attention matmul, LM head,
//! LayerNorm, softmax, GELU, bias and residual add, embedding, loss), per layer and per phase
//! (forward, input-gradient, weight-gradient), the FLOPs of the dense model and of the sparse one,
//! with matmul and non-matmul work kept apart. What it is NOT: a profiler or a timing model. It
//! never looks at weight values, only at shapes and nonzero counts ([`NnzSource`]).
//!
//! Key design decision: every figure is an exact `u64` computed from nonzero counts, with checked
//! arithmetic, because the simulator's executed FMACs must equal the sparse counts exactly
//! (`2 x FMACs == sparse FLOPs` for every matmul it runs). Ratios are derived last, as `f64`.
//!
//! The convention (`docs/flops.md`): one multiply-add = 2 FLOPs; a matmul
//! `[M x K] x [K x N]` is `2 M N K`; a training step is forward + input-gradient + weight-gradient,
//! so a dense matmul costs 3 x its forward. With `T = batch x seq` tokens:
//! - the six sparsified linears (Q, K, V, attention output, FFN fc and fc_proj), `[K x N]` with
//!   `nnz` nonzeros, cost `2 T nnz` in each phase (only nonzeros get a gradient); dense is
//!   `nnz = K N`;
//! - attention `Q K^T` and `A V` cost `2 S S head_dim` per head per sequence in the forward pass,
//!   in full unless [`FlopOptions::causal_halving`]. Their backward matmuls (`dQ`, `dK`, `dA`,
//!   `dV`) all produce activation gradients, none a weight gradient, so attention backward is
//!   counted under [`Phase::InputGrad`] as 2 x forward and its weight-gradient is 0;
//! - the LM head (tied to `wte`) computes logits at all `S` positions, `2 T d V` per phase:
//!   input-gradient `dX = dLogits W^T`, weight-gradient `dW = X^T dLogits`;
//! - the embedding lookup is free. The first block's input gradient is still counted, as PyTorch
//!   computes it for the embeddings.
//!
//! This reproduces `torch.utils.flop_counter.FlopCounterMode` exactly for the dense matmul total
//! of a Hugging Face GPT-2 training step (`scripts/flop_counter_check.py`,
//! `tests/flops_vs_pytorch.rs`). Non-matmul work follows the per-element convention of
//! [`flops_per_element`].

mod elementwise;

pub use elementwise::flops_per_element;

use crate::model::{GptConfig, ModelError, SparseKind};

/// A phase of a training step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// The forward pass.
    Forward,
    /// Backward, gradients with respect to activations (including attention's backward matmuls).
    InputGrad,
    /// Backward, gradients with respect to parameters.
    WeightGrad,
}

impl Phase {
    /// All three, in execution order; [`Phase::index`] is the position here.
    pub const ALL: [Phase; 3] = [Phase::Forward, Phase::InputGrad, Phase::WeightGrad];

    /// Position in [`Phase::ALL`] (and in the `[u64; 3]` arrays of this module).
    pub fn index(self) -> usize {
        self as usize
    }

    /// `forward`, `input_grad` or `weight_grad`.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::InputGrad => "input_grad",
            Phase::WeightGrad => "weight_grad",
        }
    }
}

/// One operation of the step. Block operations carry a layer in [`OpFlops::layer`]; the
/// embedding, final LayerNorm, LM head and loss do not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpKind {
    /// Embedding: token row + position row (the lookup itself is free).
    Embedding,
    /// `ln_1`, before attention.
    LayerNorm1,
    /// A sparsifiable linear layer's matmul `X W` (the bias is [`OpKind::Bias`]).
    Linear(SparseKind),
    /// The bias add of a linear layer.
    Bias(SparseKind),
    /// `Q K^T`, per head.
    AttnScores,
    /// Scaling the scores by `1 / sqrt(head_dim)` (the causal mask is a selection: free).
    AttnScale,
    /// Softmax over each row of scores.
    Softmax,
    /// `A V`, per head.
    AttnValues,
    /// The residual add after attention.
    ResidualAttn,
    /// `ln_2`, before the FFN.
    LayerNorm2,
    /// GELU (tanh form) on the FFN hidden layer.
    Gelu,
    /// The residual add after the FFN.
    ResidualFfn,
    /// `ln_f`, after the last block.
    FinalLayerNorm,
    /// The LM head `X wte^T`.
    LmHead,
    /// Softmax cross-entropy over the vocabulary, at the `S - 1` positions that have a target.
    CrossEntropy,
}

impl OpKind {
    /// A block's operations in execution order.
    pub const BLOCK: [OpKind; 21] = [
        OpKind::LayerNorm1,
        OpKind::Linear(SparseKind::Q),
        OpKind::Bias(SparseKind::Q),
        OpKind::Linear(SparseKind::K),
        OpKind::Bias(SparseKind::K),
        OpKind::Linear(SparseKind::V),
        OpKind::Bias(SparseKind::V),
        OpKind::AttnScores,
        OpKind::AttnScale,
        OpKind::Softmax,
        OpKind::AttnValues,
        OpKind::Linear(SparseKind::AttnProj),
        OpKind::Bias(SparseKind::AttnProj),
        OpKind::ResidualAttn,
        OpKind::LayerNorm2,
        OpKind::Linear(SparseKind::Fc),
        OpKind::Bias(SparseKind::Fc),
        OpKind::Gelu,
        OpKind::Linear(SparseKind::FcProj),
        OpKind::Bias(SparseKind::FcProj),
        OpKind::ResidualFfn,
    ];

    /// Operations after the last block, in execution order.
    pub const HEAD: [OpKind; 3] = [OpKind::FinalLayerNorm, OpKind::LmHead, OpKind::CrossEntropy];

    /// A stable short name for reports (`q`, `fc_bias`, `attn_scores`, `ln_f`, ...).
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Embedding => "embedding",
            OpKind::LayerNorm1 => "ln_1",
            OpKind::Linear(kind) => kind.name(),
            OpKind::Bias(kind) => bias_name(kind),
            OpKind::AttnScores => "attn_scores",
            OpKind::AttnScale => "attn_scale",
            OpKind::Softmax => "softmax",
            OpKind::AttnValues => "attn_values",
            OpKind::ResidualAttn => "residual_attn",
            OpKind::LayerNorm2 => "ln_2",
            OpKind::Gelu => "gelu",
            OpKind::ResidualFfn => "residual_ffn",
            OpKind::FinalLayerNorm => "ln_f",
            OpKind::LmHead => "lm_head",
            OpKind::CrossEntropy => "cross_entropy",
        }
    }

    /// Whether the operation is a matmul (counted in the matmul totals).
    pub fn is_matmul(self) -> bool {
        matches!(
            self,
            OpKind::Linear(_) | OpKind::AttnScores | OpKind::AttnValues | OpKind::LmHead
        )
    }

    /// Whether sparsity changes the operation's FLOPs (the six sparsified matmuls).
    pub fn is_sparse(self) -> bool {
        matches!(self, OpKind::Linear(_))
    }
}

fn bias_name(kind: SparseKind) -> &'static str {
    match kind {
        SparseKind::Q => "q_bias",
        SparseKind::K => "k_bias",
        SparseKind::V => "v_bias",
        SparseKind::AttnProj => "attn_proj_bias",
        SparseKind::Fc => "fc_bias",
        SparseKind::FcProj => "fc_proj_bias",
    }
}

/// The token shape of one training step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepShape {
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence (at most the model's `n_positions`).
    pub seq: usize,
}

impl StepShape {
    /// Checks `batch >= 1` and `1 <= seq <= config.n_positions`; the error names the field.
    pub fn check(&self, config: &GptConfig) -> Result<(), FlopError> {
        let shape_error = |field, value, reason: &str| FlopError::Shape {
            field,
            value,
            reason: reason.to_string(),
        };
        if self.batch == 0 {
            return Err(shape_error("batch", self.batch, "must be at least 1"));
        }
        if self.seq == 0 {
            return Err(shape_error("seq", self.seq, "must be at least 1"));
        }
        if self.seq > config.n_positions {
            let reason = format!("exceeds the model's n_positions {}", config.n_positions);
            return Err(shape_error("seq", self.seq, &reason));
        }
        Ok(())
    }
}

/// Knobs of the convention.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlopOptions {
    /// Halve attention's `Q K^T` and `A V` (all phases) for the causal mask. Off by default, as
    /// PyTorch computes the full products. Softmax and scaling stay full either way.
    pub causal_halving: bool,
}

/// What can go wrong computing FLOPs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FlopError {
    #[error("sparsity {value} is not a number in [0, 1)")]
    Sparsity { value: f64 },
    #[error("{field} {value} {reason}")]
    Shape {
        field: &'static str,
        value: usize,
        reason: String,
    },
    #[error("{nnz} nonzeros do not fit a {k} x {n} matrix")]
    NnzExceedsMatrix { nnz: u64, k: u64, n: u64 },
    #[error("layer {layer} `{kind}`: {nnz} nonzeros exceed the matrix's {numel} elements")]
    NnzExceedsNumel {
        layer: usize,
        kind: &'static str,
        nnz: u64,
        numel: u64,
    },
    #[error("nonzero counts are given for {got} layers, the model has {expected}")]
    LayerCount { expected: usize, got: usize },
    #[error("the FLOPs of {what} overflow 64 bits")]
    Overflow { what: &'static str },
    #[error(transparent)]
    Config(#[from] ModelError),
}

/// Checks that `sparsity` is a number in `[0, 1)` and returns it.
pub fn check_sparsity(sparsity: f64) -> Result<f64, FlopError> {
    crate::sparsity::validate(sparsity).map_err(|_| FlopError::Sparsity { value: sparsity })
}

/// THE definition of how many nonzeros a matrix of `numel` elements keeps at `sparsity`:
/// `numel - round(sparsity * numel)`, with `f64::round` (halves away from zero).
///
/// It is [`crate::sparsity::pruned_count`] read from the other side, so the
/// analytic sparse FLOPs and the simulator's executed FMACs agree to the unit. Callers check
/// `sparsity` with [`check_sparsity`] first; out-of-range values are clamped to `[0, numel]`.
pub fn nnz_for(numel: u64, sparsity: f64) -> u64 {
    numel - crate::sparsity::pruned_count(numel as usize, sparsity) as u64
}

/// `[forward, input_grad, weight_grad]` FLOPs of one linear layer `Y[T x N] = X[T x K] W[K x N]`
/// whose weight has `nnz` nonzeros: `2 tokens nnz` in every phase (dense: `nnz = K N`).
pub fn linear_flops(tokens: u64, k: u64, n: u64, nnz: u64) -> Result<[u64; 3], FlopError> {
    let numel = k.checked_mul(n);
    if numel.is_none_or(|numel| nnz > numel) {
        return Err(FlopError::NnzExceedsMatrix { nnz, k, n });
    }
    let per_phase = product("a linear layer", &[2, tokens, nnz])?;
    Ok([per_phase; 3])
}

/// `(in, out)` of a sparsifiable matrix ([`SparseKind::shape`]) as counts.
fn matrix_shape(config: &GptConfig, kind: SparseKind) -> (u64, u64) {
    let (rows, cols) = kind.shape(config);
    (rows as u64, cols as u64)
}

/// The number of nonzeros of every sparsified matrix, per layer, in [`SparseKind::ALL`] order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NnzSource {
    per_layer: Vec<[u64; 6]>,
}

impl NnzSource {
    /// Every matrix full.
    pub fn dense(config: &GptConfig) -> Self {
        let row = SparseKind::ALL.map(|kind| numel(config, kind));
        Self {
            per_layer: vec![row; config.n_layer],
        }
    }

    /// Every matrix at `sparsity`, with [`nnz_for`] (what the mask module builds).
    pub fn uniform(config: &GptConfig, sparsity: f64) -> Result<Self, FlopError> {
        let sparsity = check_sparsity(sparsity)?;
        Self::from_fn(config, |_, kind| nnz_for(numel(config, kind), sparsity))
    }

    /// Explicit counts, e.g. those of a loaded sparse checkpoint: `nnz(layer, kind)`.
    pub fn from_fn(
        config: &GptConfig,
        nnz: impl Fn(usize, SparseKind) -> u64,
    ) -> Result<Self, FlopError> {
        let mut per_layer = Vec::with_capacity(config.n_layer);
        for layer in 0..config.n_layer {
            let mut row = [0; 6];
            for kind in SparseKind::ALL {
                let (count, numel) = (nnz(layer, kind), numel(config, kind));
                if count > numel {
                    return Err(FlopError::NnzExceedsNumel {
                        layer,
                        kind: kind.name(),
                        nnz: count,
                        numel,
                    });
                }
                row[kind.index()] = count;
            }
            per_layer.push(row);
        }
        Ok(Self { per_layer })
    }

    /// The nonzeros of matrix `kind` in layer `layer`, if the layer exists.
    pub fn get(&self, layer: usize, kind: SparseKind) -> Option<u64> {
        self.per_layer.get(layer).map(|row| row[kind.index()])
    }

    /// Number of layers described.
    pub fn n_layer(&self) -> usize {
        self.per_layer.len()
    }
}

fn numel(config: &GptConfig, kind: SparseKind) -> u64 {
    let (k, n) = matrix_shape(config, kind);
    k * n
}

/// The FLOPs of one operation in one phase (of one layer, or of the whole model).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpFlops {
    /// The block, or `None` for the embedding, final LayerNorm, LM head and loss.
    pub layer: Option<usize>,
    pub op: OpKind,
    pub phase: Phase,
    /// FLOPs with every weight present.
    pub dense: u64,
    /// FLOPs with the [`NnzSource`]'s nonzeros (equal to `dense` unless `op.is_sparse()`).
    pub sparse: u64,
}

impl OpFlops {
    /// Whether this is matmul work.
    pub fn is_matmul(&self) -> bool {
        self.op.is_matmul()
    }
}

/// One operation's FLOPs summed over layers, indexed by [`Phase::index`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpTotals {
    pub op: OpKind,
    pub dense: [u64; 3],
    pub sparse: [u64; 3],
}

impl OpTotals {
    /// Dense FLOPs over the three phases.
    pub fn dense_total(&self) -> u64 {
        self.dense.iter().sum()
    }

    /// Sparse FLOPs over the three phases.
    pub fn sparse_total(&self) -> u64 {
        self.sparse.iter().sum()
    }
}

/// The FLOPs of one training step, per operation, layer and phase, with checked totals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlopReport {
    ops: Vec<OpFlops>,
    matmul_dense: u64,
    matmul_sparse: u64,
    non_matmul: u64,
}

/// The FLOPs of the operations a step runs ([`FlopReport::of_step`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepFlops {
    /// Matmul FLOPs with the masks' nonzeros.
    pub matmul_sparse: u64,
    /// The same matmuls with every weight present.
    pub matmul_dense: u64,
    pub non_matmul: u64,
}

impl StepFlops {
    /// The matmul FLOP reduction, dense / sparse.
    pub fn reduction(&self) -> f64 {
        self.matmul_dense as f64 / self.matmul_sparse as f64
    }
}

impl FlopReport {
    /// Every (layer, operation, phase), in execution order of the forward pass, phases in
    /// [`Phase::ALL`] order; zero entries (e.g. attention's weight-gradient) included.
    pub fn ops(&self) -> &[OpFlops] {
        &self.ops
    }

    /// Dense matmul FLOPs of the step (all phases).
    pub fn matmul_dense(&self) -> u64 {
        self.matmul_dense
    }

    /// Sparse matmul FLOPs of the step (all phases).
    pub fn matmul_sparse(&self) -> u64 {
        self.matmul_sparse
    }

    /// Non-matmul FLOPs of the step (all phases; unchanged by sparsity).
    pub fn non_matmul(&self) -> u64 {
        self.non_matmul
    }

    /// The matmul FLOP reduction, dense / sparse.
    pub fn reduction(&self) -> f64 {
        self.matmul_dense as f64 / self.matmul_sparse as f64
    }

    /// The FLOPs of the step that runs: all of them with the weight gradients, or, for a frozen
    /// model (a prompt step), everything but the weight-gradient phase, except the embedding's
    /// scatter (it gives the prompt vectors their gradient).
    pub fn of_step(&self, weight_gradients: bool) -> StepFlops {
        let runs = |o: &&OpFlops| {
            weight_gradients || o.phase != Phase::WeightGrad || o.op == OpKind::Embedding
        };
        let mut step = StepFlops::default();
        for o in self.ops.iter().filter(runs) {
            if o.is_matmul() {
                step.matmul_sparse += o.sparse;
                step.matmul_dense += o.dense;
            } else {
                step.non_matmul += o.dense;
            }
        }
        step
    }

    /// The entry for `op` in `layer` and `phase`.
    pub fn get(&self, layer: Option<usize>, op: OpKind, phase: Phase) -> Option<&OpFlops> {
        self.ops
            .iter()
            .find(|e| e.layer == layer && e.op == op && e.phase == phase)
    }

    /// Each operation summed over layers, in order of first appearance.
    pub fn by_op(&self) -> Vec<OpTotals> {
        let mut totals: Vec<OpTotals> = Vec::new();
        for entry in &self.ops {
            let index = match totals.iter().position(|t| t.op == entry.op) {
                Some(index) => index,
                None => {
                    totals.push(OpTotals {
                        op: entry.op,
                        dense: [0; 3],
                        sparse: [0; 3],
                    });
                    totals.len() - 1
                }
            };
            // Cannot overflow: every partial sum is at most a checked total.
            let t = &mut totals[index];
            t.dense[entry.phase.index()] += entry.dense;
            t.sparse[entry.phase.index()] += entry.sparse;
        }
        totals
    }
}

/// The sizes the formulas use, as `u64`.
struct Dims {
    batch: u64,
    seq: u64,
    tokens: u64,
    /// Positions with a next-token target: `batch (seq - 1)`.
    loss_rows: u64,
    d: u64,
    heads: u64,
    head_dim: u64,
    vocab: u64,
    config: GptConfig,
}

impl Dims {
    fn new(config: &GptConfig, shape: StepShape) -> Result<Self, FlopError> {
        let (batch, seq) = (shape.batch as u64, shape.seq as u64);
        Ok(Self {
            batch,
            seq,
            tokens: product("the token count", &[batch, seq])?,
            loss_rows: product("the loss rows", &[batch, seq - 1])?,
            d: config.n_embd as u64,
            heads: config.n_head as u64,
            head_dim: config.head_dim() as u64,
            vocab: config.vocab_size as u64,
            config: config.clone(),
        })
    }
}

/// The FLOPs of one training step of `config` on `shape` tokens with `nnz` nonzeros.
pub fn step_flops(
    config: &GptConfig,
    shape: StepShape,
    nnz: &NnzSource,
    opts: FlopOptions,
) -> Result<FlopReport, FlopError> {
    config.validate()?;
    shape.check(config)?;
    if nnz.n_layer() != config.n_layer {
        return Err(FlopError::LayerCount {
            expected: config.n_layer,
            got: nnz.n_layer(),
        });
    }
    let dims = Dims::new(config, shape)?;
    let mut ops = Vec::new();
    push_op(&mut ops, &dims, opts, None, OpKind::Embedding, None)?;
    for (layer, row) in nnz.per_layer.iter().enumerate() {
        for op in OpKind::BLOCK {
            push_op(&mut ops, &dims, opts, Some(layer), op, Some(row))?;
        }
    }
    for op in OpKind::HEAD {
        push_op(&mut ops, &dims, opts, None, op, None)?;
    }
    report_from(ops)
}

fn push_op(
    ops: &mut Vec<OpFlops>,
    dims: &Dims,
    opts: FlopOptions,
    layer: Option<usize>,
    op: OpKind,
    layer_nnz: Option<&[u64; 6]>,
) -> Result<(), FlopError> {
    let (dense, sparse) = op_flops(dims, opts, op, layer_nnz)?;
    for phase in Phase::ALL {
        ops.push(OpFlops {
            layer,
            op,
            phase,
            dense: dense[phase.index()],
            sparse: sparse[phase.index()],
        });
    }
    Ok(())
}

/// `(dense, sparse)` FLOPs per phase of `op`; `layer_nnz` only matters for the sparse linears.
fn op_flops(
    dims: &Dims,
    opts: FlopOptions,
    op: OpKind,
    layer_nnz: Option<&[u64; 6]>,
) -> Result<([u64; 3], [u64; 3]), FlopError> {
    if let Some(per_element) = flops_per_element(op) {
        return same(elementwise::op_flops(dims, op, per_element)?);
    }
    match op {
        OpKind::Linear(kind) => {
            let (k, n) = matrix_shape(&dims.config, kind);
            let nnz = layer_nnz.map_or(k * n, |row| row[kind.index()]);
            let dense = linear_flops(dims.tokens, k, n, k * n)?;
            Ok((dense, linear_flops(dims.tokens, k, n, nnz)?))
        }
        OpKind::AttnScores | OpKind::AttnValues => same(attention_flops(dims, opts)?),
        // The remaining matmul (every other operation has a per-element cost): the LM head.
        _ => same([product("the LM head", &[2, dims.tokens, dims.d, dims.vocab])?; 3]),
    }
}

fn same(flops: [u64; 3]) -> Result<([u64; 3], [u64; 3]), FlopError> {
    Ok((flops, flops))
}

/// One attention matmul (`Q K^T` or `A V`): forward `2 S S head_dim` per head per sequence,
/// input-gradient twice that (two matmuls of the same size), no weight-gradient.
fn attention_flops(dims: &Dims, opts: FlopOptions) -> Result<[u64; 3], FlopError> {
    let full = product(
        "attention",
        &[2, dims.batch, dims.heads, dims.seq, dims.seq, dims.head_dim],
    )?;
    // 2 S S head_dim is even, so halving is exact.
    let forward = if opts.causal_halving { full / 2 } else { full };
    let input_grad = product("attention", &[2, forward])?;
    Ok([forward, input_grad, 0])
}

fn report_from(ops: Vec<OpFlops>) -> Result<FlopReport, FlopError> {
    let sum = |what, pick: &dyn Fn(&OpFlops) -> Option<u64>| {
        ops.iter()
            .filter_map(pick)
            .try_fold(0u64, u64::checked_add)
            .ok_or(FlopError::Overflow { what })
    };
    let matmul = |e: &OpFlops| e.is_matmul();
    Ok(FlopReport {
        matmul_dense: sum("the matmul total", &|e| matmul(e).then_some(e.dense))?,
        matmul_sparse: sum("the matmul total", &|e| matmul(e).then_some(e.sparse))?,
        non_matmul: sum("the non-matmul total", &|e| (!matmul(e)).then_some(e.dense))?,
        ops,
    })
}

/// The product of `factors`, or an overflow error naming `what`.
fn product(what: &'static str, factors: &[u64]) -> Result<u64, FlopError> {
    factors
        .iter()
        .try_fold(1u64, |acc, &f| acc.checked_mul(f))
        .ok_or(FlopError::Overflow { what })
}

#[cfg(test)]
mod tests;
