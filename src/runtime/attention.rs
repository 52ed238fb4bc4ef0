//! The exact engine's causal multi-head attention, forward and backward, run on the simulator:
//! the unblocked kernels where the plan keeps the probabilities, the blocked ones (key blocks of
//! the plan's rows, the probabilities recomputed in the backward) where it keeps only the
//! softmax statistics.

use wafersim_kernels::{
    Attention, AttentionBackward, AttentionShape, BlockedAttention, BlockedAttentionBackward,
    KernelError, Runs,
};
use wafersim_sim::{RunOptions, Stats};

use crate::compile::attention_shape;

use super::exact::{Act, ExactEngine};
use super::walk::Cost;

/// What the forward keeps for the backward.
#[derive(Clone, Debug)]
pub(crate) enum Kept {
    /// The probabilities, `[batch][head][query][key]`.
    Probabilities(Vec<f32>),
    /// The softmax statistics per `[batch][head][query]`: the maximum of the scaled scores and
    /// the sum of their exponentials.
    Statistics { max: Vec<f32>, sum: Vec<f32> },
}

/// The runs of a multi-run kernel as the engine sees them: each run's trace window and its
/// measured cost, added up.
struct EngineRuns<'e, 'a> {
    engine: &'e ExactEngine<'a>,
    cost: Cost,
}

impl Runs for EngineRuns<'_, '_> {
    fn next(&mut self) -> RunOptions {
        self.engine.options()
    }

    fn finished(&mut self, stats: &Stats) {
        let run = self.engine.measured(stats, stats.cycles);
        self.cost = self.cost.then(run);
    }
}

impl<'a> ExactEngine<'a> {
    fn shape(&self) -> AttentionShape {
        attention_shape(self.inputs.config, self.inputs.batch.batch, self.seqs.seq)
    }

    fn blocked_runs(&self) -> EngineRuns<'_, 'a> {
        let none = Some(0);
        EngineRuns {
            engine: self,
            cost: Cost {
                cycles: 0,
                dense_cycles: 0,
                fmacs: none,
                busy_cycles: none,
                router_forwards: none,
            },
        }
    }

    /// The context of an attention and what it keeps for the backward.
    pub(crate) fn attention_forward(
        &mut self,
        q: &Act,
        k: &Act,
        v: &Act,
    ) -> Result<((Act, Kept), Cost), KernelError> {
        let plan = self.inputs.plan;
        let ctx = |data| Act {
            data,
            features: q.features,
        };
        if plan.recompute_attention() {
            let kernel = BlockedAttention {
                region: self.region(),
                shape: self.shape(),
                block_rows: plan.attention_block_rows,
                q: &q.data,
                k: &k.data,
                v: &v.data,
            };
            let mut runs = self.blocked_runs();
            let run = kernel.run(self.fabric(), &mut runs)?;
            let cost = runs.cost;
            let kept = Kept::Statistics {
                max: run.max,
                sum: run.sum,
            };
            return Ok(((ctx(run.out), kept), cost));
        }
        let kernel = Attention {
            region: self.region(),
            shape: self.shape(),
            q: &q.data,
            k: &k.data,
            v: &v.data,
        };
        let run = kernel.run(self.fabric(), self.options())?;
        let cost = self.measured(&run.stats, run.stats.cycles);
        Ok(((ctx(run.out), Kept::Probabilities(run.probs)), cost))
    }

    /// `dQ, dK, dV` of an attention given the context `ctx` and its gradient.
    pub(crate) fn attention_grads(
        &mut self,
        [q, k, v]: [&Act; 3],
        kept: &Kept,
        ctx: &Act,
        d_ctx: &Act,
    ) -> Result<([Act; 3], Cost), KernelError> {
        let f = d_ctx.features;
        let act = |data| Act { data, features: f };
        let (dq, dk, dv, cost) = match kept {
            Kept::Probabilities(probs) => {
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
                (run.dq, run.dk, run.dv, cost)
            }
            Kept::Statistics { max, sum } => {
                let kernel = BlockedAttentionBackward {
                    region: self.region(),
                    shape: self.shape(),
                    block_rows: self.inputs.plan.attention_block_rows,
                    q: &q.data,
                    k: &k.data,
                    v: &v.data,
                    out: &ctx.data,
                    d_out: &d_ctx.data,
                    max,
                    sum,
                };
                let mut runs = self.blocked_runs();
                let run = kernel.run(self.fabric(), &mut runs)?;
                let cost = runs.cost;
                (run.dq, run.dk, run.dv, cost)
            }
        };
        Ok(([act(dq), act(dk), act(dv)], cost))
    }
}
