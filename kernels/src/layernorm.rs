//! LayerNorm over the features of each token, forward ([`LayerNorm`]) and backward
//! ([`LayerNormBackward`]).
//!
//! # What it computes
//!
//! Forward, per token (a row of `X [T x F]`): `mean = sum(x) / F`, the biased variance of the
//! centered values `var = sum((x - mean)^2) / F`, `rstd = 1 / sqrt(var + eps)`, `xhat = (x -
//! mean) rstd`, `y = xhat gamma + beta`. It returns `y`, and `mean` and `rstd` per token (they
//! stay on the wafer for the backward; the host reads them back too).
//!
//! Backward, with `g = dy gamma` and means over the token's `F` features:
//! `dx = rstd (g - mean(g) - xhat mean(g xhat))`, `dgamma = sum over tokens of dy xhat`,
//! `dbeta = sum over tokens of dy`. `xhat` is recomputed from `X`, `mean` and `rstd` (the
//! forward leaves its input on the wafer, where a skip connection past the normalisation
//! keeps it anyway, so saving `xhat` would cost a second tile for nothing).
//!
//! What it is not: an RMSNorm, a fused residual add, or a kernel for anything but f32.
//!
//! # Placement
//!
//! The shared layout: PE (c, r) holds `X[T_r, F_c]` feature-major (and `dY` too, backward), so a
//! token's features are spread over the PEs of one region row and every per-token sum is a
//! partial sum per PE completed by a row all-reduce ([`RowAllReduce`]: an east-bound summing
//! chain into the last column, then a west-bound multicast of the totals). After the forward,
//! every PE of a row holds the `mean` and `rstd` of the row's tokens; the backward expects them
//! there (placed before cycle 0, as `X` and `dY` are).
//!
//! `gamma` and `beta` belong to the host and are streamed in, timed: PE column c receives
//! `gamma[F_c]` then `beta[F_c]` from the fabric's north edge down the column
//! ([`feed_column_from_north`], multicast to every row), from cycle 0. The receive is issued at
//! the very start of the first task, so the stream lands while the PE computes its partial sums,
//! and the last task (the only one using them) is blocked until it has. The backward streams
//! `gamma` the same way. Parameter gradients, when asked for, leave the wafer: each PE sums
//! `dy xhat` and `dy` over its tokens, and the `[dgamma[F_c], dbeta[F_c]]` partials are summed
//! down each column ([`ColumnChain`]) and out of the south edge to a host sink, overlapping the
//! row all-reduce.
//!
//! # Variance: two all-reduces, mean first, then centered squares
//!
//! The alternative, sum and sum of squares in one all-reduce (`var = E[x^2] - mean^2`), would
//! save one all-reduce's latency (`A(n)` below less its `2 (n - 1)`, and a task switch), but in
//! f32 it loses about `(mean / std)^2` ulps of the variance to cancellation, where the two-pass
//! form loses about `|mean| / std` ulps of `xhat` (through the rounding of the mean). Measured
//! with numpy in f32 (14 features, 2000 random tokens per case, worst `xhat` error relative to
//! the largest `|xhat|`): mean 0, std 1: two-pass 2e-7, one-pass 3e-7; mean 20, std 0.5: 9e-6
//! against 9e-4; mean 100, std 0.5: 4e-5 against 2e-2. So the two-pass form keeps 1e-5 up to
//! `|mean| / std` of about 40, which typical activations stay far below (the test
//! `large_means_stay_accurate` runs tokens of mean ~20 and std 0.3 to 1.4 through the kernel:
//! 2e-6). Beyond that, a corrected two-pass (also all-reduce `sum (x - mean)` beside the squares
//! and subtract its mean: `t` more values on the second all-reduce and two more vector
//! instructions per feature) measured 2e-7 at any offset; it is not done here.
//!
//! # Color plan
//!
//! | color | use |
//! |---|---|
//! | 0 | host stream of `gamma` (and `beta`) down each column from the north edge |
//! | 1, 2 | row all-reduce: east-bound summing chain (alternating per column) |
//! | 3 | row all-reduce: west-bound multicast of the totals |
//! | 4, 5 | backward, if asked for: `dgamma`/`dbeta` summed down each column, out of the south edge |
//!
//! The forward's two all-reduces share colors 1-3: operations on one color run in issue order
//! and the second is issued on a PE only after the first has finished there, with the same
//! length on every PE, so no wavelet of one can be taken by the other.
//!
//! # Tasks (per PE) and cost
//!
//! Forward: `start` (issue the `gamma`/`beta` receive; partial sums `sum_f x`; issue the reduce)
//! -> `broadcast_sum` -> `center` (`mean`; `x - mean` into `y`; partial `sum (x - mean)^2`;
//! reduce) -> `broadcast_var` -> `normalize` (`var + eps`; one scalar `1/sqrt` per token,
//! [`TaskCtx::rsqrt`], a software routine at `E = exp_cycles_per_element` cycles; `y = y rstd
//! gamma + beta`). Backward: `start` (issue the `gamma` receive;
//! `xhat` into `dx`; `sum dy xhat` and `sum dy` per feature; issue the column reduction) ->
//! `gradients` (`g = dy gamma`; partial `[sum g, sum g xhat]`; reduce) -> `broadcast` ->
//! `finish` (`dx = rstd (g - mean(g) - xhat mean(g xhat))`). Arrows are all-reduce phases,
//! chained by [`Join`]s.
//!
//! [`LayerNorm::estimate_cycles`] and [`LayerNormBackward::estimate_cycles`] follow the critical
//! path: PE column 0 of region row 0 (the largest tile; column 0 is the last to receive the
//! totals). With `t = max |T_r|`, `f = max |F_c|`, `s` the task switch, `i` the issue cost,
//! `V(n) = i + ceil(n / arith_f32)`, `M(n) = i + ceil(n / mov_f32)`, `J = s + 2i` (a join arm
//! task), `rho` the ramp latency and `h` the hop latency, an all-reduce of `n` values costs, from
//! the end of the task issuing it to the start of the task after it,
//! `A(n) = 2 (n - 1) + (C - 1)(2 rho + 2 h) + 2 rho + 3 J`: the chain
//! (`2 rho + h` per column), the last column's arm and broadcast task, the multicast back
//! (`2 rho + (C - 1) h`), column 0's arm; on one column, just the switch to the (empty)
//! broadcast task, `A(n) = s`. Then
//!
//! - forward `= max(T1 + A(t) + T3 + A(t), P(2f)) + T5`, with
//!   `T1 = s + i + M(t) + (f - 1) V(t) + K`,
//!   `T3 = s + V(t) + f V(t) + V(t) + 2 (f - 1) V(t) + K`,
//!   `T5 = s + 2 V(t) + t (2 i + E) + f (3 V(t) + 2 i)`, `K = 2i` if `C > 1` (the
//!   join's counter store and the operation's issue) else 0;
//! - backward `= max(max(TS, P(f)) + TG + A(2t) + TF, TS + Z)`, with
//!   `TS = s + 2 i + f (5 V(t) + 2 i)`,
//!   `TG = s + i + 2 V(t) + M(t) + (f - 1)(i + 4 V(t)) + K`, `TF = s + V(2t) + 4 f V(t)`, and
//!   `Z = (R - 1)(2 rho + h) + rho + h (1 + rows below the region) + 2f - 1` the column
//!   reduction's last wavelet reaching the south edge;
//! - without the parameter gradients (a frozen model), `start` only computes `xhat` and issues
//!   no column reduction: `TS = s + i + 2 f V(t)` and the backward is `max(TS, P(f)) + TG +
//!   A(2t) + TF`;
//! - `P(n) = h (Y + R) + rho + n - 1` the last of `n` streamed parameters reaching the core of
//!   the region's last row (`Y` rows above the region), which unblocks the task using them. It
//!   binds only for regions of many rows and few tokens per PE.
//!
//! What the formula leaves out: ramp contention when a PE's row and column operations push in
//! the same cycle (backward; a few cycles), and rows whose smaller tiles are not on the
//! critical path.
//!
//! No FMAC instructions (`fmac`, `dot`): this is non-matmul work and must not count in
//! `stats.total.fmacs`. Products are `mul`/`scale`, sums `add`/`sum`.

