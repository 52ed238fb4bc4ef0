//! Softmax cross-entropy over a vocabulary-sized feature axis, forward and backward in one
//! kernel: the mean loss of next-token prediction and its gradient with respect to the logits.
//!
//! Inputs: logits `Z [T x V]` on the wafer in the shared layout (tokens over region rows, the
//! `V` features over region columns, feature-major tiles), and token ids `[T]`, sequence-major in
//! sequences of `S`. Token `t` predicts `ids[t + 1]` unless it is the last of its sequence; the
//! `N = B (S - 1)` predicted positions give
//!
//! ```text
//! loss  = (1 / N) sum over predicted t of (logsumexp(z_t) - z_t[target_t])
//! dZ[t] = (softmax(z_t) - onehot(target_t)) / N   for predicted t,   0 for the last positions.
//! ```
//!
//! # Placement and steps (PE (c, r) holds `Z[T_r, V_c]`, `T_r` tokens by `V_c` features)
//!
//! 1. Local row max `m[T_r]` (one `max` per owned feature) and the target logit `g[t] =
//!    z[t, target_t]` where column c owns `target_t` (0 elsewhere). The targets are placed in SRAM
//!    before cycle 0 as a vector of local feature indices (-1 where not owned or not predicted),
//!    with a vector of weights `1/N` (predicted) or `0` (last position).
//! 2. Row max all-reduce of `m` ([`crate::rowmax::RowMaxAllReduce`]: `RowAllReduce` only adds,
//!    so the max is a store-and-forward east chain with a `max` per hop, then the same west
//!    multicast).
//! 3. `z <- exp(z - m)` in place, local sums `s[T_r]`.
//! 4. Row sum all-reduce ([`crate::chain::RowAllReduce`], on the same colors) of `[s | g]` in one
//!    vector: every PE gets the sum of exponentials and the target logit of each of its tokens
//!    (exactly one column contributes a non-zero `g`, so that sum is exact).
//! 5. `dZ = exp(z - m) * (weight / s)` in place, then `-1/N` at the owned targets.
//! 6. The last PE column computes each token's `weight (ln s + (m - g))` (the difference of two
//!    logits first, so that `ln s` is not added to a large number), sums them in token order
//!    (`f32`) and the per-row sums are added down that column in row order by a
//!    [`crate::chain::ColumnChain`] that leaves the fabric's south edge: the host receives the mean
//!    loss as one `f32`, computed entirely on the fabric, and widens it to `f64`.
//!
//! `dZ` overwrites `Z` in place and stays on the wafer for the backward of the product that made
//! `Z`; `run` reads it.
//!
//! # Loss scaling
//!
//! With a `loss_scale` `L` the weights are `L / N` instead of `1 / N`: the fabric computes `L`
//! times the loss and its gradient, at the same cost. A backward pass that stores its gradients
//! in fp16 then keeps them out of fp16's subnormals (the mean over `N` tokens shrinks every
//! gradient by `N`); the host divides the gradients it reads back by `L`. `L` is a power of two,
//! so every `f32` value is exactly `L` times the unscaled one: `run` divides the loss back and
//! returns it unscaled, and `dZ` is exactly `L` times the unscaled `dZ`.
//!
//! # Color plan
//!
//! | color | use |
//! |---|---|
//! | 0, 1 | east-bound row chain: max all-reduce, then sum all-reduce |
//! | 2 | west-bound row multicast: the row max, then the sums |
//! | 3, 4 | south-bound chain of the last PE column carrying the loss to the south edge |
//!
//! # Cost
//!
//! Non-matmul only: `max`, `sub`, `exp`, `add`, `mul`, `sum`, scalar loads and stores, no
//! `fmac`/`dot` (the FMAC count is 0). The PE has no logarithm or reciprocal instruction,
//! so `ln s` and `1/s` (one per token) are software routines ([`TaskCtx::ln`],
//! [`TaskCtx::recip`]), charged `exp_cycles_per_element` cycles each, like one element of exp.
//! [`SoftmaxCrossEntropy::estimate_cycles`] adds up the steps on the critical path for the
//! largest tile `T x V` (`T`, `V` the largest blocks): the exponentials (`exp_cycles * T V`)
//! dominate, then the `4 V` vector instructions over `T` elements, the two all-reduces (about
//! `2 T + 11` cycles per column for the max, `4 T + 5 C` in all for the sum) and the column chain
//! (about `5 R`). At the wafer's full width the max all-reduce is the one to watch: its hops are
//! store-and-forward, so `C` columns cost about `C (2 T + 11)` cycles against `5 C` for the
//! pipelined sum; pipelining it needs a receive-max-send microthread operation (the max analogue
//! of `recv_add_send`), which the simulator does not have.
//!
//! Positions below `unscored_prefix` in each sequence are not scored either (weight 0, no
//! target): `N = B (S - 1 - prefix)`. What it is not: no label smoothing, no other ignore index,
//! no partial vocabulary; it knows token ids only as indices of the feature axis.

