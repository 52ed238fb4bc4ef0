//! The blocked backward: the gradients of causal multi-head attention from the blocked
//! forward's softmax statistics, one key block at a time (FlashAttention-2's backward on the
//! fabric), so that no PE holds more than one block of K, V and their gradients.
//!
//! A prelude run computes, per local head and token, `D = dO . O` over the head's features
//! (summed over the columns of a head that spans several) and the reciprocals of the forward's
//! sums. Then one run per key block ([`super::blocks`], the forward's runs): the block's K and V
//! are gathered down the columns as in the forward, each PE recomputes the probabilities of the
//! block's keys from its `Q` and the forward's statistics, forms `dP`, `dS` and its share of
//! `dQ` (accumulated over the runs), and the partial `dK`, `dV` of the block's keys are
//! reduce-scattered up and down each column into the rows that own them. A row's K and V are
//! gathered in exactly one run, so its `dK` and `dV` are complete after that run's reduction.
//!
//! What it is not: no overlap between runs (their cycles add up, the prelude's included). FMACs:
//! the unblocked backward's four products plus the recomputed scores, `5 B heads S^2 hd` in all,
//! every key of a sequence computed, future ones included.
//!
//! Cost: [`BlockedAttentionBackward::estimate_cycles`] adds up the prelude (the slowest row's
//! tasks, `D` and the reciprocals, with the group sums of `n` values per shared head) and the
//! runs, each ending with its last row's reduce-scatter: the forward's gather of the run's K and
//! V, then the row's compute (the scores and dP, the probabilities and dS, dQ and the partial
//! dK, dV of the run's keys, per local head and segment, with the group sums of `2 m` scores
//! and dP between the PE's two tasks, and the reduce-scatter's issue at the end), then the
//! reduce-scatter on the gather's chain-sharing model, its wavelets the other way round, the
//! northward chain stalling behind the owners' rows, as `blocked_backward_cost.rs` details. It
//! ignores the join tasks, the skew between a row's columns, the hop latency between rows that
//! start their reduce-scatter at different times and empty runs, and does not check the SRAM.
//! Measured against the exact engine in `kernels/tests/attention.rs` (every block size from one
//! row to all of them, on 12 shapes, 66 configurations), the estimate is within 0.972 to 1.019
//! of the runs' cycles; the test asserts 6 %. On the full wse2 rectangle (3 sequences of 2048
//! tokens, 16 heads of 128, blocks of 16 rows) it takes about 25 ms.
//!
//! Memory per PE (f32 elements, with the forward's notation): Q, K, V, dO tiles `4 F_c n`,
//! statistics `3 H_c n` (maximum, reciprocal sum, `D`), block window and partial dK, dV
//! `4 F_c W_k`, scores and dP `2 H_c A_k`, dQ `F_c n`, dK and dV `2 F_c n`, one join counter
//! and a group counter when the PE takes part in two groups. The prelude holds dO and O
//! `2 F_c n`, `D` and the sums `2 H_c n`, a row `n` and the counters.

use wafersim_sim::{
    Buf, Coord, DType, FabricConfig, Program, Simulator, Stats, TaskCtx, TaskId, Then, VecRef,
};

use super::blocked::{
    BlockGather, KvTiles, blocked_geometry, fewer_rows_hint, run_cycles, run_fmacs,
};
use super::blocked_backward_cost;
use super::blocked_memory::{self as memory, RowSizes};
use super::online_backward::{self as online, BackwardRunBufs, PreludeBufs};
use super::{
    AttentionShape, ColumnFacts, GATHER, Geometry, REDUCE, SUMS, check_lengths, read, region_pes,
};
use crate::error::KernelError;
use crate::join::{ARMS, Join};
use crate::layout::Region;
use crate::rowgroup::Member;
use crate::runs::Runs;
use crate::vchain::Part;

/// What to change when the prelude's buffers (which no key block size changes) do not fit.
const PRELUDE_HINT: &str =
    "use more region rows or columns (fewer tokens or features per PE) or shorter sequences";

/// Name of the blocked backward kernel in errors and reports.
pub const BLOCKED_BACKWARD_KERNEL: &str = "attention_blocked_backward";

