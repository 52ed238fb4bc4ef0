//! The exact engine's forward kernels and the loss: embedding, LayerNorm, the weight-streamed
//! products (forward, and the input gradient on the transposed weights), residual adds, GELU and
//! the softmax cross-entropy, each run on the simulator.

use std::borrow::Cow;

use wafersim_kernels::{
    EmbeddingForward, EmbeddingShape, Gelu, KernelError, LayerNorm, ResidualAdd,
    SoftmaxCrossEntropy, StreamMatmul, StreamedMatrix,
};

use super::exact::{Act, Baseline, ExactEngine};
use super::walk::{Cost, Ln, Weight};
use crate::flops::Phase;
use crate::model::Linear;

/// A LayerNorm's output and its per-token statistics.
pub(crate) struct Normed {
    pub y: Act,
    pub mean: Vec<f32>,
    pub rstd: Vec<f32>,
}

impl ExactEngine<'_> {
    pub(crate) fn embed(&mut self) -> Result<(Act, Cost), KernelError> {
        let p = self.inputs.params;
        let kernel = EmbeddingForward {
            shape: self.embedding_shape(),
            token_table: &self.token_table,
            position_table: &p.wpe.data,
        };
        let run = kernel.run(self.fabric(), self.options())?;
        let act = Act {
            data: run.x,
            features: self.inputs.config.n_embd,
        };
        Ok((act, self.measured(&run.stats, run.stats.cycles)))
    }

    pub(crate) fn embedding_shape(&self) -> EmbeddingShape<'_> {
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

    pub(crate) fn layer_norm_forward(
        &mut self,
        ln: Ln,
        x: &Act,
    ) -> Result<(Normed, Cost), KernelError> {
        let params = self.ln_params(ln);
        let kernel = LayerNorm {
            region: self.region(),
            tokens: self.tokens(),
            features: x.features,
            x: &x.data,
            gamma: &params.gamma,
            beta: &params.beta,
            eps: self.inputs.config.layer_norm_epsilon,
        };
        let run = kernel.run(self.fabric(), self.options())?;
        let cost = self.measured(&run.stats, run.stats.cycles);
        let normed = Normed {
            y: Act {
                data: run.y,
                features: x.features,
            },
            mean: run.mean,
            rstd: run.rstd,
        };
        Ok((normed, cost))
    }

    /// The streamed form of `weight` for `phase` (`[in, out]` forward, its transpose for the
    /// input gradient) and its bias.
    fn streamed(&self, weight: Weight, phase: Phase) -> (Cow<'_, StreamedMatrix>, Option<&[f32]>) {
        let forward = phase == Phase::Forward;
        match weight {
            Weight::Linear { layer, kind } => {
                let lin: &Linear = self.inputs.params.blocks[layer].linear(kind);
                let w = &self.sparse[layer][kind.index()];
                if forward {
                    (Cow::Borrowed(w), Some(&lin.bias[..]))
                } else {
                    (Cow::Owned(w.transpose()), None)
                }
            }
            Weight::Head => {
                // wte is `[vocab, d]`: the logits stream its transpose, the input gradient wte.
                let wte = &self.inputs.params.wte;
                let head = StreamedMatrix::from_dense(wte.rows, wte.cols, &wte.data, None);
                let head = if forward { head.transpose() } else { head };
                (Cow::Owned(head), None)
            }
        }
    }

    /// Runs `x w (+ bias)`; for a sparse weight with the dense baseline also times the same
    /// product streaming every weight (once per shape: [`ExactEngine::baselines`]).
    pub(crate) fn streamed_product(
        &mut self,
        weight: Weight,
        phase: Phase,
        x: &Act,
    ) -> Result<(Act, Cost), KernelError> {
        let (w, bias) = self.streamed(weight, phase);
        let (key, features) = ((phase, w.rows(), w.cols()), w.cols());
        let kernel = StreamMatmul {
            region: self.region(),
            tokens: self.tokens(),
            x: &x.data,
            w: &w,
            bias,
            precision: self.precision(),
        };
        let run = kernel.run(&self.streaming, self.options())?;
        let dense_cycles = match self.baseline(weight, &w, key) {
            Baseline::Itself => run.stats.cycles,
            Baseline::Known(cycles) => cycles,
            Baseline::Run(all) => {
                let dense = StreamMatmul { w: &all, ..kernel };
                let cycles = dense.run(&self.streaming, self.options())?.stats.cycles;
                self.baselines.insert(key, cycles);
                cycles
            }
        };
        let cost = self.measured(&run.stats, dense_cycles);
        let act = Act {
            data: run.y,
            features,
        };
        Ok((act, cost))
    }

    pub(crate) fn residual(&mut self, a: &Act, b: &Act) -> Result<(Act, Cost), KernelError> {
        let kernel = ResidualAdd {
            region: self.region(),
            tokens: self.tokens(),
            features: a.features,
            a: &a.data,
            b: &b.data,
        };
        let run = kernel.run(self.fabric(), self.options())?;
        let act = Act {
            data: run.out,
            features: a.features,
        };
        Ok((act, self.measured(&run.stats, run.stats.cycles)))
    }

    pub(crate) fn gelu_forward(&mut self, f: &Act) -> Result<(Act, Cost), KernelError> {
        let kernel = Gelu {
            region: self.region(),
            tokens: self.tokens(),
            features: f.features,
            x: &f.data,
        };
        let run = kernel.run(self.fabric(), self.options())?;
        let act = Act {
            data: run.out,
            features: f.features,
        };
        Ok((act, self.measured(&run.stats, run.stats.cycles)))
    }

    /// The loss (kept) and the gradient of the logits.
    pub(crate) fn loss_and_dlogits(&mut self, logits: &Act) -> Result<(Act, Cost), KernelError> {
        let kernel = SoftmaxCrossEntropy {
            region: self.region(),
            ids: &self.seqs.targets,
            seq_len: self.seqs.seq,
            unscored_prefix: self.seqs.unscored_prefix,
            vocab: logits.features,
            logits: &logits.data,
            loss_scale: self.loss_scale,
        };
        let run = kernel.run(self.fabric(), self.options())?;
        self.loss = run.loss;
        let act = Act {
            data: run.dz,
            features: logits.features,
        };
        Ok((act, self.measured(&run.stats, run.stats.cycles)))
    }
}
