//! The fast engine: every kernel of the step is costed by its analytic formula
//! (`estimate_cycles` of its kernel), from the shapes and the kept-entry patterns the exact
//! engine would stream; nothing is simulated and no activation exists.
//!
//! Key design decision: the engine holds no data, not even weights. An activation is its
//! feature count; the weight-streamed kernels are costed from the masks' kept entries per
//! (chunk, PE column) of each kernel's plan, counted from the masks' bits when the engine is
//! built (`loads.rs`, the matrices in parallel), so a step of a large model costs about one pass
//! over the mask bits and then O(chunks x columns) per kernel. The sparse kernels are costed
//! when the engine is built, in parallel; kernels that are the same in every block (the dense
//! baseline, attention) are costed once, and the passes of one plan share the engine. The dense
//! kernels' formulas read shapes only, so they are called on kernels given no data
//! ([`NO_DATA`]); a test checks that they give the same cycles as with data.
//!
//! What it is not: a check of the kernels' SRAM. The step's resident activations and, beside them,
//! the largest kernel's working set are checked by [`crate::compile`], and the weight-streamed
//! kernels' chunking by their plans; the attention's buffers, which grow with the sequence, are
//! reported by the callers ([`crate::compile::attention_memory`]) and costed even where they do
//! not fit (`docs/scale.md`). FMACs are the analytic count.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Range;

use rayon::prelude::*;
use wafersim_kernels::{
    Attention, AttentionBackward, BlockedAttention, BlockedAttentionBackward, EmbeddingBackward,
    EmbeddingForward, EmbeddingShape, Gelu, GeluBackward, LayerNorm, LayerNormBackward,
    MatmulShape, Region, ResidualAdd, SoftmaxCrossEntropy, Split, StreamLoad, WeightGradShape,
};
use wafersim_sim::FabricConfig;

use super::CostInputs;
use super::Sequences;
use super::loads;
use super::walk::{Cost, Engine, Launched, Ln, Weight};
use crate::compile::attention_shape;
use crate::flops::Phase;
use crate::model::SparseKind;
use crate::sparsity::Mask;

/// The data handed to a kernel that is only costed: its formula reads shapes only.
const NO_DATA: &[f32] = &[];

/// An activation as the fast engine knows it: how many features it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shape {
    pub features: usize,
}

/// A load, the chunks it was counted for, and the kernel's cycles with it.
struct ChunkedLoad {
    chunks: Vec<Range<usize>>,
    load: StreamLoad,
    cycles: u64,
}

/// Kept entries of one `[in, out]` matrix per (chunk, PE column) for the plans of the three
/// kernels that stream it (`None` where the plan failed: the kernel reports why when it runs).
struct MatrixLoads {
    forward: Option<ChunkedLoad>,
    input_grad: Option<ChunkedLoad>,
    weight_grad: Option<ChunkedLoad>,
}

/// The shape of the product streaming a `k x n` weight (bias in the forward only).
fn matmul_shape(inputs: &CostInputs<'_>, k: usize, n: usize, bias: bool) -> MatmulShape {
    MatmulShape {
        region: inputs.plan.region,
        tokens: inputs.plan.tokens(),
        k,
        n,
        bias,
        precision: inputs.plan.precision,
    }
}

fn weight_grad_shape(inputs: &CostInputs<'_>, k: usize, n: usize, bias: bool) -> WeightGradShape {
    WeightGradShape {
        region: inputs.plan.region,
        tokens: inputs.plan.tokens(),
        k,
        n,
        bias,
        precision: inputs.plan.precision,
    }
}