use wafersim_sim::{
    Buf, Color, Coord, DType, FabricConfig, Program, RunOptions, Simulator, Stats, TaskCtx, Then,
    VecRef,
};

use crate::chain::{ChainColors, ColumnChain, RowAllReduce};
use crate::check_region;
use crate::error::KernelError;
use crate::join::{self, Join};
use crate::layout::{Region, Tiling};
use crate::rowmax::{RowMax, RowMaxAllReduce};

/// Name used in errors and reports.
pub const KERNEL: &str = "softmax_cross_entropy";

const ROW: RowMaxAllReduce = RowMaxAllReduce {
    east: ChainColors([Color(0), Color(1)]),
    broadcast: Color(2),
};
const LOSS: ColumnChain = ColumnChain {
    south: ChainColors([Color(3), Color(4)]),
};
/// Colors the kernel routes on: `0..COLORS`.
pub const COLORS: u8 = crate::colors_used(&[ROW.east, LOSS.south], &[ROW.broadcast]);

/// One loss and gradient to compute.
#[derive(Clone, Copy, Debug)]
pub struct SoftmaxCrossEntropy<'a> {
    pub region: Region,
    /// Token ids, `T = B S` of them, sequence-major; they give the targets.
    pub ids: &'a [u32],
    /// Tokens per sequence `S` (at least 2, so that something is predicted).
    pub seq_len: usize,
    /// The first positions of each sequence whose predictions are not scored (weight 0, like
    /// the last position): rows placed in front of the tokens that are not tokens themselves
    /// (inputs given as vectors), whose next "token" is not a target. 0 for plain next-token
    /// prediction; below `S - 1`.
    pub unscored_prefix: usize,
    /// Size `V` of the feature axis the softmax runs over.
    pub vocab: usize,
    /// `Z`, `T x V` row-major (on the wafer in the region layout before cycle 0).
    pub logits: &'a [f32],
    /// A power of two `L`: the fabric computes `L` times the loss and its gradient (loss
    /// scaling, module doc); 1 for the plain loss. The returned loss is unscaled, `dZ` is not.
    pub loss_scale: f32,
}

/// How the logits are cut.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrossEntropyPlan {
    /// `Z` and `dZ` over the region.
    pub tiling: Tiling,
    /// Predicted positions `N = B (S - 1)`.
    pub predicted: usize,
    /// SRAM of the fullest PE, in bytes (an upper bound: the largest blocks on one PE).
    pub sram_bytes: u64,
}

/// The loss, the gradient and what they cost.
#[derive(Clone, Debug)]
pub struct CrossEntropyRun {
    /// The mean loss, as the fabric computed it in `f32` (divided back by the loss scale).
    pub loss: f64,
    /// `dZ`, `T x V` row-major.
    pub dz: Vec<f32>,
    pub plan: CrossEntropyPlan,
    pub stats: Stats,
}

/// The buffers of one PE.
#[derive(Clone, Copy, Debug)]
struct Buffers {
    /// `Z`, then `exp(Z - m)`, then `dZ`.
    z: Buf,
    m: Buf,
    /// `[s | g]`: sums of exponentials, target logits.
    sg: Buf,
    target: Buf,
    weight: Buf,
    work: Buf,
    /// The row's loss (last column only).
    loss: Option<Buf>,
}

/// What one PE's tasks need to know.
#[derive(Clone, Copy, Debug)]
struct PeShape {
    c: usize,
    r: usize,
    cols: usize,
    /// Tokens `T_r`.
    t_len: u32,
    /// Features `V_c`.
    v_len: u32,
    /// The weight of a predicted position, `L / N`.
    inv_n: f32,
}

impl Buffers {
    fn column(&self, shape: &PeShape, v: u32) -> VecRef {
        self.z.slice(v * shape.t_len, shape.t_len)
    }

    fn s(&self, shape: &PeShape) -> VecRef {
        self.sg.slice(0, shape.t_len)
    }

