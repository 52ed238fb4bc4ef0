//! The exact engine's backward kernels: masked weight gradients streamed out, LayerNorm and GELU
//! backward, the embedding's gradient, each run on the simulator; the gradients they stream out
//! are assembled into the engine's [`crate::model::GptParams`].

use std::borrow::Cow;

use wafersim_kernels::{
    EmbeddingBackward, GeluBackward, KernelError, LayerNormBackward, StreamedMatrix, WeightGrad,
};

use super::exact::{Act, Baseline, ExactEngine};
use super::forward::Normed;
use super::walk::{Cost, Ln, Weight};
use crate::flops::Phase;
use crate::model::LayerNorm as LnParams;

impl ExactEngine<'_> {
    /// The masked weight gradient `x^T dy` at `weight`'s kept entries (and, for a linear layer,
    /// the bias gradient), stored in the engine's gradients.
    pub(crate) fn masked_weight_grad(
        &mut self,
        weight: Weight,
        x: &Act,
        dy: &Act,
    ) -> Result<Cost, KernelError> {
        let (pattern, bias) = match weight {
            Weight::Linear { layer, kind } => {
                (Cow::Borrowed(&self.sparse[layer][kind.index()]), true)
            }
            Weight::Head => {
                let wte = &self.inputs.params.wte;
                let head = StreamedMatrix::from_dense(wte.rows, wte.cols, &wte.data, None);
                (Cow::Owned(head.transpose()), false)
            }
        };
        let kernel = WeightGrad {
            region: self.region(),
            tokens: self.tokens(),
            x: &x.data,
            dy: &dy.data,
            pattern: &pattern,
            bias,
            precision: self.precision(),
        };
        let run = kernel.run(&self.streaming, self.options())?;
        // The kernel reads only the pattern's positions: one that keeps every entry is the
        // dense baseline's own.
        let key = (Phase::WeightGrad, pattern.rows(), pattern.cols());
        let dense_cycles = match self.baseline(weight, &pattern, key) {
            Baseline::Itself => run.stats.cycles,
            Baseline::Known(cycles) => cycles,
            Baseline::Run(all) => {
                let dense = WeightGrad {
                    pattern: &all,
                    ..kernel
                };
                let cycles = dense.run(&self.streaming, self.options())?.stats.cycles;
                self.baselines.insert(key, cycles);
                cycles
            }
        };
        let cost = self.measured(&run.stats, dense_cycles);
        drop(pattern);
        match weight {
            Weight::Linear { layer, kind } => {
                let target = self.grads.blocks[layer].linear_mut(kind);
                target.weight.data = run.grad.to_dense();
                target.bias = run.bias_grad.expect("asked for the bias gradient");
            }
            Weight::Head => {
                // The gradient is `[d, V]`: the transpose of wte's layout.
                let wte = &mut self.grads.wte;
                let (d, v) = (wte.cols, wte.rows);
                for (i, g) in run.grad.to_dense().into_iter().enumerate() {
                    wte.data[(i % v) * d + i / v] += g;
                }
            }
        }
        Ok(cost)
    }

    pub(crate) fn layer_norm_grad(
        &mut self,
        ln: Ln,
        dy: &Act,
        x: &Act,
        normed: &Normed,
        parameters_trained: bool,
    ) -> Result<(Act, Cost), KernelError> {
        let params = self.ln_params(ln);
        let kernel = LayerNormBackward {
            region: self.region(),
            tokens: self.tokens(),
            features: x.features,
            dy: &dy.data,
            x: &x.data,
            gamma: &params.gamma,
            mean: &normed.mean,
            rstd: &normed.rstd,
            parameter_gradients: parameters_trained,
        };
        let run = kernel.run(self.fabric(), self.options())?;
        let cost = self.measured(&run.stats, run.stats.cycles);
        if let Some(grads) = run.parameter_gradients {
            *self.ln_grads(ln) = LnParams {
                gamma: grads.dgamma,
                beta: grads.dbeta,
            };
        }
        let act = Act {
            data: run.dx,
            features: x.features,
        };
        Ok((act, cost))
    }

    pub(crate) fn gelu_grad(&mut self, f: &Act, dg: &Act) -> Result<(Act, Cost), KernelError> {
        let kernel = GeluBackward {
            region: self.region(),
            tokens: self.tokens(),
            features: f.features,
            x: &f.data,
            dy: &dg.data,
        };
        let run = kernel.run(self.fabric(), self.options())?;
        let act = Act {
            data: run.out,
            features: f.features,
        };
        Ok((act, self.measured(&run.stats, run.stats.cycles)))
    }

    /// The prompt's gradient and, if `parameters_trained`, the embedding tables': added to wte (the
    /// head's part is already there), wpe.
    pub(crate) fn embedding_grad(
        &mut self,
        dx: &Act,
        parameters_trained: bool,
    ) -> Result<Cost, KernelError> {
        let kernel = EmbeddingBackward {
            shape: self.embedding_shape(),
            dx: &dx.data,
        };
        let run = kernel.run(self.fabric(), self.options())?;
        let (wte_part, prompt_part) = run.d_token_table.split_at(self.grads.wte.data.len());
        if parameters_trained {
            for (g, d) in self.grads.wte.data.iter_mut().zip(wte_part) {
                *g += d;
            }
            self.grads.wpe.data = run.d_position_table;
        }
        if let Some(prompt) = self.inputs.prompt {
            self.prompt_grad = Some(crate::model::Matrix {
                rows: prompt.rows,
                cols: prompt.cols,
                data: prompt_part.to_vec(),
            });
        }
        Ok(self.measured(&run.stats, run.stats.cycles))
    }
}