/// The loads of `mask` for the plans of its three kernels, and their cycles (the matrices are
/// costed in parallel when the engine is built; the walk then only looks them up).
fn matrix_loads(inputs: &CostInputs<'_>, fabric: &FabricConfig, mask: &Mask) -> MatrixLoads {
    let (rows, cols) = (mask.rows(), mask.cols());
    if mask.is_dense() {
        // Costed as the dense baseline (`FastEngine::kept`): nothing to count.
        return MatrixLoads {
            forward: None,
            input_grad: None,
            weight_grad: None,
        };
    }
    let forward = matmul_shape(inputs, rows, cols, true);
    let forward = forward.plan(fabric).ok().map(|p| {
        let load = loads::streamed(mask, p.input.features, &p.chunks);
        let cycles = forward.estimate_cycles(fabric, &p, &load);
        ChunkedLoad {
            chunks: p.chunks,
            load,
            cycles,
        }
    });
    let input_grad = matmul_shape(inputs, cols, rows, false);
    let input_grad = input_grad.plan(fabric).ok().map(|p| {
        let load = loads::transposed(mask, p.input.features, &p.chunks);
        let cycles = input_grad.estimate_cycles(fabric, &p, &load);
        ChunkedLoad {
            chunks: p.chunks,
            load,
            cycles,
        }
    });
    let weight_grad = weight_grad_shape(inputs, rows, cols, true);
    let weight_grad = weight_grad.plan(fabric).ok().map(|p| {
        let load = loads::streamed(mask, p.input.features, &p.chunks);
        let cycles = weight_grad.estimate_cycles(fabric, &p, &load);
        ChunkedLoad {
            chunks: p.chunks,
            load,
            cycles,
        }
    });
    MatrixLoads {
        forward,
        input_grad,
        weight_grad,
    }
}

/// A weight-streamed kernel streaming every weight: phase, `k`, `n`, and whether it adds a bias.
type DenseKey = (Phase, usize, usize, bool);

/// The step's shapes and kept-entry loads.
pub(crate) struct FastEngine<'a> {
    inputs: CostInputs<'a>,
    /// The fabric as the weight-streamed kernels see it (the SRAM the resident activations
    /// leave).
    streaming: FabricConfig,
    /// Per layer, the loads of the six sparse matrices.
    loads: Vec<[MatrixLoads; 6]>,
    /// Cycles of a weight-streamed kernel streaming every weight, by `(phase, k, n, bias)`: the
    /// same in every layer, so costed once (the formulas take most of a large step's costing
    /// time). The bias is part of the kernel: the head (no bias) may share the FFN's shape.
    dense: RefCell<HashMap<DenseKey, u64>>,
    /// Cycles of the attention forward and backward kernels: the same in every layer.
    attention: [Option<u64>; 2],
    /// `(cycles, dense cycles)` of each sparse matrix's kernels, by `(layer, kind, phase)`:
    /// every pass of one plan streams the same kept entries.
    sparse: HashMap<(usize, SparseKind, Phase), (u64, u64)>,
    /// The token rows the fabric sees (prompt rows first).
    seqs: Sequences,
}

impl<'a> FastEngine<'a> {
    pub(crate) fn new(inputs: CostInputs<'a>) -> Self {
        let streaming = inputs.plan.streaming_fabric(inputs.fabric);
        let loads = inputs
            .masks
            .layers()
            .par_iter()
            .map(|masks| {
                SparseKind::ALL.map(|kind| matrix_loads(&inputs, &streaming, &masks[kind.index()]))
            })
            .collect();
        FastEngine {
            inputs,
            streaming,
            loads,
            dense: RefCell::new(HashMap::new()),
            attention: [None; 2],
            sparse: HashMap::new(),
            seqs: inputs.sequences(),
        }
    }

    /// Whether this engine's loads and memos hold for `plan`.
    pub(crate) fn plans(&self, plan: &crate::compile::StepPlan) -> bool {
        self.inputs.plan == plan
    }

    /// The same engine for another pass of the same plan (its token ids).
    pub(crate) fn next_pass(&mut self, inputs: CostInputs<'a>) {
        self.seqs = inputs.sequences();
        self.inputs = inputs;
    }

    fn matmul_shape(&self, k: usize, n: usize, bias: bool) -> MatmulShape {
        matmul_shape(&self.inputs, k, n, bias)
    }

    fn weight_grad_shape(&self, k: usize, n: usize, bias: bool) -> WeightGradShape {
        weight_grad_shape(&self.inputs, k, n, bias)
    }

