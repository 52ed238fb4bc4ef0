//! The schedule of a training step: every kernel instance in forward / loss / backward order,
//! written once and walked by either engine ([`super::exact`] runs each kernel on the simulator,
//! [`super::fast`] costs it by its formula).
//!
//! Key design decision: the order of operations, which activation feeds which kernel, the
//! operation records and the per-operation FLOP check live here and nowhere else, so the two
//! fidelities cannot drift apart: they produce the same [`OpRecord`]s, the same operations in
//! the same order.
//! What an engine does with a kernel (and what an activation is to it) is its own business.
//!
//! What this is not: a kernel launcher. It knows which kernel comes next and what it reads, not
//! how to place data or time a run.

use wafersim_kernels::KernelError;

use super::record::{Op, OpRecord, StepCost};
use super::{CostInputs, GradientSet, RuntimeError};
use crate::flops::{OpKind, Phase};
use crate::model::SparseKind;

/// Which LayerNorm of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ln {
    /// `ln_1` of a block.
    First(usize),
    /// `ln_2` of a block.
    Second(usize),
    /// The final LayerNorm.
    Final,
}

impl Ln {
    fn layer(self) -> Option<usize> {
        match self {
            Ln::First(l) | Ln::Second(l) => Some(l),
            Ln::Final => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Ln::First(_) => "ln_1",
            Ln::Second(_) => "ln_2",
            Ln::Final => "ln_f",
        }
    }
}

/// Which weight a matmul streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Weight {
    /// One of the six sparse matrices of a block (`[in, out]`, with its bias).
    Linear { layer: usize, kind: SparseKind },
    /// The LM head, tied to the token embedding (`[vocab, d]`, no bias).
    Head,
}

/// What one kernel run cost, as an engine measured or estimated it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cost {
    pub cycles: u64,
    /// The same kernel streaming every weight (equal to `cycles` for dense kernels).
    pub dense_cycles: u64,
    /// FMACs the simulator executed (`None`: not simulated, the analytic count stands).
    pub fmacs: Option<u64>,
    pub busy_cycles: Option<u64>,
    pub router_forwards: Option<u64>,
}

impl Cost {
    /// A kernel that runs `self`, then `next` (a multi-run kernel): cycles and counts added.
    pub fn then(self, next: Cost) -> Cost {
        let add = |a: Option<u64>, b: Option<u64>| Some(a? + b?);
        Cost {
            cycles: self.cycles + next.cycles,
            dense_cycles: self.dense_cycles + next.dense_cycles,
            fmacs: add(self.fmacs, next.fmacs),
            busy_cycles: add(self.busy_cycles, next.busy_cycles),
            router_forwards: add(self.router_forwards, next.router_forwards),
        }
    }
}

/// The output of one kernel instance and what it cost.
pub(crate) type Launched<T> = Result<(T, Cost), KernelError>;

/// What runs the kernels of a step. Each method runs (or costs) one kernel instance; `Act` is
/// an activation between kernels as the engine keeps it.
pub(crate) trait Engine {
    type Act;
    /// A LayerNorm's output with what its backward reads.
    type Normed;
    /// What the attention forward keeps for the backward (probabilities or statistics).
    type Probs;

    /// The normalised output of a LayerNorm.
    fn output(normed: &Self::Normed) -> &Self::Act;
    fn embedding(&mut self) -> Launched<Self::Act>;
    fn layer_norm(&mut self, ln: Ln, x: &Self::Act) -> Launched<Self::Normed>;
    /// `x W (+ b)` (forward) or `x W^T` (input gradient).
    fn matmul(&mut self, weight: Weight, phase: Phase, x: &Self::Act) -> Launched<Self::Act>;
    /// The masked weight gradient `x^T dy` (and the bias gradient of a linear layer).
    fn weight_grad(&mut self, weight: Weight, x: &Self::Act, dy: &Self::Act) -> Launched<()>;
    fn attention(
        &mut self,
        layer: usize,
        q: &Self::Act,
        k: &Self::Act,
        v: &Self::Act,
    ) -> Launched<(Self::Act, Self::Probs)>;
    /// `dQ, dK, dV` from what the forward kept (`probs`: the probabilities, or where the plan
    /// recomputes them, the softmax statistics) and its output `ctx`.
    fn attention_backward(
        &mut self,
        layer: usize,
        qkv: [&Self::Act; 3],
        probs: &Self::Probs,
        ctx: &Self::Act,
        d_ctx: &Self::Act,
    ) -> Launched<[Self::Act; 3]>;
    fn add(&mut self, a: &Self::Act, b: &Self::Act) -> Launched<Self::Act>;
    fn gelu(&mut self, f: &Self::Act) -> Launched<Self::Act>;
    fn gelu_backward(&mut self, f: &Self::Act, dg: &Self::Act) -> Launched<Self::Act>;
    /// The loss (kept by the engine) and the gradient of the logits.
    fn cross_entropy(&mut self, logits: &Self::Act) -> Launched<Self::Act>;
    /// `dx`, and the gradients of `gamma` and `beta` if `parameters_trained`.
    fn layer_norm_backward(
        &mut self,
        ln: Ln,
        dy: &Self::Act,
        x: &Self::Act,
        normed: &Self::Normed,
        parameters_trained: bool,
    ) -> Launched<Self::Act>;
    /// The prompt's gradient (if there is a prompt) and, if `parameters_trained`, the token and
    /// position tables'.
    fn embedding_backward(&mut self, dx: &Self::Act, parameters_trained: bool) -> Launched<()>;
}