use wafersim_sim::{
    Buf, Color, DType, Executed, FabricConfig, Port, Program, RecvMode, RunOptions, Simulator,
    SinkId, Stats, TaskCtx, TaskId, Then, VecRef, Wavelet,
};

use crate::chain::{ChainColors, ColumnChain, RowAllReduce, feed_column_from_north};
use crate::check_region;
use crate::error::KernelError;
use crate::join::{self, ARMS, Join};
use crate::layout::{Region, Tiling};
use crate::tiles;

/// Name of the forward kernel in errors and reports.
pub const KERNEL: &str = "layernorm";
/// Name of the backward kernel.
pub const KERNEL_BACKWARD: &str = "layernorm_backward";

const PARAMS: Color = Color(0);
const ROW: RowAllReduce = RowAllReduce {
    east: ChainColors([Color(1), Color(2)]),
    broadcast: Color(3),
};
const COLUMN: ColumnChain = ColumnChain {
    south: ChainColors([Color(4), Color(5)]),
};
/// Colors the kernel routes on: `0..COLORS`.
pub const COLORS: u8 = crate::colors_used(&[ROW.east, COLUMN.south], &[PARAMS, ROW.broadcast]);

/// LayerNorm forward over the features of each token.
#[derive(Clone, Copy, Debug)]
pub struct LayerNorm<'a> {
    pub region: Region,
    pub tokens: usize,
    pub features: usize,
    /// `X`, `tokens x features` row-major.
    pub x: &'a [f32],
    /// Scale, one per feature (streamed from the host).
    pub gamma: &'a [f32],
    /// Shift, one per feature (streamed from the host).
    pub beta: &'a [f32],
    /// Added to the variance; finite and positive.
    pub eps: f32,
}

