//! The blocked forward: causal multi-head attention whose working set is one block of keys,
//! whatever the sequence length (FlashAttention's schedule on the fabric).
//!
//! The unblocked forward ([`super::Attention`]) keeps on every PE the K and V of whole sequences
//! (its window) and the probabilities of every key; at a few thousand tokens that is several
//! times a PE's SRAM. Here the window is cut into key blocks of at most `block_rows` region rows
//! ([`super::blocks`]) and the kernel runs once per block: each run gathers its block's K and V
//! down the columns (the same chains as the unblocked gather, restricted to the block's rows),
//! computes the scores of its keys (summed over the columns of a head that spans several, as
//! before), and folds them into a running maximum and sum per token and head, rescaling the
//! output accumulated so far ([`super::online`]). A PE's last run divides its output by the sum.
//! The running maximum and sum are the softmax statistics a backward pass recomputes the
//! probabilities from: `p_j = exp(scale s_j - m) / l`.
//!
//! Between runs, the output tile and the statistics stay where they are (the host carries them
//! from one simulated run to the next, as it carries every kernel's outputs to the next kernel);
//! the Q, K and V tiles are resident throughout.
//!
//! What it is not: the backward (`blocked_backward.rs`), and no overlap between runs (each run starts when the
//! previous one has ended on every PE: the cycles of the runs add up; a kernel that gathered
//! block `k + 1` while computing block `k` would hide part of each gather, with twice the
//! window). Every key of a sequence is computed, future ones included, as the unblocked kernel
//! and PyTorch eager do: the FMACs executed are exactly the unblocked forward's.
//!
//! Cost: [`BlockedAttention::estimate_cycles`] adds up the runs, each ending with its last row:
//! the row's part of the gather of the run's owner rows (the copy of the PE's own K and V, the
//! two column chains sharing each core's ramp, a hop per row to its farthest owner), then its
//! compute (the scores, the online update and the context of the run's keys, per local head and
//! segment, with the group sums of heads over several columns between the PE's two tasks, and
//! the normalisation in the row's last run), as `blocked_cost.rs` details. It ignores the join
//! tasks, the skew between a row's columns and empty runs, and does not check the SRAM.
//! Measured against the exact engine in `kernels/tests/attention.rs` (every block size from one
//! row to all of them, on 12 shapes, 66 configurations), the estimate is within 0.989 to 1.014
//! of the runs' cycles; the test asserts 6 %.
//!
//! Memory per PE (f32 elements, `n` tokens, `F_c` features, `H_c` local heads, longest segment
//! `L`, the most tokens `W_k` and scores `A_k` of one head in any run): Q, K, V, O tiles
//! `4 F_c n`, statistics `2 H_c n`, block window `2 F_c W_k`, scores `H_c A_k`, rows `2 L + n`,
//! one join counter and a group counter when the PE takes part in two groups.

use wafersim_sim::{
    Buf, BuildError, Coord, DType, Executed, FabricConfig, Program, Simulator, Stats, TaskCtx,
    TaskId, VecRef,
};

use super::blocked_cost;
use super::blocked_memory::{self as memory, RowSizes};
use super::blocks::RunWork;
use super::online::{self, OnlineBufs};
use super::{
    AttentionShape, ColumnFacts, GATHER, Geometry, SUMS, check_lengths, geometry, read, region_pes,
};
use crate::error::KernelError;
use crate::join::{self, ARMS, Join};
use crate::layout::Region;
use crate::rowgroup::Member;
use crate::runs::Runs;
use crate::vchain::Part;

/// Name of the blocked forward kernel in errors and reports.
pub const BLOCKED_KERNEL: &str = "attention_blocked";

/// The blocked forward to run.
#[derive(Clone, Copy, Debug)]
pub struct BlockedAttention<'a> {
    pub region: Region,
    pub shape: AttentionShape,
    /// Region rows per key block (at least 1): the larger, the fewer runs and the more SRAM.
    pub block_rows: usize,
    /// `Q`, `K`, `V`: `T x F` row-major.
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
}