    fn g(&self, shape: &PeShape) -> VecRef {
        self.sg.slice(shape.t_len, shape.t_len)
    }
}

impl SoftmaxCrossEntropy<'_> {
    /// SRAM of the fullest PE for `tokens` rows of `vocab` logits on `region` (shapes only).
    pub fn sram_bytes(region: Region, tokens: usize, vocab: usize) -> u64 {
        let tiling = Tiling::new(region, tokens, vocab);
        let (t, v) = (tiling.tokens.max_len(), tiling.features.max_len());
        // z; m, sg (2), target, weight, work; the max scratch; the loss; two join counters.
        let scratch = if region.cols > 1 { t } else { 0 };
        4 * (t * v + 6 * t + scratch + 3) as u64
    }

    fn tokens(&self) -> usize {
        self.ids.len()
    }

    fn check(&self, config: &FabricConfig) -> Result<(), KernelError> {
        let shape = |reason: String| {
            Err(KernelError::Shape {
                kernel: KERNEL,
                reason,
            })
        };
        let (t, s, v) = (self.tokens(), self.seq_len, self.vocab);
        if s < 2 || !t.is_multiple_of(s) {
            return shape(format!(
                "{t} token ids are not a whole number of sequences of {s} (at least 2 tokens each)"
            ));
        }
        if self.unscored_prefix + 1 >= s {
            return shape(format!(
                "an unscored prefix of {} leaves no scored position in sequences of {s}",
                self.unscored_prefix
            ));
        }
        if self.logits.len() != t * v {
            return shape(format!(
                "the logits have {} values, expected {t} x {v}",
                self.logits.len()
            ));
        }
        if !is_power_of_two(self.loss_scale) {
            return shape(format!(
                "a loss scale of {} is not a power of two (only those scale every value exactly)",
                self.loss_scale
            ));
        }
        if let Some((i, id)) = self
            .ids
            .iter()
            .enumerate()
            .find(|(_, id)| **id as usize >= v)
        {
            return shape(format!(
                "token {i} has id {id}, outside the feature axis of {v}"
            ));
        }
        check_region(KERNEL, config, self.region, t, v)
    }

    /// Checks shapes and ids and that every PE's buffers fit its SRAM.
    pub fn plan(&self, config: &FabricConfig) -> Result<CrossEntropyPlan, KernelError> {
        self.check(config)?;
        let tiling = Tiling::new(self.region, self.tokens(), self.vocab);
        let (t, v) = (tiling.tokens.max_len(), tiling.features.max_len());
        let sram_bytes = Self::sram_bytes(self.region, self.tokens(), self.vocab);
        let available = u64::from(config.sram_bytes);
        if sram_bytes > available {
            return Err(KernelError::DoesNotFit {
                kernel: KERNEL,
                needed: sram_bytes,
                available,
                what: format!("logit tile {t} tokens x {v} features and 7 vectors of {t}"),
                hint: "spread the feature axis over more PE columns or the tokens over more rows"
                    .into(),
            });
        }
        Ok(CrossEntropyPlan {
            tiling,
            predicted: self.tokens() / self.seq_len * (self.seq_len - 1 - self.unscored_prefix),
            sram_bytes,
        })
    }

    /// The program, the plan, the `dZ` buffers (region row-major) and the loss sink.
    pub fn build(
        &self,
        config: &FabricConfig,
    ) -> Result<(Program, CrossEntropyPlan, Vec<Buf>, wafersim_sim::SinkId), KernelError> {
        let plan = self.plan(config)?;
        let mut p = Program::new(config.clone())?;
        let mut outputs = Vec::new();
        for r in 0..self.region.rows {
            for c in 0..self.region.cols {
                outputs.push(self.place_pe(&mut p, &plan, c, r)?);
            }
        }
        let sink = LOSS.install_exit(&mut p, self.region, self.region.cols - 1)?;
        Ok((p, plan, outputs, sink))
    }

    /// Builds, runs and reads back the loss and `dZ`.
    pub fn run(
        &self,
        config: &FabricConfig,
        options: RunOptions,
    ) -> Result<CrossEntropyRun, KernelError> {
        let (program, plan, outputs, sink) = self.build(config)?;
        let executed = Simulator::new(program)?.run(options)?;
        let mut dz = vec![0.0; self.tokens() * self.vocab];
        for (i, buf) in outputs.into_iter().enumerate() {
            let cols = self.region.cols;
            let (c, r) = (i as u32 % cols, i as u32 / cols);
            let pe = self.region.pe(c, r);
            let tile = executed.read(pe, buf).ok_or_else(|| KernelError::Shape {
                kernel: KERNEL,
                reason: format!("no dZ tile to read back on PE {pe}"),
            })?;
            plan.tiling.untile(&tile, &mut dz, c as usize, r as usize);
        }
        let received = &executed.sink(sink).received;
        let [(_, _, loss)] = received[..] else {
            return Err(KernelError::Shape {
                kernel: KERNEL,
                reason: format!("{} loss values left the fabric, expected 1", received.len()),
            });
        };
        Ok(CrossEntropyRun {
            loss: f64::from(loss.f32()) / f64::from(self.loss_scale),
            dz,
            plan,
            stats: executed.stats,
        })
    }

    /// The target of token `t`, if it predicts one.
    fn target(&self, t: usize) -> Option<usize> {
        let position = t % self.seq_len;
        (position >= self.unscored_prefix && position + 1 < self.seq_len)
            .then(|| self.ids[t + 1] as usize)
    }

    /// Buffers, routes and tasks of one PE; returns its `Z`/`dZ` tile.
    fn place_pe(
        &self,
        p: &mut Program,
        plan: &CrossEntropyPlan,
        c: u32,
        r: u32,
    ) -> Result<Buf, KernelError> {
        let (pe, (cu, ru)) = (self.region.pe(c, r), (c as usize, r as usize));
        let tokens = plan.tiling.tokens.block(ru);
        let features = plan.tiling.features.block(cu);
        let shape = PeShape {
            c: cu,
            r: ru,
            cols: self.region.cols as usize,
            t_len: tokens.len() as u32,
            v_len: features.len() as u32,
            inv_n: (1.0 / plan.predicted as f32) * self.loss_scale,
        };
        let targets: Vec<f32> = tokens
            .clone()
            .map(|t| match self.target(t) {
                Some(v) if features.contains(&v) => (v - features.start) as f32,
                _ => -1.0,
            })
            .collect();
        let weights: Vec<f32> = tokens
            .clone()
            .map(|t| self.target(t).map_or(0.0, |_| shape.inv_n))
            .collect();
        let last = cu + 1 == shape.cols;
        let bufs = Buffers {
            z: p.alloc_f32(pe, "z", &plan.tiling.tile(self.logits, cu, ru))?,
            m: p.alloc_zeros(pe, "row_max", DType::F32, tokens.len())?,
            sg: p.alloc_zeros(pe, "sum_and_target", DType::F32, 2 * tokens.len())?,
            target: p.alloc_f32(pe, "target", &targets)?,
            weight: p.alloc_f32(pe, "weight", &weights)?,
            work: p.alloc_zeros(pe, "work", DType::F32, tokens.len())?,
            loss: if last {
                Some(p.alloc_zeros(pe, "loss", DType::F32, 1)?)
            } else {
                None
            },
        };
        ROW.install(p, self.region, c, r)?;
        if last {
            LOSS.install(p, self.region, c, r)?;
        }
        place_tasks(p, self.region, pe, shape, bufs)?;
        Ok(bufs.z)
    }

    /// Cycles predicted by the formula in the module doc, for the largest tile (shapes are not
    /// checked here: call [`Self::plan`] for that).
    pub fn estimate_cycles(&self, config: &FabricConfig) -> u64 {
        let (cols, rows) = (self.region.cols.max(1), self.region.rows.max(1));
        let est = Estimate {
            config,
            t: self.tokens().div_ceil(rows as usize) as u64,
            v: self.vocab.div_ceil(cols as usize) as u64,
            cols: u64::from(cols),
            rows: u64::from(rows),
            below: u64::from(
                config
                    .height
                    .saturating_sub(self.region.origin.y + self.region.rows),
            ),
        };
        est.total()
    }
}