/// The blocked backward to run.
#[derive(Clone, Copy, Debug)]
pub struct BlockedAttentionBackward<'a> {
    pub region: Region,
    pub shape: AttentionShape,
    /// Region rows per key block, as in the forward.
    pub block_rows: usize,
    /// `Q`, `K`, `V`, the forward's output `O` and its gradient `dO`: `T x F` row-major.
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub out: &'a [f32],
    pub d_out: &'a [f32],
    /// The forward's softmax statistics, `[batch][head][query]`
    /// ([`super::BlockedAttentionRun`]).
    pub max: &'a [f32],
    pub sum: &'a [f32],
}

/// The blocked backward's results, each `T x F` row-major.
#[derive(Clone, Debug)]
pub struct BlockedAttentionGrads {
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
    /// SRAM used by the fullest PE in its fullest run (prelude included), in bytes.
    pub sram_bytes: u64,
    /// The prelude's measurements, then each block run's.
    pub runs: Vec<Stats>,
}

impl BlockedAttentionGrads {
    /// Cycles of the whole backward: the prelude and the runs one after the other.
    pub fn cycles(&self) -> u64 {
        run_cycles(&self.runs)
    }

    /// Multiply-adds of every run.
    pub fn fmacs(&self) -> u64 {
        run_fmacs(&self.runs)
    }
}

/// What a PE keeps between runs: its statistics (from the prelude) and its gradients so far.
#[derive(Clone, Debug)]
struct Carried {
    max: Vec<f32>,
    recip_sum: Vec<f32>,
    delta: Vec<f32>,
    dq: Vec<f32>,
    dkv: Vec<f32>,
}

/// Where one PE keeps its gradients in one run's program.
#[derive(Clone, Copy, Debug)]
struct GradBufs {
    pe: Coord,
    dq: Buf,
    dkv: Buf,
}