/// What one block's backward pass reads.
struct Saved<E: Engine> {
    x_in: E::Act,
    ln1: E::Normed,
    q: E::Act,
    k: E::Act,
    v: E::Act,
    probs: E::Probs,
    ctx: E::Act,
    h: E::Act,
    ln2: E::Normed,
    f: E::Act,
    g: E::Act,
}

/// What the head's backward reads.
struct Head<E: Engine> {
    x_final: E::Act,
    ln_f: E::Normed,
    dlogits: E::Act,
}

/// Called after every kernel run with its record.
pub(crate) type OnRecord<'a> = Option<&'a dyn Fn(&OpRecord)>;

/// Walks the whole step (pass `pass` of it) on `engine`: its operation records in execution
/// order (each handed to `on_record` as it is made).
pub(crate) fn walk<E: Engine>(
    engine: &mut E,
    inputs: CostInputs<'_>,
    pass: usize,
    on_record: OnRecord<'_>,
) -> Result<StepCost, RuntimeError> {
    let mut walk = Walk {
        engine,
        inputs,
        pass,
        cost: StepCost::default(),
        on_record,
    };
    let (layers, head) = walk.forward()?;
    walk.backward(&layers, &head)?;
    Ok(walk.cost)
}

struct Walk<'a, E: Engine> {
    engine: &'a mut E,
    inputs: CostInputs<'a>,
    pass: usize,
    cost: StepCost,
    on_record: OnRecord<'a>,
}