/// The tasks of one PE, created so that each refers only to ids that already exist.
fn place_tasks(
    p: &mut Program,
    region: Region,
    pe: Coord,
    shape: PeShape,
    bufs: Buffers,
) -> Result<(), KernelError> {
    let after_sum = p.local_task(pe, "gradient_and_loss", move |ctx| {
        if bufs.loss.is_some() {
            row_loss(ctx, &shape, &bufs);
        }
        gradient(ctx, &shape, &bufs);
    })?;
    let sum_done = Join::place(p, pe, after_sum)?;
    let sum = ROW.as_sum();
    let broadcast = p.local_task(pe, "sum_broadcast", move |ctx| {
        let ops = sum.broadcast_ops(shape.c, shape.cols, bufs.sg.all());
        join::issue(ctx, &ops, &sum_done);
    })?;
    let reduced = Join::place(p, pe, broadcast)?;
    let after_max = p.local_task(pe, "exp_and_sum", move |ctx| {
        exp_and_sum(ctx, &shape, &bufs, sum, &reduced)
    })?;
    let part = ROW.place(
        p,
        region,
        (shape.c as u32, shape.r as u32),
        bufs.m.all(),
        after_max,
    )?;
    let start = p.local_task(pe, "max_and_target", move |ctx| {
        max_and_target(ctx, &shape, &bufs, &part)
    })?;
    p.activate(pe, start)?;
    Ok(())
}

