//! The exact engine: every kernel of the step runs on the simulator, on real data; the loss and
//! every gradient come out of the fabric.
//!
//! Activations never leave the wafer in the machine being modelled: each kernel leaves its output
//! where the next kernel reads its input (one region, one layout for the whole step). The
//! simulator runs one kernel at a time, so the engine carries each output to the next kernel as a
//! host-side copy ([`Act`]); that copy models data that stays in place and costs no cycles.
//! Weights, biases and LayerNorm parameters are streamed from the host inside the kernels
//! (timed), and weight gradients leave through the fabric's edges (timed).
//!
//! What it is not: the schedule. The order of the kernels is [`super::walk`]'s; this module only
//! knows how to run each one (`forward.rs`, `backward.rs`, `attention.rs` hold the kernel runs).

use std::cell::RefCell;
use std::collections::HashMap;

use wafersim_kernels::StreamedMatrix;
use wafersim_sim::{FabricConfig, RunOptions, Stats, Trace, TraceEvent, TraceWindow};

use super::attention::Kept;
use super::forward::Normed;
use super::walk::{Cost, Engine, Launched, Ln, Weight};
use super::{Sequences, StepInputs};
use crate::flops::Phase;
use crate::model::{GptParams, LayerNorm as LnParams, Matrix, SparseKind};

/// A `tokens x features` activation, row-major, as the host sees it between kernels.
#[derive(Clone, Debug, Default)]
pub(crate) struct Act {
    pub data: Vec<f32>,
    pub features: usize,
}

/// The running step: inputs, the streamed form of every sparse matrix, and what the fabric
/// computed so far.
pub(crate) struct ExactEngine<'a> {
    pub inputs: StepInputs<'a>,
    /// Per layer, the six sparse matrices `[in, out]` with their kept entries.
    pub sparse: Vec<[StreamedMatrix; 6]>,
    /// Gradient of every parameter, filled in by the backward kernels.
    pub grads: GptParams,
    /// The mean next-token cross-entropy, once the loss kernel ran.
    pub loss: f64,
    /// The token rows the fabric sees (prompt rows first).
    pub seqs: Sequences,
    /// The token table the embedding looks rows up in: `wte`, then the prompt vectors.
    pub token_table: Vec<f32>,
    /// Gradient of the prompt vectors, filled in by the embedding's backward.
    pub prompt_grad: Option<Matrix>,
    /// The fabric as the weight-streamed kernels see it: the SRAM the resident activations
    /// leave (`StepPlan::kernel_sram_bytes`).
    pub streaming: FabricConfig,
    /// The trace being recorded, if one was asked for.
    pub trace: Option<RefCell<StepTrace>>,
    /// Cycles of the dense baselines simulated so far, by phase and weight shape (rows, cols).
    /// A weight-streamed kernel's cycles depend on its shapes and the positions it streams, not
    /// on any value (no instruction's cost or branch reads one), so the baseline of a shape is
    /// simulated once per step: q, k, v and the attention projection of every layer share one.
    pub baselines: HashMap<(Phase, usize, usize), u64>,
    /// The power of two the loss kernel scales the loss and its gradient by (`LossScale`): every
    /// gradient is this many times the true one until [`ExactEngine::unscale_gradients`].
    pub loss_scale: f32,
}

/// The dense baseline of a weight-streamed kernel (see [`ExactEngine::baselines`]).
pub(crate) enum Baseline {
    /// The kernel streams every weight already (or nothing is timed): its own cycles.
    Itself,
    /// A kernel of the same phase and shape was timed before.
    Known(u64),
    /// To be timed on this pattern, keeping every entry (zeros: the cycles read no value), and
    /// remembered in [`ExactEngine::baselines`].
    Run(StreamedMatrix),
}

/// A trace of a window of the step: kernel runs are traced in their own cycles and placed at
/// the cycle of the step they started at (kernels run one after another).
pub(crate) struct StepTrace {
    /// The window, in cycles from the step's start.
    window: TraceWindow,
    /// The step's cycle at which the next kernel run starts.
    elapsed: u64,
    /// What was recorded so far, in step cycles.
    events: Vec<TraceEvent>,
}