    /// The load of sparse matrix `kind` of `layer` in `phase` for `chunks` and, if the engine
    /// costed it when built, its cycles (counted now if the plan differs, which it does not for
    /// the plans the engine was built with).
    fn load(
        &self,
        (layer, kind): (usize, SparseKind),
        phase: Phase,
        inputs: Split,
        chunks: &[Range<usize>],
    ) -> Option<(Cow<'_, StreamLoad>, Option<u64>)> {
        let mask = self.inputs.masks.get(layer, kind)?;
        let loads = self.loads.get(layer).map(|l| &l[kind.index()]);
        let cached = loads.and_then(|l| match phase {
            Phase::Forward => l.forward.as_ref(),
            Phase::InputGrad => l.input_grad.as_ref(),
            Phase::WeightGrad => l.weight_grad.as_ref(),
        });
        Some(match cached {
            Some(c) if c.chunks == chunks => (Cow::Borrowed(&c.load), Some(c.cycles)),
            _ if phase == Phase::InputGrad => {
                (Cow::Owned(loads::transposed(mask, inputs, chunks)), None)
            }
            _ => (Cow::Owned(loads::streamed(mask, inputs, chunks)), None),
        })
    }

    fn region(&self) -> Region {
        self.inputs.plan.region
    }

    fn tokens(&self) -> usize {
        self.inputs.plan.tokens()
    }

    fn fabric(&self) -> &FabricConfig {
        self.inputs.fabric
    }

    fn cost(&self, cycles: u64) -> Cost {
        Cost {
            cycles,
            dense_cycles: cycles,
            fmacs: None,
            busy_cycles: None,
            router_forwards: None,
        }
    }

    /// The forward attention over the plan's region and sequences, without data (for its
    /// formulas).
    fn attention_kernel(&self) -> Attention<'static> {
        Attention {
            region: self.region(),
            shape: attention_shape(self.inputs.config, self.inputs.batch.batch, self.seqs.seq),
            q: NO_DATA,
            k: NO_DATA,
            v: NO_DATA,
        }
    }

    /// The blocked forward of the plan (shapes only).
    fn blocked_attention(&self) -> BlockedAttention<'static> {
        let unblocked = self.attention_kernel();
        BlockedAttention {
            region: unblocked.region,
            shape: unblocked.shape,
            block_rows: self.inputs.plan.attention_block_rows,
            q: NO_DATA,
            k: NO_DATA,
            v: NO_DATA,
        }
    }

    fn embedding_shape(&self) -> EmbeddingShape<'_> {
        let c = self.inputs.config;
        EmbeddingShape {
            region: self.region(),
            ids: &self.seqs.ids,
            seq_len: self.seqs.seq,
            vocab: c.vocab_size + self.inputs.prompt_len,
            positions: c.n_positions,
            features: c.n_embd,
        }
    }

    /// `(rows, columns)` of `weight` as stored (`[in, out]`; the head `[d, vocab]` as the
    /// logits stream it) and, for a sparse matrix, its layer and kind (`None`: dense).
    fn weight(&self, weight: Weight) -> (usize, usize, Option<(usize, SparseKind)>) {
        let c = self.inputs.config;
        match weight {
            Weight::Linear { layer, kind } => {
                let (rows, cols) = kind.shape(c);
                (rows, cols, Some((layer, kind)))
            }
            Weight::Head => (c.n_embd, c.vocab_size, None),
        }
    }

    /// The cost of a sparse matrix's kernel in `phase` if an earlier pass costed it.
    fn memo(&self, sparse: Option<(usize, SparseKind)>, phase: Phase) -> Option<Cost> {
        let (layer, kind) = sparse?;
        let &(cycles, dense_cycles) = self.sparse.get(&(layer, kind, phase))?;
        Some(Cost {
            dense_cycles,
            ..self.cost(cycles)
        })
    }

    fn remember(&mut self, sparse: Option<(usize, SparseKind)>, phase: Phase, cost: (u64, u64)) {
        if let Some((layer, kind)) = sparse {
            self.sparse.insert((layer, kind, phase), cost);
        }
    }

    /// The sparse matrix whose kept entries to count: `None` for a dense weight, or a mask
    /// keeping every entry (costed as the dense baseline, once).
    fn kept(&self, sparse: Option<(usize, SparseKind)>) -> Option<(usize, SparseKind)> {
        sparse.filter(|&(l, k)| self.inputs.masks.get(l, k).is_some_and(|m| !m.is_dense()))
    }

    /// Cycles of the kept entries and of every entry, by `estimate` on the plan's chunks (`key`
    /// names the kernel for the dense memo).
    fn streamed(
        &self,
        key: DenseKey,
        load: Option<(Cow<'_, StreamLoad>, Option<u64>)>,
        inputs: Split,
        chunks: &[Range<usize>],
        estimate: impl Fn(&StreamLoad) -> u64,
    ) -> (u64, u64) {
        let dense = || {
            let known = self.dense.borrow().get(&key).copied();
            known.unwrap_or_else(|| {
                let cycles = estimate(&StreamLoad::dense(inputs, chunks));
                self.dense.borrow_mut().insert(key, cycles);
                cycles
            })
        };
        match load {
            Some((load, known)) => {
                let cycles = known.unwrap_or_else(|| estimate(&load));
                let all = if self.inputs.dense_baseline {
                    dense()
                } else {
                    cycles
                };
                (cycles, all)
            }
            None => {
                let cycles = dense();
                (cycles, cycles)
            }
        }
    }
}

