//! The exact engine's causal multi-head attention, forward and backward, run on the simulator.

use wafersim_kernels::{Attention, AttentionBackward, AttentionShape, KernelError};

use crate::compile::attention_shape;

use super::exact::{Act, ExactEngine};
use super::walk::Cost;

impl ExactEngine<'_> {
    fn shape(&self) -> AttentionShape {
        attention_shape(self.inputs.config, self.inputs.batch.batch, self.seqs.seq)
    }

    /// The context of an attention and its probabilities (kept for the backward).
    pub(crate) fn attention_forward(
        &mut self,
        q: &Act,
        k: &Act,
        v: &Act,
    ) -> Result<((Act, Vec<f32>), Cost), KernelError> {
        let kernel = Attention {
            region: self.region(),
            shape: self.shape(),
            q: &q.data,
            k: &k.data,
            v: &v.data,
        };
        let run = kernel.run(self.fabric(), self.options())?;
        let cost = self.measured(&run.stats, run.stats.cycles);
        let ctx = Act {
            data: run.out,
            features: q.features,
        };
        Ok(((ctx, run.probs), cost))
    }

    /// `dQ, dK, dV` of an attention given the context's gradient.
    pub(crate) fn attention_grads(
        &mut self,
        [q, k, v]: [&Act; 3],
        probs: &[f32],
        d_ctx: &Act,
    ) -> Result<([Act; 3], Cost), KernelError> {
        let kernel = AttentionBackward {
            region: self.region(),
            shape: self.shape(),
            q: &q.data,
            k: &k.data,
            v: &v.data,
            d_out: &d_ctx.data,
            probs,
        };
        let run = kernel.run(self.fabric(), self.options())?;
        let cost = self.measured(&run.stats, run.stats.cycles);
        let f = d_ctx.features;
        let act = |data| Act { data, features: f };
        Ok(([act(run.dq), act(run.dk), act(run.dv)], cost))
    }
}
