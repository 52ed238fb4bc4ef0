//! Causal multi-head attention on the fabric, forward and backward.

use wafersim_kernels::{Attention, AttentionBackward, AttentionShape};

use super::forward::LayerActs;
use super::record::Op;
use super::{Act, RuntimeError, Step, kernel_error};
use crate::flops::Phase;

impl Step<'_> {
    fn attention_shape(&self) -> AttentionShape {
        let c = self.inputs.config;
        let scale = if c.scale_attn_weights {
            1.0 / (c.head_dim() as f32).sqrt()
        } else {
            1.0
        };
        AttentionShape {
            batch: self.inputs.batch.batch,
            seq_len: self.inputs.batch.seq,
            heads: c.n_head,
            features: c.n_embd,
            scale,
        }
    }

    /// FMACs of the attention matmuls in one phase: `B S^2 d` per matmul (full, not causal),
    /// two matmuls forward, four backward.
    fn attention_fmacs(&self, phase: Phase) -> u64 {
        let (b, s, d) = (
            self.inputs.batch.batch,
            self.inputs.batch.seq,
            self.inputs.config.n_embd,
        );
        let per_matmul = (b * s * s * d) as u64;
        if phase == Phase::Forward {
            2 * per_matmul
        } else {
            4 * per_matmul
        }
    }

    /// The context of layer `l`'s attention and its probabilities (kept for the backward).
    pub(crate) fn attention_forward(
        &mut self,
        l: usize,
        q: &Act,
        k: &Act,
        v: &Act,
    ) -> Result<(Act, Vec<f32>), RuntimeError> {
        let op = Op::attention(l, Phase::Forward);
        let kernel = Attention {
            region: self.region(),
            shape: self.attention_shape(),
            q: &q.data,
            k: &k.data,
            v: &v.data,
        };
        let run = kernel
            .run(self.fabric(), self.options())
            .map_err(kernel_error(&op))?;
        self.check_fmacs(
            &op,
            run.stats.total.fmacs,
            self.attention_fmacs(Phase::Forward),
        )?;
        self.record(op, &run.stats);
        Ok((
            Act {
                data: run.out,
                features: q.features,
            },
            run.probs,
        ))
    }

    /// `dQ, dK, dV` of layer `l`'s attention given the context's gradient.
    pub(crate) fn attention_backward(
        &mut self,
        l: usize,
        a: &LayerActs,
        d_ctx: &Act,
    ) -> Result<(Act, Act, Act), RuntimeError> {
        let op = Op::attention(l, Phase::InputGrad);
        let kernel = AttentionBackward {
            region: self.region(),
            shape: self.attention_shape(),
            q: &a.q.data,
            k: &a.k.data,
            v: &a.v.data,
            d_out: &d_ctx.data,
            probs: &a.probs,
        };
        let run = kernel
            .run(self.fabric(), self.options())
            .map_err(kernel_error(&op))?;
        self.check_fmacs(
            &op,
            run.stats.total.fmacs,
            self.attention_fmacs(Phase::InputGrad),
        )?;
        self.record(op, &run.stats);
        let f = d_ctx.features;
        let act = |data| Act { data, features: f };
        Ok((act(run.dq), act(run.dk), act(run.dv)))
    }
}