/// How the blocked forward is cut over a region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockedPlan {
    /// Region rows per key block.
    pub block_rows: usize,
    /// Kernel runs, one per key block.
    pub runs: usize,
    /// SRAM used by the fullest PE in its fullest run, in bytes.
    pub sram_bytes: u64,
}

/// The blocked forward's results.
#[derive(Clone, Debug)]
pub struct BlockedAttentionRun {
    /// `O`, `T x F` row-major.
    pub out: Vec<f32>,
    /// The softmax statistics per `[batch][head][query]`: the maximum of the scaled scores and
    /// the sum of `exp(scaled score - maximum)` over the keys the query sees.
    pub max: Vec<f32>,
    pub sum: Vec<f32>,
    pub plan: BlockedPlan,
    /// Each run's measurements, in order.
    pub runs: Vec<Stats>,
}

impl BlockedAttentionRun {
    /// Cycles of the whole forward: the runs one after the other.
    pub fn cycles(&self) -> u64 {
        run_cycles(&self.runs)
    }

    /// Multiply-adds of every run.
    pub fn fmacs(&self) -> u64 {
        run_fmacs(&self.runs)
    }
}

/// Cycles of runs one after the other.
pub(super) fn run_cycles(runs: &[Stats]) -> u64 {
    runs.iter().map(|s| s.cycles).sum()
}

/// Multiply-adds of every run.
pub(super) fn run_fmacs(runs: &[Stats]) -> u64 {
    runs.iter().map(|s| s.total.fmacs).sum()
}

/// The cut of a blocked kernel, if the region takes the shape and the blocks have rows.
pub(super) fn blocked_geometry(
    kernel: &'static str,
    config: &FabricConfig,
    region: Region,
    shape: &AttentionShape,
    block_rows: usize,
) -> Result<Geometry, KernelError> {
    let g = geometry(kernel, config, region, shape)?;
    if block_rows == 0 {
        return Err(KernelError::Shape {
            kernel,
            reason: "block_rows must be at least 1".into(),
        });
    }
    Ok(g)
}

/// What a PE carries from one run to the next: its output tile and its statistics.
#[derive(Clone, Debug)]
struct Carried {
    out: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
}

/// Where one PE keeps what it carries, in one run's program.
#[derive(Clone, Copy, Debug)]
struct CarriedBufs {
    pe: Coord,
    out: Buf,
    max: Buf,
    sum: Buf,
}