/// Step 1: the local row max and the owned target logits; then starts the max all-reduce.
fn max_and_target(ctx: &mut TaskCtx<'_>, shape: &PeShape, bufs: &Buffers, part: &RowMax) {
    let m = bufs.m.all();
    ctx.mov(m, bufs.column(shape, 0));
    for v in 1..shape.v_len {
        ctx.max(m, m, bufs.column(shape, v));
    }
    for t in 0..shape.t_len {
        let local = ctx.load(bufs.target.at(t));
        if local >= 0.0 {
            let z = ctx.load(bufs.z.at(local as u32 * shape.t_len + t));
            ctx.store(bufs.sg.at(shape.t_len + t), z);
        }
    }
    part.start(ctx);
}

/// Step 3: `z <- exp(z - m)` and the local sums; then starts the sum all-reduce.
fn exp_and_sum(
    ctx: &mut TaskCtx<'_>,
    shape: &PeShape,
    bufs: &Buffers,
    sum: RowAllReduce,
    reduced: &Join,
) {
    let m = bufs.m.all();
    for v in 0..shape.v_len {
        let column = bufs.column(shape, v);
        ctx.sub(column, column, m);
    }
    ctx.exp(bufs.z.all(), bufs.z.all());
    let s = bufs.s(shape);
    ctx.mov(s, bufs.column(shape, 0));
    for v in 1..shape.v_len {
        ctx.add(s, s, bufs.column(shape, v));
    }
    let ops = sum.reduce_ops(shape.c, shape.cols, bufs.sg.all());
    join::issue(ctx, &ops, reduced);
}

/// `work[t] = f(s[t])` by a scalar routine the PE has no instruction for ([`TaskCtx::ln`],
/// [`TaskCtx::recip`]: software, charged like one element of `exp`).
fn software_map(
    ctx: &mut TaskCtx<'_>,
    shape: &PeShape,
    bufs: &Buffers,
    f: fn(&mut TaskCtx<'_>, f32) -> f32,
) {
    for t in 0..shape.t_len {
        let s = ctx.load(bufs.sg.at(t));
        let y = f(ctx, s);
        ctx.store(bufs.work.at(t), y);
    }
}

/// Step 6 (last column): this row's `sum of weight (ln s + (m - g))`, sent down the loss
/// chain (`g` is overwritten by `m - g`; the gradient does not need it).
fn row_loss(ctx: &mut TaskCtx<'_>, shape: &PeShape, bufs: &Buffers) {
    let Some(loss) = bufs.loss else {
        return;
    };
    software_map(ctx, shape, bufs, |ctx, s| ctx.ln(s));
    let (work, g) = (bufs.work.all(), bufs.g(shape));
    // m - g first: both are logits of similar size, so this difference is exact or nearly, and
    // ln s is added to a small number (lse - g in one go would lose the digits of ln s).
    ctx.sub(g, bufs.m.all(), g);
    ctx.add(work, work, g);
    ctx.mul(work, work, bufs.weight.all());
    let total = ctx.sum(work);
    ctx.store(loss.at(0), total);
    ctx.issue(LOSS.reduce_south(shape.r, loss.all()), Then::Nothing);
}

/// Step 5: `dZ = exp(z - m) weight / s`, then `-1/N` at the owned targets.
fn gradient(ctx: &mut TaskCtx<'_>, shape: &PeShape, bufs: &Buffers) {
    software_map(ctx, shape, bufs, |ctx, s| ctx.recip(s));
    let work = bufs.work.all();
    ctx.mul(work, work, bufs.weight.all());
    for v in 0..shape.v_len {
        let column = bufs.column(shape, v);
        ctx.mul(column, column, work);
    }
    for t in 0..shape.t_len {
        let local = ctx.load(bufs.target.at(t));
        if local >= 0.0 {
            let at = bufs.z.at(local as u32 * shape.t_len + t);
            let d = ctx.load(at);
            ctx.scalar_cycles(1);
            ctx.store(at, d - shape.inv_n);
        }
    }
}

/// Whether `x` is `2^k` for an integer `k` (positive, finite, no mantissa bits).
fn is_power_of_two(x: f32) -> bool {
    x.is_normal() && x > 0.0 && x.to_bits() & 0x007f_ffff == 0
}

/// The analytic cycle count of [`SoftmaxCrossEntropy::estimate_cycles`]: the steps of the
/// critical path for a `t x v` tile on a `cols x rows` region with `below` fabric rows under it.
struct Estimate<'a> {
    config: &'a FabricConfig,
    t: u64,
    v: u64,
    cols: u64,
    rows: u64,
    below: u64,
}