impl StepTrace {
    pub(crate) fn new(window: TraceWindow) -> Self {
        StepTrace {
            window,
            elapsed: 0,
            events: Vec::new(),
        }
    }

    /// The window in the next kernel run's own cycles (`None` once the run starts after it).
    fn next_run_window(&self) -> Option<TraceWindow> {
        (self.window.end > self.elapsed).then(|| TraceWindow {
            start: self.window.start.saturating_sub(self.elapsed),
            end: self.window.end - self.elapsed,
            ..self.window
        })
    }

    /// Adds a finished run's events and moves past its cycles.
    fn record(&mut self, stats: &Stats) {
        if let Some(trace) = &stats.trace {
            let at = self.elapsed;
            self.events
                .extend(trace.events.iter().map(|e| e.shifted(at)));
        }
        self.elapsed += stats.cycles;
    }

    pub(crate) fn finish(self) -> Trace {
        Trace {
            window: self.window,
            events: self.events,
        }
    }
}

impl<'a> ExactEngine<'a> {
    /// The engine of one pass, its loss scaled by `loss_scale` (a power of two).
    pub(crate) fn new(inputs: StepInputs<'a>, loss_scale: f32) -> Self {
        let sparse = inputs
            .params
            .blocks
            .iter()
            .enumerate()
            .map(|(l, block)| {
                SparseKind::ALL.map(|kind| {
                    let w = &block.linear(kind).weight;
                    let mask = inputs.masks.get(l, kind).expect("masks match the model");
                    StreamedMatrix::from_dense(w.rows, w.cols, &w.data, Some(&mask.keep()))
                })
            })
            .collect();
        let mut token_table = inputs.params.wte.data.clone();
        if let Some(prompt) = inputs.prompt {
            token_table.extend_from_slice(&prompt.data);
        }
        ExactEngine {
            inputs,
            sparse,
            grads: GptParams::zeros(inputs.config),
            loss: 0.0,
            seqs: inputs.sequences(),
            token_table,
            prompt_grad: None,
            trace: None,
            streaming: inputs.plan.streaming_fabric(inputs.fabric),
            baselines: HashMap::new(),
            loss_scale,
        }
    }

    /// How the dense baseline of a weight-streamed kernel of `weight` streaming `streamed` is
    /// timed (`key`: its phase and shape).
    pub(crate) fn baseline(
        &self,
        weight: Weight,
        streamed: &StreamedMatrix,
        key: (Phase, usize, usize),
    ) -> Baseline {
        let sparse = matches!(weight, Weight::Linear { .. }) && !streamed.keeps_every_entry();
        if !(sparse && self.inputs.dense_baseline) {
            return Baseline::Itself;
        }
        match self.baselines.get(&key) {
            Some(&cycles) => Baseline::Known(cycles),
            None => {
                let (rows, cols) = (streamed.rows(), streamed.cols());
                let every = StreamedMatrix::from_dense(rows, cols, &vec![0.0; rows * cols], None);
                Baseline::Run(every)
            }
        }
    }

    /// Divides the gradients read back by the loss scale (exact: a power of two).
    pub(crate) fn unscale_gradients(&mut self) {
        let inverse = 1.0 / self.loss_scale;
        let prompt = self.prompt_grad.as_mut().map(|g| &mut g.data[..]);
        for values in self
            .grads
            .tensors_mut()
            .into_iter()
            .map(|(_, g)| g)
            .chain(prompt)
        {
            values.iter_mut().for_each(|v| *v *= inverse);
        }
    }

    pub fn region(&self) -> wafersim_kernels::Region {
        self.inputs.plan.region
    }

    pub fn tokens(&self) -> usize {
        self.inputs.plan.tokens()
    }

    pub fn precision(&self) -> wafersim_kernels::Precision {
        self.inputs.plan.precision
    }

    pub fn fabric(&self) -> &FabricConfig {
        self.inputs.fabric
    }