impl BlockedAttention<'_> {
    /// The cut, if the region takes the shape and the blocks have rows.
    fn blocked_geometry(&self, config: &FabricConfig) -> Result<Geometry, KernelError> {
        let (region, shape) = (self.region, &self.shape);
        blocked_geometry(BLOCKED_KERNEL, config, region, shape, self.block_rows)
    }

    fn checked(&self, config: &FabricConfig) -> Result<Geometry, KernelError> {
        let g = self.blocked_geometry(config)?;
        let lengths = [
            ("Q", self.q.len()),
            ("K", self.k.len()),
            ("V", self.v.len()),
        ];
        let want = self.shape.tokens().saturating_mul(self.shape.features);
        check_lengths(BLOCKED_KERNEL, &lengths, want, "tokens x features")?;
        Ok(g)
    }

    /// Checks the shapes and that every PE's buffers fit its SRAM in every run.
    pub fn plan(&self, config: &FabricConfig) -> Result<BlockedPlan, KernelError> {
        let g = self.checked(config)?;
        plan(config, &g, self.block_rows)
    }

    /// Cycles of the whole blocked forward (every run, one after the other) by the analytic
    /// formula (`blocked_cost.rs`), without simulating, or why the region refuses the shape or
    /// the block size. Like [`super::Attention::estimate_cycles`] it needs no data and does not
    /// check that the buffers fit the SRAM ([`BlockedAttention::plan`] does).
    pub fn estimate_cycles(&self, config: &FabricConfig) -> Result<u64, KernelError> {
        let g = self.blocked_geometry(config)?;
        Ok(blocked_cost::total(config, &g, self.block_rows))
    }

    /// Runs every block (`observer` gives each run's options and sees its measurements) and
    /// reads back `O` and the softmax statistics.
    pub fn run(
        &self,
        config: &FabricConfig,
        observer: &mut impl Runs,
    ) -> Result<BlockedAttentionRun, KernelError> {
        let g = self.checked(config)?;
        let plan = plan(config, &g, self.block_rows)?;
        let mut carried: Vec<Carried> = region_pes(self.region)
            .map(|(c, r)| start_state(&g, c as usize, r as usize))
            .collect();
        let mut runs = Vec::with_capacity(plan.runs);
        for k in 0..plan.runs {
            let (program, placed) = self.build_run(config, &g, k, &carried)?;
            let executed = Simulator::new(program)?.run(observer.next())?;
            observer.finished(&executed.stats);
            for (state, bufs) in carried.iter_mut().zip(&placed) {
                if let Some(bufs) = bufs {
                    *state = read_carried(&executed, bufs);
                }
            }
            runs.push(executed.stats);
        }
        Ok(self.results(&g, plan, &carried, runs))
    }

    /// Run `k`'s program, and for each PE (row by row) where it keeps what it carries, if the
    /// run gives it any work.
    fn build_run(
        &self,
        config: &FabricConfig,
        g: &Geometry,
        k: usize,
        carried: &[Carried],
    ) -> Result<(Program, Vec<Option<CarriedBufs>>), KernelError> {
        let mut p = Program::new(config.clone())?;
        let mut placed = Vec::with_capacity(carried.len());
        for ((c, r), state) in region_pes(self.region).zip(carried) {
            let (cu, ru) = (c as usize, r as usize);
            // Every PE keeps its column's chain routes, so that an active row's routes never
            // end at an idle one's router.
            GATHER.install(&mut p, self.region, c, r)?;
            placed.push(if g.run_window(ru, k, self.block_rows).is_empty() {
                None
            } else {
                Some(self.place_pe(&mut p, g, (cu, ru), k, state)?)
            });
        }
        Ok((p, placed))
    }

    /// Buffers, routes and tasks of PE (c, r) in run `k`.
    fn place_pe(
        &self,
        p: &mut Program,
        g: &Geometry,
        (c, r): (usize, usize),
        k: usize,
        state: &Carried,
    ) -> Result<CarriedBufs, KernelError> {
        let pe = self.region.pe(c as u32, r as u32);
        let tile = |m: &[f32]| g.tiling.tile(m, c, r);
        let work = g.run_work(c, r, k, self.block_rows, self.shape.scale);
        let (heads, longest) = (work.heads.len(), work.longest as usize);
        let tiles = KvTiles {
            k: p.alloc_f32(pe, "k", &tile(self.k))?,
            v: p.alloc_f32(pe, "v", &tile(self.v))?,
        };
        let bufs = OnlineBufs {
            q: p.alloc_f32(pe, "q", &tile(self.q))?,
            out: p.alloc_f32(pe, "out", &state.out)?,
            window: p.alloc_zeros(
                pe,
                "kv_block",
                DType::F32,
                g.run_window_len(c, r, k, self.block_rows),
            )?,
            scores: p.alloc_zeros(pe, "scores", DType::F32, heads * work.head_scores as usize)?,
            max: p.alloc_f32(pe, "run_max", &state.max)?,
            sum: p.alloc_f32(pe, "run_sum", &state.sum)?,
            new_max: p.alloc_zeros(pe, "new_max", DType::F32, longest)?,
            run_sum: p.alloc_zeros(pe, "block_sum", DType::F32, longest)?,
            rescale: p.alloc_zeros(pe, "rescale", DType::F32, work.n as usize)?,
        };
        let members = members(&work, bufs.scores);
        SUMS.install(p, self.region, (c as u32, r as u32), &members)?;

        let sums = if members.is_empty() {
            None
        } else {
            let rest = work.clone();
            let task = p.local_task(pe, "attention_blocked_shared", move |ctx| {
                online::shared_rest(ctx, &rest, &bufs);
                finish(ctx, &rest, &bufs);
            })?;
            Some(SUMS.place(p, pe, c, &members, task)?)
        };
        let compute_id = TaskId(p.next_task_id(pe)?.0 + ARMS as u16);
        let join = Join::place(p, pe, compute_id)?;
        let last_task = sums.is_none();
        let compute = p.local_task(pe, "attention_blocked", move |ctx| {
            online::shared_scores(ctx, &work, &bufs);
            if let Some(part) = &sums {
                part.issue(ctx);
            }
            online::whole(ctx, &work, &bufs);
            if last_task {
                finish(ctx, &work, &bufs);
            }
        })?;
        debug_assert_eq!(compute, compute_id);
        let gather = BlockGather::new(g, (c, r), k, self.block_rows, tiles, bufs.window);
        let start = gather.place(p, pe, g, (c, r), join)?;
        p.activate(pe, start)?;
        Ok(CarriedBufs {
            pe,
            out: bufs.out,
            max: bufs.max,
            sum: bufs.sum,
        })
    }

    /// `O` and the statistics in the host's layouts.
    fn results(
        &self,
        g: &Geometry,
        plan: BlockedPlan,
        carried: &[Carried],
        runs: Vec<Stats>,
    ) -> BlockedAttentionRun {
        let s = &self.shape;
        let mut out = vec![0.0; s.tokens() * s.features];
        let statistics = s.batch * s.heads * s.seq_len;
        let (mut max, mut sum) = (vec![0.0; statistics], vec![0.0; statistics]);
        for ((c, r), state) in region_pes(self.region).zip(carried) {
            let (c, r) = (c as usize, r as usize);
            g.tiling.untile(&state.out, &mut out, c, r);
            let indices = g.statistics_indices(c, r);
            let per_head = g.n(r);
            // A head over several columns has the same statistics on each: read its first.
            for (i, head) in g.local_heads(c).iter().enumerate() {
                if head.group.start != c {
                    continue;
                }
                for at in i * per_head..(i + 1) * per_head {
                    max[indices[at]] = state.max[at];
                    sum[indices[at]] = state.sum[at];
                }
            }
        }
        BlockedAttentionRun {
            out,
            max,
            sum,
            plan,
            runs,
        }
    }
}