impl BlockedAttentionBackward<'_> {
    /// The cut, if the region takes the shape and the blocks have rows.
    fn blocked_geometry(&self, config: &FabricConfig) -> Result<Geometry, KernelError> {
        let (region, shape) = (self.region, &self.shape);
        blocked_geometry(
            BLOCKED_BACKWARD_KERNEL,
            config,
            region,
            shape,
            self.block_rows,
        )
    }

    fn checked(&self, config: &FabricConfig) -> Result<Geometry, KernelError> {
        let kernel = BLOCKED_BACKWARD_KERNEL;
        let g = self.blocked_geometry(config)?;
        let tensors = [
            ("Q", self.q.len()),
            ("K", self.k.len()),
            ("V", self.v.len()),
            ("O", self.out.len()),
            ("dO", self.d_out.len()),
        ];
        let want = self.shape.tokens().saturating_mul(self.shape.features);
        check_lengths(kernel, &tensors, want, "tokens x features")?;
        let statistics = [("max", self.max.len()), ("sum", self.sum.len())];
        let s = &self.shape;
        let want = s.batch.saturating_mul(s.heads).saturating_mul(s.seq_len);
        check_lengths(kernel, &statistics, want, "batch x heads x seq_len")?;
        Ok(g)
    }

    /// The cycles [`BlockedAttentionBackward::run`] would take (the prelude and every run),
    /// from the analytic formula (`blocked_backward_cost.rs`), without simulating. Like
    /// [`super::BlockedAttention::estimate_cycles`] it needs no data and does not check that the
    /// buffers fit the SRAM ([`BlockedAttentionBackward::plan`] does).
    pub fn estimate_cycles(&self, config: &FabricConfig) -> Result<u64, KernelError> {
        let g = self.blocked_geometry(config)?;
        Ok(blocked_backward_cost::total(config, &g, self.block_rows))
    }

    /// Checks the shapes and that every PE's buffers fit its SRAM in every run; the fullest
    /// PE's bytes.
    pub fn plan(&self, config: &FabricConfig) -> Result<u64, KernelError> {
        let g = self.checked(config)?;
        plan(config, &g, self.block_rows)
    }

    /// Runs the prelude and every block (`observer` gives each run's options and sees its
    /// measurements), and reads back dQ, dK, dV.
    pub fn run(
        &self,
        config: &FabricConfig,
        observer: &mut impl Runs,
    ) -> Result<BlockedAttentionGrads, KernelError> {
        let g = self.checked(config)?;
        let sram_bytes = plan(config, &g, self.block_rows)?;
        let mut runs = Vec::new();
        let (mut carried, prelude) = self.prelude(config, &g, observer)?;
        runs.push(prelude);
        for k in 0..g.runs(self.block_rows) {
            let (program, placed) = self.build_run(config, &g, k, &carried)?;
            let executed = Simulator::new(program)?.run(observer.next())?;
            observer.finished(&executed.stats);
            for (state, bufs) in carried.iter_mut().zip(&placed) {
                if let Some(bufs) = bufs {
                    state.dq = read(&executed, bufs.pe, bufs.dq);
                    state.dkv = read(&executed, bufs.pe, bufs.dkv);
                }
            }
            runs.push(executed.stats);
        }
        let len = self.shape.tokens() * self.shape.features;
        let (mut dq, mut dk, mut dv) = (vec![0.0; len], vec![0.0; len], vec![0.0; len]);
        for ((c, r), state) in region_pes(self.region).zip(&carried) {
            let (c, r) = (c as usize, r as usize);
            g.tiling.untile(&state.dq, &mut dq, c, r);
            let (k_tile, v_tile) = state.dkv.split_at(state.dkv.len() / 2);
            g.tiling.untile(k_tile, &mut dk, c, r);
            g.tiling.untile(v_tile, &mut dv, c, r);
        }
        Ok(BlockedAttentionGrads {
            dq,
            dk,
            dv,
            sram_bytes,
            runs,
        })
    }

    /// PE (c, r)'s values of `host` statistics (`[batch][head][query]`), `[head][token]`.
    fn statistics_tile(&self, g: &Geometry, (c, r): (usize, usize), host: &[f32]) -> Vec<f32> {
        g.statistics_indices(c, r)
            .into_iter()
            .map(|i| host[i])
            .collect()
    }

    /// The prelude run: `D` and the reciprocal sums of every PE.
    fn prelude(
        &self,
        config: &FabricConfig,
        g: &Geometry,
        observer: &mut impl Runs,
    ) -> Result<(Vec<Carried>, Stats), KernelError> {
        let mut p = Program::new(config.clone())?;
        let mut placed = Vec::new();
        for (c, r) in region_pes(self.region) {
            placed.push(self.place_prelude(&mut p, g, (c as usize, r as usize))?);
        }
        let executed = Simulator::new(p)?.run(observer.next())?;
        observer.finished(&executed.stats);
        let carried = region_pes(self.region)
            .zip(&placed)
            .map(|((c, r), &(pe, bufs))| {
                let (c, r) = (c as usize, r as usize);
                Carried {
                    max: self.statistics_tile(g, (c, r), self.max),
                    recip_sum: read(&executed, pe, bufs.sum),
                    delta: read(&executed, pe, bufs.delta),
                    dq: vec![0.0; g.fc(c) * g.n(r)],
                    dkv: vec![0.0; 2 * g.fc(c) * g.n(r)],
                }
            })
            .collect();
        Ok((carried, executed.stats))
    }

    /// PE (c, r)'s prelude: the partial `D` of its shared heads, their group sums, the whole
    /// heads' `D`, the reciprocal sums.
    fn place_prelude(
        &self,
        p: &mut Program,
        g: &Geometry,
        (c, r): (usize, usize),
    ) -> Result<(Coord, PreludeBufs), KernelError> {
        let pe = self.region.pe(c as u32, r as u32);
        let tile = |m: &[f32]| g.tiling.tile(m, c, r);
        let heads = g.local_heads(c);
        let n = g.n(r);
        let bufs = PreludeBufs {
            d_out: p.alloc_f32(pe, "d_out", &tile(self.d_out))?,
            out: p.alloc_f32(pe, "out", &tile(self.out))?,
            delta: p.alloc_zeros(pe, "delta", DType::F32, heads.len() * n)?,
            sum: p.alloc_f32(pe, "sum", &self.statistics_tile(g, (c, r), self.sum))?,
            tmp: p.alloc_zeros(pe, "row_tmp", DType::F32, n)?,
        };
        let members: Vec<Member> = heads
            .iter()
            .enumerate()
            .filter(|(_, h)| h.shared())
            .map(|(i, h)| Member {
                group: h.group.clone(),
                data: bufs.delta.slice((i * n) as u32, n as u32),
            })
            .collect();
        SUMS.install(p, self.region, (c as u32, r as u32), &members)?;
        let sums = if members.is_empty() {
            None
        } else {
            let done = p.local_task(pe, "delta_summed", |_| {})?;
            Some(SUMS.place(p, pe, c, &members, done)?)
        };
        let n = n as u32;
        let task = p.local_task(pe, "attention_prelude", move |ctx| {
            online::prelude_partial_delta(ctx, &heads, n, &bufs, true);
            if let Some(part) = &sums {
                part.issue(ctx);
            }
            online::prelude_partial_delta(ctx, &heads, n, &bufs, false);
            online::prelude_reciprocals(ctx, heads.len(), n, &bufs);
        })?;
        p.activate(pe, task)?;
        Ok((pe, bufs))
    }

    /// Run `k`'s program and, per PE (row by row), where its gradients are if the run gives it
    /// work.
    fn build_run(
        &self,
        config: &FabricConfig,
        g: &Geometry,
        k: usize,
        carried: &[Carried],
    ) -> Result<(Program, Vec<Option<GradBufs>>), KernelError> {
        let mut p = Program::new(config.clone())?;
        let mut placed = Vec::with_capacity(carried.len());
        for ((c, r), state) in region_pes(self.region).zip(carried) {
            // Every PE keeps its column's chain routes (see the forward).
            GATHER.install(&mut p, self.region, c, r)?;
            REDUCE.install(&mut p, self.region, c, r)?;
            let (c, r) = (c as usize, r as usize);
            placed.push(if g.run_window(r, k, self.block_rows).is_empty() {
                None
            } else {
                Some(self.place_pe(&mut p, g, (c, r), k, state)?)
            });
        }
        Ok((p, placed))
    }

    /// Buffers and tasks of PE (c, r) in run `k`.
    fn place_pe(
        &self,
        p: &mut Program,
        g: &Geometry,
        (c, r): (usize, usize),
        k: usize,
        state: &Carried,
    ) -> Result<GradBufs, KernelError> {
        let pe = self.region.pe(c as u32, r as u32);
        let tile = |m: &[f32]| g.tiling.tile(m, c, r);
        let work = g.run_work(c, r, k, self.block_rows, self.shape.scale);
        let window_len = g.run_window_len(c, r, k, self.block_rows);
        let tiles = KvTiles {
            k: p.alloc_f32(pe, "k", &tile(self.k))?,
            v: p.alloc_f32(pe, "v", &tile(self.v))?,
        };
        let bufs = BackwardRunBufs {
            q: p.alloc_f32(pe, "q", &tile(self.q))?,
            d_out: p.alloc_f32(pe, "d_out", &tile(self.d_out))?,
            max: p.alloc_f32(pe, "max", &state.max)?,
            recip_sum: p.alloc_f32(pe, "recip_sum", &state.recip_sum)?,
            delta: p.alloc_f32(pe, "delta", &state.delta)?,
            window: p.alloc_zeros(pe, "kv_block", DType::F32, window_len)?,
            partial: p.alloc_zeros(pe, "dkv_partial", DType::F32, window_len)?,
            work: p.alloc_zeros(
                pe,
                "scores_dp",
                DType::F32,
                2 * work.heads.len() * work.head_scores as usize,
            )?,
            dq: p.alloc_f32(pe, "dq", &state.dq)?,
        };
        let dkv = p.alloc_f32(pe, "dkv", &state.dkv)?;
        let members: Vec<Member> = work
            .shared_heads()
            .map(|(i, head)| Member {
                group: head.group.clone(),
                data: work.head_work(bufs.work, i),
            })
            .collect();
        SUMS.install(p, self.region, (c as u32, r as u32), &members)?;
        let reduce = BlockReduce::new(g, (c, r), k, self.block_rows, bufs.partial, dkv);
        let sums = if members.is_empty() {
            None
        } else {
            let (rest, reduce) = (work.clone(), reduce.clone());
            let task = p.local_task(pe, "attention_blocked_backward_shared", move |ctx| {
                online::shared_rest(ctx, &rest, &bufs);
                reduce.issue(ctx);
            })?;
            Some(SUMS.place(p, pe, c, &members, task)?)
        };
        let compute_id = TaskId(p.next_task_id(pe)?.0 + ARMS as u16);
        let join = Join::place(p, pe, compute_id)?;
        let compute = p.local_task(pe, "attention_blocked_backward", move |ctx| {
            online::shared_partials(ctx, &work, &bufs);
            if let Some(part) = &sums {
                part.issue(ctx);
            }
            online::whole(ctx, &work, &bufs);
            if sums.is_none() {
                reduce.issue(ctx);
            }
        })?;
        debug_assert_eq!(compute, compute_id);
        let gather = BlockGather::new(g, (c, r), k, self.block_rows, tiles, bufs.window);
        let start = gather.place(p, pe, g, (c, r), join)?;
        p.activate(pe, start)?;
        Ok(GradBufs {
            pe,
            dq: bufs.dq,
            dkv,
        })
    }
}