impl Engine for FastEngine<'_> {
    type Act = Shape;
    type Normed = Shape;
    type Probs = ();

    fn output(normed: &Shape) -> &Shape {
        normed
    }

    fn embedding(&mut self) -> Launched<Shape> {
        let kernel = EmbeddingForward {
            shape: self.embedding_shape(),
            token_table: NO_DATA,
            position_table: NO_DATA,
        };
        let features = self.inputs.config.n_embd;
        Ok((
            Shape { features },
            self.cost(kernel.estimate_cycles(self.fabric())),
        ))
    }

    fn layer_norm(&mut self, _ln: Ln, x: &Shape) -> Launched<Shape> {
        let kernel = LayerNorm {
            region: self.region(),
            tokens: self.tokens(),
            features: x.features,
            x: NO_DATA,
            gamma: NO_DATA,
            beta: NO_DATA,
            eps: self.inputs.config.layer_norm_epsilon,
        };
        Ok((*x, self.cost(kernel.estimate_cycles(self.fabric()))))
    }

    fn matmul(&mut self, weight: Weight, phase: Phase, _x: &Shape) -> Launched<Shape> {
        let (rows, cols, sparse) = self.weight(weight);
        let forward = phase == Phase::Forward;
        let (k, n) = if forward { (rows, cols) } else { (cols, rows) };
        if let Some(cost) = self.memo(sparse, phase) {
            return Ok((Shape { features: n }, cost));
        }
        let bias = forward && sparse.is_some();
        let shape = self.matmul_shape(k, n, bias);
        let plan = shape.plan(&self.streaming)?;
        let load = self
            .kept(sparse)
            .and_then(|m| self.load(m, phase, plan.input.features, &plan.chunks));
        let (cycles, dense_cycles) = self.streamed(
            (phase, k, n, bias),
            load,
            plan.input.features,
            &plan.chunks,
            |load| shape.estimate_cycles(&self.streaming, &plan, load),
        );
        self.remember(sparse, phase, (cycles, dense_cycles));
        let cost = Cost {
            dense_cycles,
            ..self.cost(cycles)
        };
        Ok((Shape { features: n }, cost))
    }

    fn weight_grad(&mut self, weight: Weight, _x: &Shape, _dy: &Shape) -> Launched<()> {
        let (k, n, sparse) = self.weight(weight);
        if let Some(cost) = self.memo(sparse, Phase::WeightGrad) {
            return Ok(((), cost));
        }
        let bias = sparse.is_some();
        let shape = self.weight_grad_shape(k, n, bias);
        let plan = shape.plan(&self.streaming)?;
        let load = self
            .kept(sparse)
            .and_then(|m| self.load(m, Phase::WeightGrad, plan.input.features, &plan.chunks));
        let key = (Phase::WeightGrad, k, n, bias);
        let (cycles, dense_cycles) =
            self.streamed(key, load, plan.input.features, &plan.chunks, |load| {
                shape.estimate_cycles(&self.streaming, &plan, load)
            });
        self.remember(sparse, Phase::WeightGrad, (cycles, dense_cycles));
        let cost = Cost {
            dense_cycles,
            ..self.cost(cycles)
        };
        Ok(((), cost))
    }

    /// The unblocked forward, or the blocked one where the plan keeps only the softmax
    /// statistics. The same in every layer, so costed once.
    fn attention(
        &mut self,
        _layer: usize,
        q: &Shape,
        _k: &Shape,
        _v: &Shape,
    ) -> Launched<(Shape, ())> {
        let cycles = match self.attention[0] {
            Some(cycles) => cycles,
            None if self.inputs.plan.recompute_attention() => {
                self.blocked_attention().estimate_cycles(self.fabric())?
            }
            None => self.attention_kernel().estimate_cycles(self.fabric())?,
        };
        self.attention[0] = Some(cycles);
        Ok(((*q, ()), self.cost(cycles)))
    }

    /// The unblocked backward from the kept probabilities, or the blocked one (its prelude and
    /// runs, the probabilities recomputed) from the statistics.
    fn attention_backward(
        &mut self,
        _layer: usize,
        qkv: [&Shape; 3],
        _kept: &(),
        _ctx: &Shape,
        _d_ctx: &Shape,
    ) -> Launched<[Shape; 3]> {
        let cycles = match self.attention[1] {
            Some(cycles) => cycles,
            None if self.inputs.plan.recompute_attention() => {
                let forward = self.blocked_attention();
                let kernel = BlockedAttentionBackward {
                    region: forward.region,
                    shape: forward.shape,
                    block_rows: forward.block_rows,
                    q: NO_DATA,
                    k: NO_DATA,
                    v: NO_DATA,
                    out: NO_DATA,
                    d_out: NO_DATA,
                    max: NO_DATA,
                    sum: NO_DATA,
                };
                kernel.estimate_cycles(self.fabric())?
            }
            None => {
                let kernel = AttentionBackward {
                    region: self.region(),
                    shape: attention_shape(
                        self.inputs.config,
                        self.inputs.batch.batch,
                        self.seqs.seq,
                    ),
                    q: NO_DATA,
                    k: NO_DATA,
                    v: NO_DATA,
                    d_out: NO_DATA,
                    probs: NO_DATA,
                };
                kernel.estimate_cycles(self.fabric())?
            }
        };
        self.attention[1] = Some(cycles);
        Ok((qkv.map(|s| *s), self.cost(cycles)))
    }

    fn add(&mut self, a: &Shape, _b: &Shape) -> Launched<Shape> {
        let kernel = ResidualAdd {
            region: self.region(),
            tokens: self.tokens(),
            features: a.features,
            a: NO_DATA,
            b: NO_DATA,
        };
        Ok((*a, self.cost(kernel.estimate_cycles(self.fabric()))))
    }

    fn gelu(&mut self, f: &Shape) -> Launched<Shape> {
        let kernel = Gelu {
            region: self.region(),
            tokens: self.tokens(),
            features: f.features,
            x: NO_DATA,
        };
        Ok((*f, self.cost(kernel.estimate_cycles(self.fabric()))))
    }

    fn gelu_backward(&mut self, f: &Shape, _dg: &Shape) -> Launched<Shape> {
        let kernel = GeluBackward {
            region: self.region(),
            tokens: self.tokens(),
            features: f.features,
            x: NO_DATA,
            dy: NO_DATA,
        };
        Ok((*f, self.cost(kernel.estimate_cycles(self.fabric()))))
    }

    fn cross_entropy(&mut self, logits: &Shape) -> Launched<Shape> {
        let kernel = SoftmaxCrossEntropy {
            region: self.region(),
            ids: &self.seqs.targets,
            seq_len: self.seqs.seq,
            unscored_prefix: self.seqs.unscored_prefix,
            vocab: logits.features,
            logits: NO_DATA,
            loss_scale: 1.0,
        };
        Ok((*logits, self.cost(kernel.estimate_cycles(self.fabric()))))
    }

    fn layer_norm_backward(
        &mut self,
        _ln: Ln,
        _dy: &Shape,
        x: &Shape,
        _normed: &Shape,
        parameters_trained: bool,
    ) -> Launched<Shape> {
        let kernel = LayerNormBackward {
            region: self.region(),
            tokens: self.tokens(),
            features: x.features,
            dy: NO_DATA,
            x: NO_DATA,
            gamma: NO_DATA,
            mean: NO_DATA,
            rstd: NO_DATA,
            parameter_gradients: parameters_trained,
        };
        Ok((*x, self.cost(kernel.estimate_cycles(self.fabric()))))
    }

    fn embedding_backward(&mut self, _dx: &Shape, _parameters_trained: bool) -> Launched<()> {
        let kernel = EmbeddingBackward {
            shape: self.embedding_shape(),
            dx: NO_DATA,
        };
        Ok(((), self.cost(kernel.estimate_cycles(self.fabric()))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast engine hands the dense kernels no data: their formulas must read shapes only.
    #[test]
    fn dense_kernel_formulas_give_the_same_cycles_without_data() {
        let fabric = FabricConfig::rectangle(4, 4).unwrap();
        let region = Region::at_origin(2, 4);
        let (tokens, features) = (8, 16);
        let data: Vec<f32> = (0..tokens * features).map(|i| i as f32 * 0.01).collect();
        let (per_token, gamma) = (vec![1.0; tokens], vec![1.0; features]);
        let ln = |x: &[f32], g: &[f32]| {
            let kernel = LayerNorm {
                region,
                tokens,
                features,
                x,
                gamma: g,
                beta: g,
                eps: 1e-5,
            };
            kernel.estimate_cycles(&fabric)
        };
        assert_eq!(ln(NO_DATA, NO_DATA), ln(&data, &gamma));
        let ln_back = |d: &[f32], g: &[f32], s: &[f32]| {
            let kernel = LayerNormBackward {
                region,
                tokens,
                features,
                dy: d,
                x: d,
                gamma: g,
                mean: s,
                rstd: s,
                parameter_gradients: true,
            };
            kernel.estimate_cycles(&fabric)
        };
        assert_eq!(
            ln_back(NO_DATA, NO_DATA, NO_DATA),
            ln_back(&data, &gamma, &per_token)
        );
        let add = |a: &[f32]| {
            let kernel = ResidualAdd {
                region,
                tokens,
                features,
                a,
                b: a,
            };
            kernel.estimate_cycles(&fabric)
        };
        assert_eq!(add(NO_DATA), add(&data));
        let gelu = |x: &[f32]| {
            let kernel = GeluBackward {
                region,
                tokens,
                features,
                x,
                dy: x,
            };
            kernel.estimate_cycles(&fabric)
        };
        assert_eq!(gelu(NO_DATA), gelu(&data));
        let ids: Vec<u32> = (0..tokens as u32).collect();
        let ce = |logits: &[f32]| {
            let kernel = SoftmaxCrossEntropy {
                region,
                ids: &ids,
                seq_len: 4,
                unscored_prefix: 0,
                vocab: features,
                logits,
                loss_scale: 1.0,
            };
            kernel.estimate_cycles(&fabric)
        };
        assert_eq!(ce(NO_DATA), ce(&data));
        let shape = wafersim_kernels::AttentionShape {
            batch: 2,
            seq_len: 4,
            heads: 2,
            features,
            scale: 0.5,
        };
        let attention = |q: &[f32]| {
            let kernel = Attention {
                region,
                shape,
                q,
                k: q,
                v: q,
            };
            kernel.estimate_cycles(&fabric).unwrap()
        };
        assert!(attention(&data) > 0);
        assert_eq!(attention(NO_DATA), attention(&data));
    }

    /// Timing the dense baseline changes no operation's own cycles. The tiny model's head
    /// (64 x 256, no bias) has the shape of its FFN's first product (64 x 256, with a bias):
    /// the dense memo once served the head the FFN's cycles, 64 more per forward.
    #[test]
    fn the_dense_baseline_leaves_every_operations_cycles_alone() {
        use crate::compile::plan_step;
        use crate::model::GptConfig;
        use crate::reference::Batch;
        use crate::runtime::{GradientSet, cost_step};
        use crate::sparsity::ModelMasks;
        let config = GptConfig::preset("tiny").unwrap();
        assert_eq!(config.vocab_size, config.n_inner);
        let masks = ModelMasks::random(&config, 0.5, 1).unwrap();
        let batch = Batch::new(&config, 2, 32, (0..64).collect()).unwrap();
        let fabric = FabricConfig::rectangle(16, 16).unwrap();
        let plan = plan_step(&config, 2, 32, &fabric, wafersim_kernels::Precision::F32).unwrap();
        let cost = |dense_baseline| {
            let inputs = CostInputs {
                config: &config,
                masks: &masks,
                batch: &batch,
                fabric: &fabric,
                plan: &plan,
                dense_baseline,
                prompt_len: 0,
                gradients: GradientSet::All,
            };
            let records = cost_step(inputs).unwrap().records;
            records
                .iter()
                .map(|r| (r.op.label(), r.cycles))
                .collect::<Vec<_>>()
        };
        assert_eq!(cost(true), cost(false));
    }
}