impl Estimate<'_> {
    /// One vector instruction over `n` elements at `width` per cycle.
    fn vector(&self, n: u64, width: u32) -> u64 {
        self.config.vector_cycles(n, width)
    }

    fn issue(&self) -> u64 {
        u64::from(self.config.issue_cycles)
    }

    fn switch(&self) -> u64 {
        u64::from(self.config.task_switch_cycles)
    }

    /// Cycles for a wavelet to go from one core to its neighbour's core.
    fn core_to_core(&self) -> u64 {
        u64::from(2 * self.config.ramp_latency + self.config.hop_latency)
    }

    /// Steps 1 and 2: local max, target loads (a `1/cols` share of them owned), max all-reduce.
    fn max_phase(&self) -> u64 {
        let simd = &self.config.simd;
        let (t, v) = (self.t, self.v);
        let local = self.switch()
            + self.vector(t, simd.mov_f32)
            + v.saturating_sub(1) * self.vector(t, simd.max)
            + t * self.issue()
            + t.div_ceil(self.cols) * 2 * self.issue()
            + 2 * self.issue();
        if self.cols == 1 {
            return local + self.switch();
        }
        let hop =
            t + self.core_to_core() + self.switch() + self.vector(t, simd.max) + 2 * self.issue();
        let broadcast = t
            + 2 * u64::from(self.config.ramp_latency)
            + (self.cols - 1) * u64::from(self.config.hop_latency);
        local + (self.cols - 1) * hop + broadcast + self.switch()
    }

    /// Steps 3 and 4: exponentials, local sums, the pipelined sum all-reduce of `2 t` values.
    fn sum_phase(&self) -> u64 {
        let simd = &self.config.simd;
        let (t, v) = (self.t, self.v);
        let exp = self.config.transcendental_cycles(t * v);
        let local = v * self.vector(t, simd.arith_f32)
            + exp
            + self.vector(t, simd.mov_f32)
            + v.saturating_sub(1) * self.vector(t, simd.arith_f32)
            + 3 * self.issue();
        if self.cols == 1 {
            return local + 2 * self.switch();
        }
        // Join arms and the broadcast task at the last column, the arm at the receiver.
        let joins = 3 * (self.switch() + 2 * self.issue());
        let reduce = 2 * t + (self.cols - 1) * self.core_to_core();
        let broadcast = 2 * t
            + 2 * u64::from(self.config.ramp_latency)
            + (self.cols - 1) * u64::from(self.config.hop_latency);
        local + joins + reduce + broadcast + self.switch()
    }

    /// Steps 5 and 6: the gradient everywhere, and the loss of the last column down its chain.
    fn tail(&self) -> u64 {
        let simd = &self.config.simd;
        let (t, v) = (self.t, self.v);
        let software = t * (2 * self.issue() + self.config.software_routine_cycles());
        let gradient = software
            + self.vector(t, simd.arith_f32)
            + v * self.vector(t, simd.arith_f32)
            + t * self.issue()
            + t.div_ceil(self.cols) * (2 * self.issue() + 1);
        let loss = software + 4 * self.vector(t, simd.arith_f32) + 2 * self.issue();
        let chain = (self.rows - 1) * self.core_to_core()
            + u64::from(self.config.ramp_latency)
            + (self.below + 1) * u64::from(self.config.hop_latency);
        (loss + chain).max(loss + gradient)
    }

    fn total(&self) -> u64 {
        self.max_phase() + self.sum_phase() + self.tail()
    }
}