/// LayerNorm backward: input gradient and, if asked for, parameter gradients.
#[derive(Clone, Copy, Debug)]
pub struct LayerNormBackward<'a> {
    pub region: Region,
    pub tokens: usize,
    pub features: usize,
    /// Gradient of the forward's output, `tokens x features` row-major.
    pub dy: &'a [f32],
    /// The forward's input, same shape.
    pub x: &'a [f32],
    /// Scale, one per feature (streamed from the host).
    pub gamma: &'a [f32],
    /// Per-token mean from the forward.
    pub mean: &'a [f32],
    /// Per-token `1 / sqrt(var + eps)` from the forward.
    pub rstd: &'a [f32],
    /// Also compute `dgamma` and `dbeta` and send them to the host. Without them (a frozen
    /// model), no PE sums `dy xhat` or `dy`, allocates their buffer or joins the column chain.
    pub parameter_gradients: bool,
}

/// How a LayerNorm is laid out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerNormPlan {
    /// `X` (and `Y`, `dY`, `dX`) over the region.
    pub tiling: Tiling,
    /// SRAM used by the fullest PE, in bytes.
    pub sram_bytes: u64,
}

/// Where the forward's results are: per PE (row by row) its `Y` tile; per region row the `mean`
/// and `rstd` buffers of its column-0 PE (every PE of the row holds the same values).
#[derive(Clone, Debug)]
pub struct LayerNormBuffers {
    pub y: Vec<Buf>,
    pub mean: Vec<Buf>,
    pub rstd: Vec<Buf>,
}

/// Where the backward's results are: per PE (row by row) its `dX` tile; per region column the
/// sink receiving `[dgamma[F_c], dbeta[F_c]]` (none without parameter gradients).
#[derive(Clone, Debug)]
pub struct LayerNormBackwardBuffers {
    pub dx: Vec<Buf>,
    pub sinks: Vec<SinkId>,
}

/// The forward's results and what they cost.
#[derive(Clone, Debug)]
pub struct LayerNormRun {
    /// `Y`, `tokens x features` row-major.
    pub y: Vec<f32>,
    /// Per-token mean.
    pub mean: Vec<f32>,
    /// Per-token `1 / sqrt(var + eps)`.
    pub rstd: Vec<f32>,
    pub plan: LayerNormPlan,
    pub stats: Stats,
}

/// The backward's results and what they cost.
#[derive(Clone, Debug)]
pub struct LayerNormBackwardRun {
    /// `dX`, `tokens x features` row-major.
    pub dx: Vec<f32>,
    /// `dgamma` and `dbeta` as they reached the host, if the kernel was asked for them.
    pub parameter_gradients: Option<ParameterGradients>,
    pub plan: LayerNormPlan,
    pub stats: Stats,
}

/// The gradients of a LayerNorm's parameters, one per feature each.
#[derive(Clone, Debug, PartialEq)]
pub struct ParameterGradients {
    pub dgamma: Vec<f32>,
    pub dbeta: Vec<f32>,
}

/// The sizes one PE works with.
#[derive(Clone, Copy)]
struct Pe {
    c: usize,
    cols: usize,
    /// Tokens (length of every vector).
    t: u32,
    /// Features held.
    f: u32,
    /// Features of the whole token.
    features: usize,
}

impl Pe {
    fn new(tiling: &Tiling, c: u32, r: u32) -> Pe {
        Pe {
            c: c as usize,
            cols: tiling.features.parts,
            t: tiling.tokens.block(r as usize).len() as u32,
            f: tiling.features.block(c as usize).len() as u32,
            features: tiling.features.total,
        }
    }

    /// Feature `j`'s vector in a feature-major tile.
    fn column(&self, tile: Buf, j: u32) -> VecRef {
        tile.slice(j * self.t, self.t)
    }

    fn inv_features(&self) -> f32 {
        (1.0 / self.features as f64) as f32
    }
}

/// The largest token block and feature block of `tiling`: the fullest PE's tile.
fn largest_tile(tiling: &Tiling) -> (u64, u64) {
    (
        tiling.tokens.max_len() as u64,
        tiling.features.max_len() as u64,
    )
}

/// Checks the region and that `bytes` fit a PE.
fn check_fit(
    kernel: &'static str,
    config: &FabricConfig,
    bytes: u64,
    what: String,
) -> Result<(), KernelError> {
    let available = u64::from(config.sram_bytes);
    if bytes > available {
        return Err(KernelError::DoesNotFit {
            kernel,
            needed: bytes,
            available,
            what,
            hint: "spread the tokens over more region rows or the features over more columns"
                .into(),
        });
    }
    Ok(())
}

fn check_vector(
    kernel: &'static str,
    what: &str,
    v: &[f32],
    len: usize,
) -> Result<(), KernelError> {
    tiles::check_len(kernel, what, v, 1, len)
}

/// The two joins of one all-reduce on one PE: the first activates the broadcast task once the
/// reduce has finished here, the second the task after it once the broadcast has.
struct Phase {
    reduce: Join,
    broadcast: Join,
}

impl Phase {
    /// Creates the two joins on `pe`; `broadcast_task` and `after` are task ids to be created.
    fn place(
        p: &mut Program,
        pe: wafersim_sim::Coord,
        broadcast_task: TaskId,
        after: TaskId,
    ) -> Result<Phase, KernelError> {
        Ok(Phase {
            reduce: Join::place(p, pe, broadcast_task)?,
            broadcast: Join::place(p, pe, after)?,
        })
    }
}