/// A PE's state before its first run: output zero, maximum `f32::MIN`, sum zero.
fn start_state(g: &Geometry, c: usize, r: usize) -> Carried {
    let statistics = g.local_heads(c).len() * g.n(r);
    Carried {
        out: vec![0.0; g.fc(c) * g.n(r)],
        max: vec![f32::MIN; statistics],
        sum: vec![0.0; statistics],
    }
}

fn read_carried(executed: &Executed, b: &CarriedBufs) -> Carried {
    Carried {
        out: read(executed, b.pe, b.out),
        max: read(executed, b.pe, b.max),
        sum: read(executed, b.pe, b.sum),
    }
}

/// The PE's last run normalises its output after its last update.
fn finish(ctx: &mut TaskCtx<'_>, w: &RunWork, b: &OnlineBufs) {
    if w.last {
        online::normalise(ctx, w, b);
    }
}

/// The shared heads' score blocks of `scores` as members of their column groups.
fn members(w: &RunWork, scores: Buf) -> Vec<Member> {
    w.shared_heads()
        .map(|(i, head)| Member {
            group: head.group.clone(),
            data: scores.slice(i * w.head_scores, w.head_scores),
        })
        .collect()
}

/// A row's own K and V when its run comes: the tiles and their slot in the block window
/// (`[K tile | V tile]`).
#[derive(Clone, Copy, Debug)]
struct OwnSlot {
    k: Buf,
    v: Buf,
    k_at: VecRef,
    v_at: VecRef,
    slot: VecRef,
}

/// The K and V tiles every PE keeps for the whole pass.
#[derive(Clone, Copy, Debug)]
pub(super) struct KvTiles {
    pub k: Buf,
    pub v: Buf,
}

/// One PE's part of run `k`'s gather.
#[derive(Clone, Copy, Debug)]
pub(super) struct BlockGather {
    k: usize,
    block_rows: usize,
    own: Option<OwnSlot>,
    window: Buf,
}