/// One PE's part of run `k`'s dK/dV reduce-scatter, issued when its compute is done.
#[derive(Clone, Debug)]
struct BlockReduce {
    r: usize,
    /// The row's own partial sums, if it is gathered in this run.
    own: Option<VecRef>,
    result: Buf,
    parts: Vec<Part>,
}

impl BlockReduce {
    fn new(
        g: &Geometry,
        (c, r): (usize, usize),
        k: usize,
        block_rows: usize,
        partial: Buf,
        result: Buf,
    ) -> Self {
        let slot = |b: usize| partial.slice(g.run_slot(c, r, k, block_rows, b), g.slot_len(c, b));
        BlockReduce {
            r,
            own: (g.run_of(r, block_rows) == k).then(|| slot(r)),
            result,
            parts: g
                .run_window(r, k, block_rows)
                .into_iter()
                .map(|b| Part {
                    owner: b,
                    reach: g.reach(b),
                    data: slot(b),
                })
                .collect(),
        }
    }

    /// Copies the PE's own partial sums into its result (in its own run) and starts the
    /// collective; nothing waits for it.
    fn issue(&self, ctx: &mut TaskCtx<'_>) {
        if let Some(own) = self.own {
            ctx.mov(self.result.all(), own);
        }
        for op in REDUCE.reduce_scatter(self.r, &self.parts, self.result.all()) {
            ctx.issue(op, Then::Nothing);
        }
    }
}