/// `dst = sum_j tile[j]` over the `f` feature vectors (a move, then adds in feature order).
fn sum_features(ctx: &mut TaskCtx<'_>, pe: Pe, tile: Buf, dst: VecRef) {
    ctx.mov(dst, pe.column(tile, 0));
    for j in 1..pe.f {
        ctx.add(dst, dst, pe.column(tile, j));
    }
}

impl LayerNorm<'_> {
    fn check(&self, config: &FabricConfig) -> Result<(), KernelError> {
        let (t, f) = (self.tokens, self.features);
        tiles::check_len(KERNEL, "X", self.x, t, f)?;
        check_vector(KERNEL, "gamma", self.gamma, f)?;
        check_vector(KERNEL, "beta", self.beta, f)?;
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(KernelError::Shape {
                kernel: KERNEL,
                reason: format!("eps is {}, expected a finite value > 0", self.eps),
            });
        }
        check_region(KERNEL, config, self.region, t, f)
    }

    /// SRAM of the fullest PE for `tokens x features` on `region` (shapes only).
    pub fn sram_bytes(region: Region, tokens: usize, features: usize) -> u64 {
        let (t, f) = largest_tile(&Tiling::new(region, tokens, features));
        // x, y tiles; sum/mean, squares/var, scratch, rstd vectors; gamma and beta; 4 joins.
        4 * (2 * t * f + 4 * t + 2 * f + 4)
    }

    /// Checks shapes and that every PE's buffers fit its SRAM.
    pub fn plan(&self, config: &FabricConfig) -> Result<LayerNormPlan, KernelError> {
        self.check(config)?;
        let tiling = Tiling::new(self.region, self.tokens, self.features);
        let (t, f) = largest_tile(&tiling);
        let bytes = Self::sram_bytes(self.region, self.tokens, self.features);
        check_fit(
            KERNEL,
            config,
            bytes,
            format!("X and Y tiles of {t} x {f}, four vectors of {t}, gamma and beta"),
        )?;
        Ok(LayerNormPlan {
            tiling,
            sram_bytes: bytes,
        })
    }

    /// The program and where its results will be.
    pub fn build(
        &self,
        config: &FabricConfig,
    ) -> Result<(Program, LayerNormPlan, LayerNormBuffers), KernelError> {
        let plan = self.plan(config)?;
        let mut p = Program::new(config.clone())?;
        let mut bufs = LayerNormBuffers {
            y: Vec::new(),
            mean: Vec::new(),
            rstd: Vec::new(),
        };
        for r in 0..self.region.rows {
            for c in 0..self.region.cols {
                let (y, mean, rstd) = self.place_pe(&mut p, &plan.tiling, c, r)?;
                bufs.y.push(y);
                if c == 0 {
                    bufs.mean.push(mean);
                    bufs.rstd.push(rstd);
                }
            }
        }
        for c in 0..self.region.cols {
            let at = feed_column_from_north(&mut p, self.region, c, PARAMS)?;
            let own = plan.tiling.features.block(c as usize);
            let stream = self.gamma[own.clone()].iter().chain(&self.beta[own]);
            p.inject(
                at,
                Port::North,
                stream.map(|&v| (PARAMS, Wavelet::from_f32(v))),
            )?;
        }
        Ok((p, plan, bufs))
    }

    /// Builds, runs and reads back `y`, `mean` and `rstd`.
    pub fn run(
        &self,
        config: &FabricConfig,
        options: RunOptions,
    ) -> Result<LayerNormRun, KernelError> {
        let (program, plan, bufs) = self.build(config)?;
        let executed = Simulator::new(program)?.run(options)?;
        let y = tiles::gather(&executed, self.region, &plan.tiling, &bufs.y);
        let per_token = |list: &[Buf]| {
            (0..self.region.rows)
                .zip(list)
                .flat_map(|(r, &buf)| {
                    executed
                        .read(self.region.pe(0, r), buf)
                        .expect("the kernel placed this buffer on this PE")
                })
                .collect::<Vec<f32>>()
        };
        let (mean, rstd) = (per_token(&bufs.mean), per_token(&bufs.rstd));
        Ok(LayerNormRun {
            y,
            mean,
            rstd,
            plan,
            stats: executed.stats,
        })
    }

    /// Buffers, routes and tasks of PE (c, r); returns its `y`, `mean` and `rstd` buffers.
    fn place_pe(
        &self,
        p: &mut Program,
        tiling: &Tiling,
        c: u32,
        r: u32,
    ) -> Result<(Buf, Buf, Buf), KernelError> {
        let pe_at = self.region.pe(c, r);
        let pe = Pe::new(tiling, c, r);
        let (t, f, eps) = (pe.t as usize, pe.f as usize, self.eps);
        let x = tiles::place_tile(p, self.region, tiling, "x", self.x, (c, r))?;
        let y = p.alloc_zeros(pe_at, "y", DType::F32, t * f)?;
        let stat = p.alloc_zeros(pe_at, "sum_mean", DType::F32, t)?;
        let acc = p.alloc_zeros(pe_at, "squares_var", DType::F32, t)?;
        let tmp = p.alloc_zeros(pe_at, "scratch", DType::F32, t)?;
        let rstd = p.alloc_zeros(pe_at, "rstd", DType::F32, t)?;
        let params = p.alloc_zeros(pe_at, "gamma_beta", DType::F32, 2 * f)?;
        ROW.install(p, self.region, c, r)?;

        // Task ids: 4 joins of ARMS arms each, then the five tasks below in this order.
        let base = p.next_task_id(pe_at)?.0 + 4 * ARMS as u16;
        let [bcast_sum, center, bcast_var, normalize, start] =
            [0, 1, 2, 3, 4].map(|k| TaskId(base + k));
        let sum_phase = Phase::place(p, pe_at, bcast_sum, center)?;
        let var_phase = Phase::place(p, pe_at, bcast_var, normalize)?;
        let ids = [
            p.local_task(pe_at, "broadcast_sum", move |ctx| {
                join::issue(
                    ctx,
                    &ROW.broadcast_ops(pe.c, pe.cols, stat.all()),
                    &sum_phase.broadcast,
                )
            })?,
            p.local_task(pe_at, "center", move |ctx| {
                center_and_square(ctx, pe, x, y, stat, acc, tmp);
                join::issue(
                    ctx,
                    &ROW.reduce_ops(pe.c, pe.cols, acc.all()),
                    &var_phase.reduce,
                );
            })?,
            p.local_task(pe_at, "broadcast_var", move |ctx| {
                join::issue(
                    ctx,
                    &ROW.broadcast_ops(pe.c, pe.cols, acc.all()),
                    &var_phase.broadcast,
                )
            })?,
            p.local_task(pe_at, "normalize", move |ctx| {
                normalize_tokens(ctx, pe, y, acc, rstd, params, eps)
            })?,
            p.local_task(pe_at, "start", move |ctx| {
                ctx.recv(
                    PARAMS,
                    params.all(),
                    RecvMode::Store,
                    Then::Unblock(normalize),
                );
                sum_features(ctx, pe, x, stat.all());
                join::issue(
                    ctx,
                    &ROW.reduce_ops(pe.c, pe.cols, stat.all()),
                    &sum_phase.reduce,
                );
            })?,
        ];
        debug_assert_eq!(ids, [bcast_sum, center, bcast_var, normalize, start]);
        p.block(pe_at, normalize)?;
        p.activate(pe_at, start)?;
        Ok((y, stat, rstd))
    }

    /// The cycles of a run, from the formula in the module doc.
    pub fn estimate_cycles(&self, config: &FabricConfig) -> u64 {
        let c = Costs::new(config, self.region, self.tokens, self.features);
        let (t, f) = (c.t, c.f);
        let t1 = c.s + c.i + c.mov(t) + (f - 1) * c.v(t) + c.k;
        let t3 = c.s + c.v(t) + f * c.v(t) + c.v(t) + 2 * (f - 1) * c.v(t) + c.k;
        let rsqrt = config.software_routine_cycles();
        let t5 = c.s + 2 * c.v(t) + t * (2 * c.i + rsqrt) + f * (3 * c.v(t) + 2 * c.i);
        (t1 + c.all_reduce(t) + t3 + c.all_reduce(t)).max(c.params_arrive(2 * f)) + t5
    }
}