impl BlockGather {
    /// PE (c, r)'s part of run `k`'s gather into `window`; `tiles` are sent if the row is
    /// gathered in this run.
    pub(super) fn new(
        g: &Geometry,
        (c, r): (usize, usize),
        k: usize,
        block_rows: usize,
        tiles: KvTiles,
        window: Buf,
    ) -> Self {
        let own = (g.run_of(r, block_rows) == k).then(|| {
            let at = g.run_slot(c, r, k, block_rows, r);
            let half = g.slot_len(c, r) / 2;
            OwnSlot {
                k: tiles.k,
                v: tiles.v,
                k_at: window.slice(at, half),
                v_at: window.slice(at + half, half),
                slot: window.slice(at, 2 * half),
            }
        });
        BlockGather {
            k,
            block_rows,
            own,
            window,
        }
    }

    /// The task that copies the PE's own K and V into the block window (in its own run) and
    /// starts the run's gather; the join activates the compute task when it is done.
    pub(super) fn place(
        self,
        p: &mut Program,
        pe: Coord,
        g: &Geometry,
        (c, r): (usize, usize),
        join: Join,
    ) -> Result<TaskId, BuildError> {
        let BlockGather {
            k,
            block_rows,
            own,
            window,
        } = self;
        let parts: Vec<Part> = g
            .run_window(r, k, block_rows)
            .into_iter()
            .filter(|&b| b != r)
            .map(|b| Part {
                owner: b,
                reach: g.reach(b),
                data: window.slice(g.run_slot(c, r, k, block_rows, b), g.slot_len(c, b)),
            })
            .collect();
        // A row not gathered in this run sends nothing: its reach is itself.
        let (reach, sent) = match own {
            Some(own) => (g.reach(r), own.slot),
            None => (r..r + 1, window.slice(0, 0)),
        };
        p.local_task(pe, "gather_kv_block", move |ctx| {
            if let Some(own) = own {
                ctx.mov(own.k_at, own.k.all());
                ctx.mov(own.v_at, own.v.all());
            }
            let ops = GATHER.all_gather(r, &parts, sent, reach.clone());
            join::issue(ctx, &ops, &join);
        })
    }
}

/// What to change when a run's buffers do not fit: fewer rows per key block, or where a block
/// is already one row, a smaller problem per PE.
pub(super) fn fewer_rows_hint(block_rows: usize) -> String {
    if block_rows > 1 {
        format!("use fewer than {block_rows} region rows per key block")
    } else {
        "even key blocks of one region row do not fit: use more region rows or columns (fewer \
         tokens or features per PE) or shorter sequences"
            .into()
    }
}

/// The plan, if the fullest PE fits its SRAM in every run.
fn plan(
    config: &FabricConfig,
    g: &Geometry,
    block_rows: usize,
) -> Result<BlockedPlan, KernelError> {
    let columns: Vec<ColumnFacts> = (0..g.cols).map(|c| ColumnFacts::of(g, c)).collect();
    // (elements, column, row, run), the first in (row, run, column) order among equals.
    let mut worst = (0, 0, 0, 0);
    for r in 0..g.rows {
        for (k, sizes) in g.runs_sizes(r, block_rows).into_iter().enumerate() {
            if sizes.window == 0 {
                continue;
            }
            let row = RowSizes::of(g, r, sizes);
            for (c, &col) in columns.iter().enumerate() {
                let elements = memory::forward(col, row).total;
                if elements > worst.0 {
                    worst = (elements, c, r, k);
                }
            }
        }
    }
    let (elements, c, r, k) = worst;
    let (needed, available) = (4 * elements, u64::from(config.sram_bytes));
    if needed > available {
        let sizes = g.run_sizes(r, k, block_rows);
        return Err(KernelError::DoesNotFit {
            kernel: BLOCKED_KERNEL,
            needed,
            available,
            what: format!(
                "PE column {c}, row {r}, run {k}: a key block of {} tokens, {} scores per head",
                sizes.window, sizes.head_scores
            ),
            hint: fewer_rows_hint(block_rows),
        });
    }
    Ok(BlockedPlan {
        block_rows,
        runs: g.runs(block_rows),
        sram_bytes: needed,
    })
}
