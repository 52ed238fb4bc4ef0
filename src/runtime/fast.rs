//! The fast engine: every kernel of the step is costed by its analytic formula
//! (`estimate_cycles` of its kernel), from the shapes and the kept-entry patterns the exact
//! engine would stream; nothing is simulated and no activation exists.
//!
//! Key design decision: the engine holds no data. An activation is its feature count; the
//! weight-streamed kernels are costed from the masks' kept entries counted once per matrix and
//! orientation (per output column and PE column, [`ColumnCounts`]), so a step of
//! a large model costs O(weights) to count and then O(chunks x columns) per kernel. The dense
//! kernels' formulas read shapes only, so they are called on kernels given no data
//! ([`NO_DATA`]); a test checks that they give the same cycles as with data.
//!
//! What it is not: a check of the kernels' SRAM. The step's resident activations are checked by
//! [`crate::compile`] and the weight-streamed kernels' chunking by their plans, but the dense
//! kernels' scratch is only checked by the exact engine. FMACs are the analytic count.

use wafersim_kernels::{
    Attention, AttentionBackward, ColumnCounts, EmbeddingBackward, EmbeddingForward,
    EmbeddingShape, Gelu, GeluBackward, KernelError, LayerNorm, LayerNormBackward, MatmulShape,
    Precision, Region, ResidualAdd, SoftmaxCrossEntropy, Split, StreamLoad, WeightGradShape,
};
use wafersim_sim::FabricConfig;

use super::attention::attention_shape;
use super::walk::{Cost, Engine, Launched, Ln, Weight};
use super::{Sequences, StepInputs};
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

/// Kept entries of one `[in, out]` matrix per output column and PE column, for both ways it is
/// streamed: as is (forward and weight gradient) and transposed (input gradient).
struct Counts {
    forward: ColumnCounts,
    transposed: ColumnCounts,
}

impl Counts {
    fn new(mask: &Mask, cols: usize) -> Self {
        let (rows, outs, keep) = (mask.rows(), mask.cols(), mask.keep());
        Counts {
            forward: ColumnCounts::streamed(rows, outs, keep, cols),
            transposed: ColumnCounts::streamed_transposed(rows, outs, keep, cols),
        }
    }
}

/// The step's shapes and kept-entry counts.
pub(crate) struct FastEngine<'a> {
    inputs: StepInputs<'a>,
    /// Per layer, the counts of the six sparse matrices.
    counts: Vec<[Counts; 6]>,
    /// The token rows the fabric sees (prompt rows first).
    seqs: Sequences,
}

impl<'a> FastEngine<'a> {
    pub(crate) fn new(inputs: StepInputs<'a>) -> Self {
        let cols = inputs.plan.region.cols as usize;
        let counts = inputs
            .masks
            .layers()
            .iter()
            .map(|masks| SparseKind::ALL.map(|kind| Counts::new(&masks[kind.index()], cols)))
            .collect();
        FastEngine {
            inputs,
            counts,
            seqs: inputs.sequences(),
        }
    }

    fn region(&self) -> Region {
        self.inputs.plan.region
    }

    fn tokens(&self) -> usize {
        self.inputs.plan.tokens()
    }

    fn precision(&self) -> Precision {
        self.inputs.plan.precision
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

    fn embedding_shape(&self) -> EmbeddingShape<'_> {
        let c = self.inputs.config;
        EmbeddingShape {
            region: self.region(),
            ids: &self.seqs.ids,
            seq_len: self.seqs.seq,
            vocab: c.vocab_size + self.inputs.prompt_len(),
            positions: c.n_positions,
            features: c.n_embd,
        }
    }

    /// `(rows, columns)` of `weight` as stored (`[in, out]`; the head `[d, vocab]` as the
    /// logits stream it) and its kept-entry counts (`None`: dense).
    fn weight(&self, weight: Weight) -> (usize, usize, Option<&Counts>) {
        match weight {
            Weight::Linear { layer, kind } => {
                let mask = &self.inputs.masks.layers()[layer][kind.index()];
                (
                    mask.rows(),
                    mask.cols(),
                    Some(&self.counts[layer][kind.index()]),
                )
            }
            Weight::Head => (
                self.inputs.config.n_embd,
                self.inputs.config.vocab_size,
                None,
            ),
        }
    }