/// `mean = sum / F`; `y[j] = x[j] - mean`; `acc = sum_j y[j]^2` (partial over this PE).
fn center_and_square(ctx: &mut TaskCtx<'_>, pe: Pe, x: Buf, y: Buf, stat: Buf, acc: Buf, tmp: Buf) {
    let mean = stat.all();
    ctx.scale(mean, mean, pe.inv_features());
    for j in 0..pe.f {
        ctx.sub(pe.column(y, j), pe.column(x, j), mean);
    }
    let y0 = pe.column(y, 0);
    ctx.mul(acc.all(), y0, y0);
    for j in 1..pe.f {
        let yj = pe.column(y, j);
        ctx.mul(tmp.all(), yj, yj);
        ctx.add(acc.all(), acc.all(), tmp.all());
    }
}

/// `rstd = 1 / sqrt(acc / F + eps)` per token (scalar), then `y[j] = y[j] rstd gamma_j + beta_j`.
fn normalize_tokens(
    ctx: &mut TaskCtx<'_>,
    pe: Pe,
    y: Buf,
    acc: Buf,
    rstd: Buf,
    params: Buf,
    eps: f32,
) {
    let var = acc.all();
    ctx.scale(var, var, pe.inv_features());
    ctx.add_scalar(var, var, eps);
    for k in 0..pe.t {
        let v = ctx.load(acc.at(k));
        let r = ctx.rsqrt(v);
        ctx.store(rstd.at(k), r);
    }
    for j in 0..pe.f {
        let yj = pe.column(y, j);
        ctx.mul(yj, yj, rstd.all());
        let gamma = ctx.load(params.at(j));
        let beta = ctx.load(params.at(pe.f + j));
        ctx.scale(yj, yj, gamma);
        ctx.add_scalar(yj, yj, beta);
    }
}