impl<E: Engine> Walk<'_, E> {
    /// Runs one kernel instance as `op`, checks its FMACs against the analytic count (matmuls)
    /// and records its cost.
    fn launch<T>(
        &mut self,
        op: Op,
        run: impl FnOnce(&mut E) -> Launched<T>,
    ) -> Result<T, RuntimeError> {
        let (out, cost) = run(self.engine).map_err(|source| RuntimeError::Kernel {
            op: op.label(),
            source,
        })?;
        let analytic = self.analytic_fmacs(&op);
        let recomputed = self.recomputed_fmacs(&op);
        let fmacs = match cost.fmacs {
            Some(executed) if !op.matmuls.is_empty() && executed != analytic + recomputed => {
                return Err(RuntimeError::FlopMismatch {
                    op: op.label(),
                    executed: 2 * executed,
                    analytic: 2 * (analytic + recomputed),
                });
            }
            Some(executed) => executed - recomputed,
            None => analytic,
        };
        self.cost.push(OpRecord {
            op,
            pass: self.pass,
            cycles: cost.cycles,
            dense_cycles: cost.dense_cycles,
            fmacs,
            busy_cycles: cost.busy_cycles,
            router_forwards: cost.router_forwards,
        });
        if let (Some(on_record), Some(record)) = (self.on_record, self.cost.records.last()) {
            on_record(record);
        }
        Ok(out)
    }

    /// FMACs of the FLOP convention's matmuls in `op` (0 for other work): `T x nnz` per phase
    /// for a streamed weight, `B S^2 d` per attention matmul and phase (the backward runs each
    /// twice: `dP` and `dV`, `dQ` and `dK`).
    fn analytic_fmacs(&self, op: &Op) -> u64 {
        let (c, batch, seq) = (self.inputs.config, self.inputs.batch, self.inputs.seq());
        let tokens = (batch.batch * seq) as u64;
        let attention = (batch.batch * seq * seq * c.n_embd) as u64;
        let per_phase = if op.phase == Phase::Forward { 1 } else { 2 };
        op.matmuls
            .iter()
            .map(|m| match m {
                OpKind::Linear(kind) => {
                    let mask = op.layer.and_then(|l| self.inputs.masks.get(l, *kind));
                    tokens * mask.map_or(0, |m| m.nnz() as u64)
                }
                OpKind::LmHead => tokens * (c.vocab_size * c.n_embd) as u64,
                OpKind::AttnScores | OpKind::AttnValues => per_phase * attention,
                _ => 0,
            })
            .sum()
    }

    /// FMACs `op` executes beyond the FLOP convention's: the scores `Q K^T` the blocked
    /// attention backward recomputes (`B S^2 d`) where the plan keeps no probabilities. They are
    /// checked with the rest but recorded apart (`StepCost`'s matmul FLOPs follow the
    /// convention; the reports add the recompute's FLOPs separately).
    fn recomputed_fmacs(&self, op: &Op) -> u64 {
        let recomputes = self.inputs.plan.recompute_attention()
            && op.phase != Phase::Forward
            && op.matmuls.contains(&OpKind::AttnScores);
        if recomputes {
            let (c, batch, seq) = (self.inputs.config, self.inputs.batch, self.inputs.seq());
            (batch.batch * seq * seq * c.n_embd) as u64
        } else {
            0
        }
    }

    fn layer_norm(&mut self, ln: Ln, x: &E::Act) -> Result<E::Normed, RuntimeError> {
        let op = Op::plain(ln.layer(), ln.name(), Phase::Forward);
        self.launch(op, |e| e.layer_norm(ln, x))
    }

    fn linear(&mut self, l: usize, kind: SparseKind, x: &E::Act) -> Result<E::Act, RuntimeError> {
        let weight = Weight::Linear { layer: l, kind };
        self.launch(Op::linear(l, kind, Phase::Forward), |e| {
            e.matmul(weight, Phase::Forward, x)
        })
    }

    fn add(
        &mut self,
        layer: Option<usize>,
        name: &'static str,
        phase: Phase,
        a: &E::Act,
        b: &E::Act,
    ) -> Result<E::Act, RuntimeError> {
        self.launch(Op::plain(layer, name, phase), |e| e.add(a, b))
    }

    fn forward(&mut self) -> Result<(Vec<Saved<E>>, Head<E>), RuntimeError> {
        let op = Op::plain(None, "embedding", Phase::Forward);
        let mut x = self.launch(op, |e| e.embedding())?;
        let mut layers = Vec::with_capacity(self.inputs.config.n_layer);
        for l in 0..self.inputs.config.n_layer {
            let (saved, m) = self.block_forward(l, x)?;
            x = self.add(Some(l), "residual_ffn", Phase::Forward, &saved.h, &m)?;
            layers.push(saved);
        }
        let ln_f = self.layer_norm(Ln::Final, &x)?;
        let head = Op::lm_head(Phase::Forward);
        let logits = self.launch(head, |e| {
            e.matmul(Weight::Head, Phase::Forward, E::output(&ln_f))
        })?;
        let op = Op::plain(None, "cross_entropy", Phase::Forward);
        let dlogits = self.launch(op, |e| e.cross_entropy(&logits))?;
        let head = Head {
            x_final: x,
            ln_f,
            dlogits,
        };
        Ok((layers, head))
    }

    /// One block up to its FFN output (the caller adds the residual).
    fn block_forward(
        &mut self,
        l: usize,
        x_in: E::Act,
    ) -> Result<(Saved<E>, E::Act), RuntimeError> {
        let ln1 = self.layer_norm(Ln::First(l), &x_in)?;
        let q = self.linear(l, SparseKind::Q, E::output(&ln1))?;
        let k = self.linear(l, SparseKind::K, E::output(&ln1))?;
        let v = self.linear(l, SparseKind::V, E::output(&ln1))?;
        let (ctx, probs) = self.launch(Op::attention(l, Phase::Forward), |e| {
            e.attention(l, &q, &k, &v)
        })?;
        let a = self.linear(l, SparseKind::AttnProj, &ctx)?;
        let h = self.add(Some(l), "residual_attn", Phase::Forward, &x_in, &a)?;
        let ln2 = self.layer_norm(Ln::Second(l), &h)?;
        let f = self.linear(l, SparseKind::Fc, E::output(&ln2))?;
        let g = self.launch(Op::plain(Some(l), "gelu", Phase::Forward), |e| e.gelu(&f))?;
        let m = self.linear(l, SparseKind::FcProj, &g)?;
        let saved = Saved {
            x_in,
            ln1,
            q,
            k,
            v,
            probs,
            ctx,
            h,
            ln2,
            f,
            g,
        };
        Ok((saved, m))
    }

    fn backward(&mut self, layers: &[Saved<E>], head: &Head<E>) -> Result<(), RuntimeError> {
        let op = Op::lm_head(Phase::InputGrad);
        let d_lnf = self.launch(op, |e| {
            e.matmul(Weight::Head, Phase::InputGrad, &head.dlogits)
        })?;
        if self.parameters_trained() {
            let op = Op::lm_head(Phase::WeightGrad);
            self.launch(op, |e| {
                e.weight_grad(Weight::Head, E::output(&head.ln_f), &head.dlogits)
            })?;
        }
        let mut dx = self.layer_norm_backward(Ln::Final, &d_lnf, &head.x_final, &head.ln_f)?;
        for l in (0..self.inputs.config.n_layer).rev() {
            dx = self.block_backward(l, &layers[l], &dx)?;
        }
        let op = Op::plain(None, "embedding", Phase::WeightGrad);
        let trained = self.parameters_trained();
        self.launch(op, |e| e.embedding_backward(&dx, trained))
    }

    fn layer_norm_backward(
        &mut self,
        ln: Ln,
        dy: &E::Act,
        x: &E::Act,
        normed: &E::Normed,
    ) -> Result<E::Act, RuntimeError> {
        let op = Op::plain(ln.layer(), ln.name(), Phase::InputGrad);
        let trained = self.parameters_trained();
        self.launch(op, |e| e.layer_norm_backward(ln, dy, x, normed, trained))
    }

    fn block_backward(
        &mut self,
        l: usize,
        a: &Saved<E>,
        dx: &E::Act,
    ) -> Result<E::Act, RuntimeError> {
        // x_out = h + fc_proj(gelu(fc(ln_2(h)))).
        let dg = self.linear_backward(l, SparseKind::FcProj, dx, &a.g)?;
        let op = Op::plain(Some(l), "gelu", Phase::InputGrad);
        let df = self.launch(op, |e| e.gelu_backward(&a.f, &dg))?;
        let dln2 = self.linear_backward(l, SparseKind::Fc, &df, E::output(&a.ln2))?;
        let dh_norm = self.layer_norm_backward(Ln::Second(l), &dln2, &a.h, &a.ln2)?;
        let dh = self.add(Some(l), "residual_ffn", Phase::InputGrad, dx, &dh_norm)?;
        // h = x_in + attn_proj(attention(q, k, v)), q, k, v = ln_1(x_in) W.
        let dctx = self.linear_backward(l, SparseKind::AttnProj, &dh, &a.ctx)?;
        let op = Op::attention(l, Phase::InputGrad);
        let [dq, dk, dv] = self.launch(op, |e| {
            e.attention_backward(l, [&a.q, &a.k, &a.v], &a.probs, &a.ctx, &dctx)
        })?;
        let ln1 = E::output(&a.ln1);
        let dln1_q = self.linear_backward(l, SparseKind::Q, &dq, ln1)?;
        let dln1_k = self.linear_backward(l, SparseKind::K, &dk, ln1)?;
        let dln1_v = self.linear_backward(l, SparseKind::V, &dv, ln1)?;
        let sum = "sum_qkv_grads";
        let dln1_qk = self.add(Some(l), sum, Phase::InputGrad, &dln1_q, &dln1_k)?;
        let dln1 = self.add(Some(l), sum, Phase::InputGrad, &dln1_qk, &dln1_v)?;
        let dx_norm = self.layer_norm_backward(Ln::First(l), &dln1, &a.x_in, &a.ln1)?;
        self.add(Some(l), "residual_attn", Phase::InputGrad, &dh, &dx_norm)
    }

    /// Input and weight gradients of sparse matrix `kind` of layer `l` given `dy` and its input
    /// `x`: returns `dx`.
    fn linear_backward(
        &mut self,
        l: usize,
        kind: SparseKind,
        dy: &E::Act,
        x: &E::Act,
    ) -> Result<E::Act, RuntimeError> {
        let weight = Weight::Linear { layer: l, kind };
        let dx = self.launch(Op::linear(l, kind, Phase::InputGrad), |e| {
            e.matmul(weight, Phase::InputGrad, dy)
        })?;
        if self.parameters_trained() {
            self.launch(Op::linear(l, kind, Phase::WeightGrad), |e| {
                e.weight_grad(weight, x, dy)
            })?;
        }
        Ok(dx)
    }

    /// Whether the model's parameters get gradients: the weight-gradient kernels run and the
    /// LayerNorms and embedding tables get theirs (not for a frozen model).
    fn parameters_trained(&self) -> bool {
        self.inputs.gradients == GradientSet::All
    }
}