    /// Run options of the next kernel run: its part of the trace window, if any.
    pub fn options(&self) -> RunOptions {
        let trace = self
            .trace
            .as_ref()
            .and_then(|t| t.borrow().next_run_window());
        RunOptions {
            trace,
            ..RunOptions::default()
        }
    }

    /// A kernel run's measured cost ([`measured`]), its trace events kept if a trace is being
    /// recorded. Every kernel run of the step passes here once, in order.
    pub fn measured(&self, stats: &Stats, dense_cycles: u64) -> Cost {
        if let Some(trace) = &self.trace {
            trace.borrow_mut().record(stats);
        }
        measured(stats, dense_cycles)
    }

    /// The parameters of LayerNorm `ln`.
    pub fn ln_params(&self, ln: Ln) -> &'a LnParams {
        let p = self.inputs.params;
        match ln {
            Ln::First(l) => &p.blocks[l].ln_1,
            Ln::Second(l) => &p.blocks[l].ln_2,
            Ln::Final => &p.ln_f,
        }
    }

    /// Where the gradients of LayerNorm `ln` go.
    pub fn ln_grads(&mut self, ln: Ln) -> &mut LnParams {
        match ln {
            Ln::First(l) => &mut self.grads.blocks[l].ln_1,
            Ln::Second(l) => &mut self.grads.blocks[l].ln_2,
            Ln::Final => &mut self.grads.ln_f,
        }
    }
}

/// A kernel's measured cost; `dense_cycles` is the same kernel streaming every weight.
pub(crate) fn measured(stats: &Stats, dense_cycles: u64) -> Cost {
    Cost {
        cycles: stats.cycles,
        dense_cycles,
        fmacs: Some(stats.total.fmacs),
        busy_cycles: Some(stats.total.busy_cycles),
        router_forwards: Some(stats.total.router_forwards),
    }
}

impl Engine for ExactEngine<'_> {
    type Act = Act;
    type Normed = Normed;
    type Probs = Kept;

    fn output(normed: &Normed) -> &Act {
        &normed.y
    }

    fn embedding(&mut self) -> Launched<Act> {
        self.embed()
    }

    fn layer_norm(&mut self, ln: Ln, x: &Act) -> Launched<Normed> {
        self.layer_norm_forward(ln, x)
    }

    fn matmul(&mut self, weight: Weight, phase: Phase, x: &Act) -> Launched<Act> {
        self.streamed_product(weight, phase, x)
    }

    fn weight_grad(&mut self, weight: Weight, x: &Act, dy: &Act) -> Launched<()> {
        Ok(((), self.masked_weight_grad(weight, x, dy)?))
    }

    fn attention(&mut self, _layer: usize, q: &Act, k: &Act, v: &Act) -> Launched<(Act, Kept)> {
        self.attention_forward(q, k, v)
    }

    fn attention_backward(
        &mut self,
        _layer: usize,
        qkv: [&Act; 3],
        kept: &Kept,
        ctx: &Act,
        d_ctx: &Act,
    ) -> Launched<[Act; 3]> {
        self.attention_grads(qkv, kept, ctx, d_ctx)
    }

    fn add(&mut self, a: &Act, b: &Act) -> Launched<Act> {
        self.residual(a, b)
    }

    fn gelu(&mut self, f: &Act) -> Launched<Act> {
        self.gelu_forward(f)
    }

    fn gelu_backward(&mut self, f: &Act, dg: &Act) -> Launched<Act> {
        self.gelu_grad(f, dg)
    }

    fn cross_entropy(&mut self, logits: &Act) -> Launched<Act> {
        self.loss_and_dlogits(logits)
    }

    fn layer_norm_backward(
        &mut self,
        ln: Ln,
        dy: &Act,
        x: &Act,
        normed: &Normed,
        parameters_trained: bool,
    ) -> Launched<Act> {
        self.layer_norm_grad(ln, dy, x, normed, parameters_trained)
    }

    fn embedding_backward(&mut self, dx: &Act, parameters_trained: bool) -> Launched<()> {
        Ok(((), self.embedding_grad(dx, parameters_trained)?))
    }
}