impl LayerNormBackward<'_> {
    fn check(&self, config: &FabricConfig) -> Result<(), KernelError> {
        let k = KERNEL_BACKWARD;
        let (t, f) = (self.tokens, self.features);
        tiles::check_len(k, "dY", self.dy, t, f)?;
        tiles::check_len(k, "X", self.x, t, f)?;
        check_vector(k, "gamma", self.gamma, f)?;
        check_vector(k, "mean", self.mean, t)?;
        check_vector(k, "rstd", self.rstd, t)?;
        check_region(k, config, self.region, t, f)
    }

    /// SRAM of the fullest PE for `tokens x features` on `region`, with or without the
    /// parameter gradients (shapes only).
    pub fn sram_bytes(
        region: Region,
        tokens: usize,
        features: usize,
        parameter_gradients: bool,
    ) -> u64 {
        let (t, f) = largest_tile(&Tiling::new(region, tokens, features));
        // x, dy, dx, g tiles; mean, rstd, [sum g, sum g xhat], scratch; gamma and, with the
        // parameter gradients, [dgamma, dbeta]; 2 joins.
        let per_feature = if parameter_gradients { 3 } else { 1 };
        4 * (4 * t * f + 5 * t + per_feature * f + 2)
    }

    /// Checks shapes and that every PE's buffers fit its SRAM.
    pub fn plan(&self, config: &FabricConfig) -> Result<LayerNormPlan, KernelError> {
        self.check(config)?;
        let tiling = Tiling::new(self.region, self.tokens, self.features);
        let (t, f) = largest_tile(&tiling);
        let per_feature = if self.parameter_gradients { 3 } else { 1 };
        let bytes = Self::sram_bytes(
            self.region,
            self.tokens,
            self.features,
            self.parameter_gradients,
        );
        check_fit(
            KERNEL_BACKWARD,
            config,
            bytes,
            format!("four tiles of {t} x {f}, five vectors of {t}, {per_feature} of {f}"),
        )?;
        Ok(LayerNormPlan {
            tiling,
            sram_bytes: bytes,
        })
    }

    /// The program and where its results will be.
    pub fn build(
        &self,
        config: &FabricConfig,
    ) -> Result<(Program, LayerNormPlan, LayerNormBackwardBuffers), KernelError> {
        let plan = self.plan(config)?;
        let mut p = Program::new(config.clone())?;
        let mut dx = Vec::new();
        for r in 0..self.region.rows {
            for c in 0..self.region.cols {
                dx.push(self.place_pe(&mut p, &plan.tiling, c, r)?);
            }
        }
        let mut sinks = Vec::new();
        for c in 0..self.region.cols {
            let at = feed_column_from_north(&mut p, self.region, c, PARAMS)?;
            let own = plan.tiling.features.block(c as usize);
            let stream = self.gamma[own].iter();
            p.inject(
                at,
                Port::North,
                stream.map(|&v| (PARAMS, Wavelet::from_f32(v))),
            )?;
            if self.parameter_gradients {
                sinks.push(COLUMN.install_exit(&mut p, self.region, c)?);
            }
        }
        Ok((p, plan, LayerNormBackwardBuffers { dx, sinks }))
    }

    /// Builds, runs and reads back `dx` and, if asked for, `dgamma`, `dbeta` from the
    /// south-edge sinks.
    pub fn run(
        &self,
        config: &FabricConfig,
        options: RunOptions,
    ) -> Result<LayerNormBackwardRun, KernelError> {
        let (program, plan, bufs) = self.build(config)?;
        let executed = Simulator::new(program)?.run(options)?;
        let dx = tiles::gather(&executed, self.region, &plan.tiling, &bufs.dx);
        let parameter_gradients = if self.parameter_gradients {
            Some(read_parameter_gradients(
                &executed,
                &plan.tiling,
                &bufs.sinks,
            )?)
        } else {
            None
        };
        Ok(LayerNormBackwardRun {
            dx,
            parameter_gradients,
            plan,
            stats: executed.stats,
        })
    }

    /// Buffers, routes and tasks of PE (c, r); returns its `dx` buffer.
    fn place_pe(
        &self,
        p: &mut Program,
        tiling: &Tiling,
        c: u32,
        r: u32,
    ) -> Result<Buf, KernelError> {
        let pe_at = self.region.pe(c, r);
        let pe = Pe::new(tiling, c, r);
        let (t, f) = (pe.t as usize, pe.f as usize);
        let tokens = tiling.tokens.block(r as usize);
        let x = tiles::place_tile(p, self.region, tiling, "x", self.x, (c, r))?;
        let dy = tiles::place_tile(p, self.region, tiling, "dy", self.dy, (c, r))?;
        let mean = p.alloc_f32(pe_at, "mean", &self.mean[tokens.clone()])?;
        let rstd = p.alloc_f32(pe_at, "rstd", &self.rstd[tokens])?;
        let bufs = BackwardBufs {
            x,
            dy,
            mean,
            rstd,
            dx: p.alloc_zeros(pe_at, "xhat_dx", DType::F32, t * f)?,
            g: p.alloc_zeros(pe_at, "g", DType::F32, t * f)?,
            sums: p.alloc_zeros(pe_at, "sum_g_gxhat", DType::F32, 2 * t)?,
            tmp: p.alloc_zeros(pe_at, "scratch", DType::F32, t)?,
            gamma: p.alloc_zeros(pe_at, "gamma", DType::F32, f)?,
            dparams: if self.parameter_gradients {
                Some(p.alloc_zeros(pe_at, "dgamma_dbeta", DType::F32, 2 * f)?)
            } else {
                None
            },
        };
        ROW.install(p, self.region, c, r)?;
        if self.parameter_gradients {
            COLUMN.install(p, self.region, c, r)?;
        }

        // Task ids: 2 joins of ARMS arms each, then the four tasks below in this order.
        let base = p.next_task_id(pe_at)?.0 + 2 * ARMS as u16;
        let [broadcast, finish, gradients, start] = [0, 1, 2, 3].map(|k| TaskId(base + k));
        let phase = Phase::place(p, pe_at, broadcast, finish)?;
        let row = r as usize;
        let ids = [
            p.local_task(pe_at, "broadcast", move |ctx| {
                let ops = ROW.broadcast_ops(pe.c, pe.cols, bufs.sums.all());
                join::issue(ctx, &ops, &phase.broadcast)
            })?,
            p.local_task(pe_at, "finish", move |ctx| finish_dx(ctx, pe, bufs))?,
            p.local_task(pe_at, "gradients", move |ctx| {
                scaled_gradients(ctx, pe, bufs);
                join::issue(
                    ctx,
                    &ROW.reduce_ops(pe.c, pe.cols, bufs.sums.all()),
                    &phase.reduce,
                );
            })?,
            p.local_task(pe_at, "start", move |ctx| {
                ctx.recv(
                    PARAMS,
                    bufs.gamma.all(),
                    RecvMode::Store,
                    Then::Unblock(gradients),
                );
                xhat_and_parameter_partials(ctx, pe, bufs);
                if let Some(dparams) = bufs.dparams {
                    ctx.issue(COLUMN.reduce_south(row, dparams.all()), Then::Nothing);
                }
                ctx.activate(gradients);
            })?,
        ];
        debug_assert_eq!(ids, [broadcast, finish, gradients, start]);
        p.block(pe_at, gradients)?;
        p.activate(pe_at, start)?;
        Ok(bufs.dx)
    }

    /// The cycles of a run, from the formula in the module doc.
    pub fn estimate_cycles(&self, config: &FabricConfig) -> u64 {
        let c = Costs::new(config, self.region, self.tokens, self.features);
        let (t, f) = (c.t, c.f);
        let ts = if self.parameter_gradients {
            c.s + 2 * c.i + f * (5 * c.v(t) + 2 * c.i)
        } else {
            c.s + c.i + 2 * f * c.v(t)
        };
        let tg = c.s + c.i + 2 * c.v(t) + c.mov(t) + (f - 1) * (c.i + 4 * c.v(t)) + c.k;
        let tf = c.s + c.v(2 * t) + 4 * f * c.v(t);
        let main = ts.max(c.params_arrive(f)) + tg + c.all_reduce(2 * t) + tf;
        if !self.parameter_gradients {
            return main;
        }
        let rows = u64::from(self.region.rows);
        let below = u64::from(config.height).saturating_sub(c.rows_down_to_end);
        let column = (rows - 1) * (2 * c.rho + c.h) + c.rho + c.h * (1 + below) + 2 * f - 1;
        main.max(ts + column)
    }
}