/// The fullest PE's bytes over the prelude and the runs, if it fits its SRAM.
fn plan(config: &FabricConfig, g: &Geometry, block_rows: usize) -> Result<u64, KernelError> {
    let columns: Vec<ColumnFacts> = (0..g.cols).map(|c| ColumnFacts::of(g, c)).collect();
    // (elements, column, row, run; None for the prelude).
    let mut worst: (u64, usize, usize, Option<usize>) = (0, 0, 0, None);
    for r in 0..g.rows {
        let mut row_runs = vec![(None, None)];
        for (k, sizes) in g.runs_sizes(r, block_rows).into_iter().enumerate() {
            if sizes.window > 0 {
                row_runs.push((Some(k), Some(RowSizes::of(g, r, sizes))));
            }
        }
        for (k, row) in row_runs {
            for (c, &col) in columns.iter().enumerate() {
                let elements = match row {
                    None => memory::prelude(col, g.n(r) as u64).total,
                    Some(row) => memory::backward(col, row).total,
                };
                if elements > worst.0 {
                    worst = (elements, c, r, k);
                }
            }
        }
    }
    let (elements, c, r, k) = worst;
    let (needed, available) = (4 * elements, u64::from(config.sram_bytes));
    if needed > available {
        let when = k.map_or("the prelude".to_string(), |k| format!("run {k}"));
        return Err(KernelError::DoesNotFit {
            kernel: BLOCKED_BACKWARD_KERNEL,
            needed,
            available,
            what: format!("PE column {c}, row {r}, {when}"),
            hint: match k {
                Some(_) => fewer_rows_hint(block_rows),
                None => PRELUDE_HINT.into(),
            },
        });
    }
    Ok(needed)
}