    /// Cycles of the kept entries and of every entry, by `estimate` on the plan's chunks.
    fn streamed(
        &self,
        counts: Option<&ColumnCounts>,
        inputs: Split,
        chunks: &[std::ops::Range<usize>],
        estimate: impl Fn(&StreamLoad) -> u64,
    ) -> (u64, u64) {
        let dense = || estimate(&StreamLoad::dense(inputs, chunks));
        match counts {
            Some(counts) => {
                let load = counts.load(chunks);
                let cycles = estimate(&load);
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
        let (rows, cols, counts) = self.weight(weight);
        let forward = phase == Phase::Forward;
        let (k, n) = if forward { (rows, cols) } else { (cols, rows) };
        let shape = MatmulShape {
            region: self.region(),
            tokens: self.tokens(),
            k,
            n,
            bias: forward && matches!(weight, Weight::Linear { .. }),
            precision: self.precision(),
        };
        let plan = shape.plan(self.fabric())?;
        let counts = counts.map(|c| if forward { &c.forward } else { &c.transposed });
        let (cycles, dense_cycles) =
            self.streamed(counts, plan.input.features, &plan.chunks, |load| {
                shape.estimate_cycles(self.fabric(), &plan, load)
            });
        let cost = Cost {
            dense_cycles,
            ..self.cost(cycles)
        };
        Ok((Shape { features: n }, cost))
    }

    fn weight_grad(&mut self, weight: Weight, _x: &Shape, _dy: &Shape) -> Launched<()> {
        let (k, n, counts) = self.weight(weight);
        let shape = WeightGradShape {
            region: self.region(),
            tokens: self.tokens(),
            k,
            n,
            bias: matches!(weight, Weight::Linear { .. }),
            precision: self.precision(),
        };
        let plan = shape.plan(self.fabric())?;
        let counts = counts.map(|c| &c.forward);
        let (cycles, dense_cycles) =
            self.streamed(counts, plan.input.features, &plan.chunks, |load| {
                shape.estimate_cycles(self.fabric(), &plan, load)
            });
        let cost = Cost {
            dense_cycles,
            ..self.cost(cycles)
        };
        Ok(((), cost))
    }

    fn attention(
        &mut self,
        _layer: usize,
        q: &Shape,
        _k: &Shape,
        _v: &Shape,
    ) -> Launched<(Shape, ())> {
        let kernel = Attention {
            region: self.region(),
            shape: attention_shape(self.inputs.config, self.inputs.batch.batch, self.seqs.seq),
            q: NO_DATA,
            k: NO_DATA,
            v: NO_DATA,
        };
        let cycles = nonzero(kernel.estimate_cycles(self.fabric()))?;
        Ok(((*q, ()), self.cost(cycles)))
    }

    fn attention_backward(
        &mut self,
        _layer: usize,
        qkv: [&Shape; 3],
        _probs: &(),
        _d_ctx: &Shape,
    ) -> Launched<[Shape; 3]> {
        let kernel = AttentionBackward {
            region: self.region(),
            shape: attention_shape(self.inputs.config, self.inputs.batch.batch, self.seqs.seq),
            q: NO_DATA,
            k: NO_DATA,
            v: NO_DATA,
            d_out: NO_DATA,
            probs: NO_DATA,
        };
        let cycles = nonzero(kernel.estimate_cycles(self.fabric()))?;
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
        };
        Ok((*logits, self.cost(kernel.estimate_cycles(self.fabric()))))
    }

    fn layer_norm_backward(
        &mut self,
        _ln: Ln,
        _dy: &Shape,
        x: &Shape,
        _normed: &Shape,
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
        };
        Ok((*x, self.cost(kernel.estimate_cycles(self.fabric()))))
    }

    fn embedding_backward(&mut self, _dx: &Shape) -> Launched<()> {
        let kernel = EmbeddingBackward {
            shape: self.embedding_shape(),
            dx: NO_DATA,
        };
        Ok(((), self.cost(kernel.estimate_cycles(self.fabric()))))
    }
}

/// The attention formulas answer 0 for a shape their region refuses.
fn nonzero(cycles: u64) -> Result<u64, KernelError> {
    if cycles == 0 {
        return Err(KernelError::Shape {
            kernel: "attention",
            reason: "the region cannot hold this attention (the exact fidelity names the reason)"
                .into(),
        });
    }
    Ok(cycles)
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
            kernel.estimate_cycles(&fabric)
        };
        assert!(attention(&data) > 0);
        assert_eq!(attention(NO_DATA), attention(&data));
    }
}