/// `[dgamma[F_c], dbeta[F_c]]` from the sink below each region column `c`.
fn read_parameter_gradients(
    executed: &Executed,
    tiling: &Tiling,
    sinks: &[SinkId],
) -> Result<ParameterGradients, KernelError> {
    let features = tiling.features.total;
    let (mut dgamma, mut dbeta) = (vec![0.0; features], vec![0.0; features]);
    for (c, &sink) in sinks.iter().enumerate() {
        let own = tiling.features.block(c);
        let got: Vec<f32> = executed
            .sink(sink)
            .received
            .iter()
            .map(|w| w.2.f32())
            .collect();
        if got.len() != 2 * own.len() {
            return Err(KernelError::Shape {
                kernel: KERNEL_BACKWARD,
                reason: format!(
                    "column {c} sent {} parameter gradients to the host, expected {}",
                    got.len(),
                    2 * own.len()
                ),
            });
        }
        let (g, b) = got.split_at(own.len());
        dgamma[own.clone()].copy_from_slice(g);
        dbeta[own].copy_from_slice(b);
    }
    Ok(ParameterGradients { dgamma, dbeta })
}

/// The buffers of one PE of the backward.
#[derive(Clone, Copy)]
struct BackwardBufs {
    x: Buf,
    dy: Buf,
    mean: Buf,
    rstd: Buf,
    /// `xhat`, then `dx` in place.
    dx: Buf,
    g: Buf,
    /// `[sum g, sum g xhat]` over this PE's features, then over the token's, then their means.
    sums: Buf,
    tmp: Buf,
    gamma: Buf,
    /// `[sum_t dy xhat, sum_t dy]` per feature of this PE, if the parameter gradients are asked
    /// for.
    dparams: Option<Buf>,
}

/// `xhat[j] = (x[j] - mean) rstd` into `dx`; with `dparams`, `dgamma_j = sum(dy[j] xhat[j])`,
/// `dbeta_j = sum(dy[j])` over this PE's tokens.
fn xhat_and_parameter_partials(ctx: &mut TaskCtx<'_>, pe: Pe, b: BackwardBufs) {
    for j in 0..pe.f {
        let (xhat, dy) = (pe.column(b.dx, j), pe.column(b.dy, j));
        ctx.sub(xhat, pe.column(b.x, j), b.mean.all());
        ctx.mul(xhat, xhat, b.rstd.all());
        if let Some(dparams) = b.dparams {
            ctx.mul(b.tmp.all(), dy, xhat);
            let dgamma = ctx.sum(b.tmp.all());
            ctx.store(dparams.at(j), dgamma);
            let dbeta = ctx.sum(dy);
            ctx.store(dparams.at(pe.f + j), dbeta);
        }
    }
}

/// `g[j] = dy[j] gamma_j`; `sums = [sum_j g[j], sum_j g[j] xhat[j]]` over this PE's features.
fn scaled_gradients(ctx: &mut TaskCtx<'_>, pe: Pe, b: BackwardBufs) {
    let (sum_g, sum_gx) = (b.sums.slice(0, pe.t), b.sums.slice(pe.t, pe.t));
    for j in 0..pe.f {
        let (g, xhat) = (pe.column(b.g, j), pe.column(b.dx, j));
        let gamma = ctx.load(b.gamma.at(j));
        ctx.scale(g, pe.column(b.dy, j), gamma);
        if j == 0 {
            ctx.mul(sum_gx, g, xhat);
            ctx.mov(sum_g, g);
        } else {
            ctx.mul(b.tmp.all(), g, xhat);
            ctx.add(sum_gx, sum_gx, b.tmp.all());
            ctx.add(sum_g, sum_g, g);
        }
    }
}

/// `dx[j] = rstd (g[j] - mean(g) - xhat[j] mean(g xhat))`, `xhat` being in `dx` already.
fn finish_dx(ctx: &mut TaskCtx<'_>, pe: Pe, b: BackwardBufs) {
    ctx.scale(b.sums.all(), b.sums.all(), pe.inv_features());
    let (mean_g, mean_gx) = (b.sums.slice(0, pe.t), b.sums.slice(pe.t, pe.t));
    for j in 0..pe.f {
        let d = pe.column(b.dx, j);
        ctx.mul(d, d, mean_gx);
        ctx.sub(d, pe.column(b.g, j), d);
        ctx.sub(d, d, mean_g);
        ctx.mul(d, d, b.rstd.all());
    }
}

/// The machine constants and tile sizes the estimates use.
struct Costs<'a> {
    config: &'a FabricConfig,
    s: u64,
    i: u64,
    rho: u64,
    h: u64,
    cols: u64,
    /// Largest token block and feature block.
    t: u64,
    f: u64,
    /// Issue cost of a join's counter store and its one operation, if the row has a chain.
    k: u64,
    /// Fabric rows from the north edge to the region's last row, inclusive.
    rows_down_to_end: u64,
}

impl Costs<'_> {
    fn new(config: &FabricConfig, region: Region, tokens: usize, features: usize) -> Costs<'_> {
        let tiling = Tiling::new(region, tokens, features);
        let i = u64::from(config.issue_cycles);
        let cols = u64::from(region.cols);
        Costs {
            config,
            s: u64::from(config.task_switch_cycles),
            i,
            rho: u64::from(config.ramp_latency),
            h: u64::from(config.hop_latency),
            cols,
            t: tiling.tokens.max_len() as u64,
            f: tiling.features.max_len() as u64,
            k: if cols > 1 { 2 * i } else { 0 },
            rows_down_to_end: u64::from(region.origin.y) + u64::from(region.rows),
        }
    }

    /// `P(n)`: the cycle the last of `n` parameters streamed from cycle 0 reaches the core of
    /// the region's last row (one hop into the fabric, one per row, the ramp, one per cycle).
    fn params_arrive(&self, n: u64) -> u64 {
        self.h * self.rows_down_to_end + self.rho + n - 1
    }

    fn v(&self, n: u64) -> u64 {
        tiles::arith(self.config, n as usize)
    }

    fn mov(&self, n: u64) -> u64 {
        tiles::mov(self.config, n as usize)
    }

    /// `A(n)`: from the end of the task issuing an all-reduce of `n` values on column 0 to the
    /// start of the task after its broadcast there.
    fn all_reduce(&self, n: u64) -> u64 {
        if self.cols == 1 {
            return self.s;
        }
        let arm = self.s + 2 * self.i;
        2 * (n - 1) + (self.cols - 1) * (2 * self.rho + 2 * self.h) + 2 * self.rho + 3 * arm
    }
}
