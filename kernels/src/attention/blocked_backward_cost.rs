//! The analytic cycle formula of the blocked backward ([`super::BlockedAttentionBackward`]): its
//! prelude, then its runs one after the other, each ending when its last row's dK/dV
//! reduce-scatter does: the forward's gather of the run's K and V (`blocked_cost.rs`), the
//! row's compute on the unblocked kernel's per-row timeline (`cost::timeline`) with the
//! instructions of `online_backward.rs` summed in closed form, then the reduce-scatter, issued
//! at the end of the row's last task.
//!
//! - The prelude: one task per PE (a `mul` and an `add` of `n` tokens per local feature, a
//!   reciprocal per local head and token) with the group sums of the `n` values of `D` per head
//!   over several columns between its shared and its whole heads, on the same timeline; the
//!   slowest row.
//! - Per run `k` and row `r`, in the widest column: the gather's end, as the forward's; then per
//!   local head of `d` features and segment of `L` tokens meeting `J` of the run's keys, the
//!   scores and dP `2 d J (issue + issue + ceil(L / fmac_f32))`, the probabilities and dS (the
//!   scale of the `J L` block, the masks, the subtraction of the maximum, the `exp`, the
//!   multiply by the reciprocal sum, the subtraction of `D`, the multiply by the probabilities
//!   and the scale: `O(J)` vectors of `L`), dQ (`d J` loads and AXPYs) and the partial dK, dV
//!   (`2 d J` dots of `L` and stores). A head over several columns sums its `2 m = 2 sum J L`
//!   scores and dP along the row between the PE's two tasks. The last task ends with the
//!   reduce-scatter's issue: the copy of the row's own partial dK, dV (in its own run) and an
//!   issue per operation.
//! - The reduce-scatter moves the gather's wavelets the other way round over the same reaches,
//!   on the gather's chain-sharing model (`blocked_cost::chains_ramp`): each row sends every
//!   owner's partial sums one row towards it, adding (and first receiving) those that come from
//!   rows beyond it, starting when its compute ends; northwards the sums whose reach ends with
//!   the row go first, southwards last, in the kernel's order. Unlike the gather's, the chains
//!   flow into the owners' rows, where both share each core's ramp, and a row passes sums on
//!   only as fast as the next row takes them: the northward chain's sends end no earlier than
//!   the northern row's, plus the sums that row takes in last (its own). Then one hop per row
//!   to its farthest owner. Without that stall, one sequence of 32 tokens over 16 rows with 64
//!   features on one column came out 0.958 of the exact cycles at 6 rows per block (0.980 with
//!   it).
//!
//! What it is not: a simulation. Like the forward's formula it ignores the join tasks, the ramp
//! from the router beyond the wavelets a core takes in, the skew between the columns of a row
//! (the widest column's gather and reduce-scatter stand for all, and a row's reduce-scatter
//! starts when its slowest PE's compute ends), and the hop latency between rows that start
//! their reduce-scatter at different times; nothing for a run that gathers no row. The
//! southward chain's stall is not modelled, nor how the two chains' stalls feed each other in
//! the owners' rows: on the shape above, blocks of 2 to 4 rows stay 0.972 to 0.976 of the exact
//! cycles (the rows north of a run's owners end about 900 cycles later than counted, its last
//! owner about 500). It does not check that the buffers fit the SRAM. Measured ratios are in
//! `blocked_backward.rs`'s module doc.
//!
//! Key design decision: the forward formula's pieces are reused as they are (its gather, its
//! merged columns and key counts per run, its chain model with a start per row and the
//! reduce-scatter's order), so the two formulas cannot drift apart; only the compute terms and
//! the reduce-scatter's moves are the backward's own.

use std::ops::Range;

use wafersim_sim::FabricConfig;

use super::blocked_cost::{
    ColumnHeads, HeadCosts, KV_TILES, RowKeys, RowMoves, chains_ramp, merged_columns, run_gathers,
};
use super::cost::{PeCompute, collective_cycles, product, reciprocals, scalar, timeline, vector};
use super::geometry::Geometry;

/// The whole blocked backward: the prelude and every run's end, added up (`block_rows >= 1`).
pub(super) fn total(c: &FabricConfig, g: &Geometry, block_rows: usize) -> u64 {
    let runs_of: Vec<usize> = (0..g.rows).map(|b| g.run_of(b, block_rows)).collect();
    let windows: Vec<Range<usize>> = (0..g.rows).map(|r| g.window(r)).collect();
    let gathers = run_gathers(c, g, &runs_of, &windows);
    let computes = compute_ends(c, g, &runs_of, &windows, &gathers);
    let mut reduces = reduce_moves(g, &runs_of, &windows);
    let runs: u64 = reduces
        .iter_mut()
        .zip(&computes)
        .map(|(rows, ends)| run_end(c, rows, ends))
        .sum();
    prelude(c, g) + runs
}

/// The prelude: the slowest row's timeline of its PEs' single tasks and its heads' group sums
/// of `n` values of `D`.
fn prelude(c: &FabricConfig, g: &Geometry) -> u64 {
    let (columns, groups) = merged_columns(g);
    let mut pes = Vec::with_capacity(columns.len());
    let mut slowest = 0;
    let mut done_n = Vec::new();
    for r in 0..g.rows {
        let n = g.n(r);
        // Rows of the same length cost the same.
        if done_n.contains(&n) {
            continue;
        }
        done_n.push(n);
        pes.clear();
        pes.extend(columns.iter().map(|col| prelude_pe(c, *col, n)));
        slowest = slowest.max(timeline(c, &pes, &groups, n as u64));
    }
    slowest
}

/// One PE's prelude over `n` tokens, as `blocked_backward.rs` places it: the task switch, the
/// shared heads' partial `D` (a `mul` and an `add` per feature) and the issue of their sums,
/// the whole heads' `D`, every local head's reciprocals; then, with shared heads, the empty
/// task that ends the sums.
fn prelude_pe(c: &FabricConfig, col: ColumnHeads, n: usize) -> PeCompute {
    let switch = u64::from(c.task_switch_cycles);
    let per_feature = 2 * vector(c, n, c.simd.arith_f32);
    let whole = col.whole_dims * per_feature + (col.shared + col.whole) * reciprocals(c, n);
    let shared = col.shared > 0;
    PeCompute {
        to_sums: switch
            + col.shared_dims * per_feature
            + 2 * col.shared * u64::from(c.issue_cycles),
        whole,
        shared_rest: if shared { switch } else { 0 },
        shared,
    }
}

/// `[run][row]`: when each row's compute ends in each run (its gather's end if the run brings
/// it no key).
fn compute_ends(
    c: &FabricConfig,
    g: &Geometry,
    runs_of: &[usize],
    windows: &[Range<usize>],
    gathers: &[Vec<u64>],
) -> Vec<Vec<u64>> {
    let (columns, groups) = merged_columns(g);
    let mut ends = gathers.to_vec();
    let mut pes = Vec::with_capacity(columns.len());
    for (r, window) in windows.iter().enumerate() {
        let keys = RowKeys::of(c, g, r, window, runs_of);
        let issues = reduce_issues(g, r, window, runs_of, keys.runs);
        for (k, run_ends) in ends.iter_mut().enumerate().take(keys.runs) {
            let Some(run) = BackwardRun::of(c, &keys, k) else {
                continue;
            };
            let reduce = ReduceIssue {
                own_tokens: if runs_of[r] == k { g.n(r) } else { 0 },
                ops: issues[k],
            };
            pes.clear();
            pes.extend(columns.iter().map(|col| run_pe(c, *col, &run, reduce)));
            run_ends[r] += timeline(c, &pes, &groups, 2 * run.head_scores);
        }
    }
    ends
}

/// Row `r`'s reduce-scatter operations in each of its `runs` runs: one per owner of the run
/// other than the row (a send, or a receive-add-send), and one receive per side its own reach
/// goes past it in its own run.
fn reduce_issues(
    g: &Geometry,
    r: usize,
    window: &Range<usize>,
    runs_of: &[usize],
    runs: usize,
) -> Vec<u64> {
    let mut ops = vec![0; runs];
    for b in window.clone() {
        let Some(run) = ops.get_mut(runs_of[b]) else {
            continue;
        };
        *run += if b == r {
            let reach = g.reach(r);
            u64::from(reach.contains(&(r + 1))) + u64::from(reach.start < r)
        } else {
            1
        };
    }
    ops
}

/// What the reduce-scatter's issue adds to a PE's last task: the copy of the row's own partial
/// dK, dV (`own_tokens` tokens, 0 outside its own run) and an issue per operation.
#[derive(Clone, Copy, Debug)]
struct ReduceIssue {
    own_tokens: usize,
    ops: u64,
}

impl ReduceIssue {
    fn cycles(self, c: &FabricConfig, features: u64) -> u64 {
        let copy = if self.own_tokens > 0 {
            vector(c, 2 * features as usize * self.own_tokens, c.simd.mov_f32)
        } else {
            0
        };
        copy + self.ops * u64::from(c.issue_cycles)
    }
}

/// One row's compute in one run, per local head apart from its width.
#[derive(Clone, Copy, Debug, Default)]
struct BackwardRun {
    /// Per feature of a head on the PE: the scores and dP (a load and an AXPY each per key and
    /// segment), before any sum.
    products: u64,
    /// Per feature, after the sums: dQ (a load and an AXPY per key), the partial dK and dV (a
    /// dot and a store each per key).
    gradients: u64,
    /// Per head: the probabilities and dS of every segment, masks included.
    elementwise: u64,
    /// Elements of one head's scores (as many of its dP): a shared head sums twice as many.
    head_scores: u64,
}

impl BackwardRun {
    /// Run `k`'s terms for a row, if it brings the row any key.
    fn of(c: &FabricConfig, keys: &RowKeys, k: usize) -> Option<Self> {
        let mut run = BackwardRun::default();
        for (len, count, mask) in keys.run_segments(k) {
            let product = product(c, count, 1, len);
            let dot_store = count as u64 * (vector(c, len, c.simd.fmac_f32) + scalar(c));
            run.products += 2 * product;
            run.gradients += product + 2 * dot_store;
            run.elementwise += probabilities_and_ds(c, count, len) + mask;
            run.head_scores += (count * len) as u64;
        }
        (run.head_scores > 0).then_some(run)
    }
}

/// `online_backward.rs`'s `gradients` of one head and segment of `len` tokens meeting `keys`
/// keys, but the masks and the products: the scale of the scores block, the subtraction of the
/// maximum from each key's row, the block's `exp`, the multiply of each row by the reciprocal
/// sums; the subtraction of `D` from each row of dP, the block's multiply by the
/// probabilities and its scale.
fn probabilities_and_ds(c: &FabricConfig, keys: usize, len: usize) -> u64 {
    let arith = c.simd.arith_f32;
    let block = vector(c, keys * len, arith);
    let rows = keys as u64 * vector(c, len, arith);
    block + rows + c.transcendental_cycles((keys * len) as u64) + rows + rows + 2 * block
}

/// A PE's tasks in one run, in the order `online_backward.rs` and the kernel run them: the
/// task switch, the shared heads' scores and dP and the issue of their sums (a send and a
/// receive each), the whole heads; then, with shared heads, a second task with their
/// gradients. The reduce-scatter's issue ends the last task.
fn run_pe(c: &FabricConfig, col: ColumnHeads, run: &BackwardRun, reduce: ReduceIssue) -> PeCompute {
    let costs = HeadCosts {
        before_sums: run.products,
        after_sums: run.gradients,
        per_head: run.elementwise,
        tail: reduce.cycles(c, col.shared_dims + col.whole_dims),
    };
    col.tasks(c, costs)
}

/// `[run][row]`: what each row's core moves in each run's reduce-scatter, in the widest column:
/// per owner `b` of the run in its window, its partial sums sent one row towards `b`, first
/// received from the row beyond (passed on) if `b`'s reach goes on past it, else started
/// there; its own run's sums received from each side its reach goes.
fn reduce_moves(g: &Geometry, runs_of: &[usize], windows: &[Range<usize>]) -> Vec<Vec<RowMoves>> {
    let runs = runs_of.iter().max().map_or(0, |k| k + 1);
    let mut moves = vec![vec![RowMoves::default(); g.rows]; runs];
    for (r, window) in windows.iter().enumerate() {
        for b in window.clone() {
            let slot = KV_TILES * (g.fc(0) * g.n(b)) as u64;
            let reach = &windows[b];
            let (beyond_south, beyond_north) = (reach.contains(&(r + 1)), r > 0 && reach.start < r);
            let row = &mut moves[runs_of[b]][r];
            row.farthest = row.farthest.max(b.abs_diff(r));
            if b == r {
                row.inp += slot * (u64::from(beyond_south) + u64::from(beyond_north));
                row.north_last_in = slot * u64::from(beyond_south);
                row.from_south |= beyond_south;
                row.from_north |= beyond_north;
            } else if b < r && beyond_south {
                row.inp += slot;
                row.north_on += slot;
                row.from_south = true;
            } else if b < r {
                row.north_own += slot;
            } else if beyond_north {
                row.inp += slot;
                row.south_on += slot;
                row.from_north = true;
            } else {
                row.south_own += slot;
            }
        }
    }
    moves
}

/// One run's end: the latest over its rows of the reduce-scatter's end (`rows`, the rows'
/// moves, each starting when its compute ends, `computes`) and one hop per row to the row's
/// farthest owner.
fn run_end(c: &FabricConfig, rows: &mut [RowMoves], computes: &[u64]) -> u64 {
    for (row, &start) in rows.iter_mut().zip(computes) {
        row.start = start;
    }
    let ends = chains_ramp(rows, true);
    rows.iter()
        .zip(ends)
        .map(|(row, end)| collective_cycles(c, end, row.farthest + 1))
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{AttentionShape, BlockedAttentionBackward};
    use crate::layout::Region;

    // Prices on `rectangle` fabrics (the `wse2` ones): a vector instruction of `len` elements
    // costs `1 + ceil(len / width)` (fp32 move and add 2 per cycle, max and FMAC 1), a scalar
    // load or store 1, a reciprocal 4, a task switch 3, `exp` `1 + 4 len`.

    /// One sequence of 4 tokens, one head of 4 features, on one PE: the prelude and one run.
    ///
    /// Prelude: the task switch 3, per feature a `mul` and an `add` of 4 (`vector(4, 2) = 3`
    /// each): 24, the reciprocals `4 x (1 + 4 + 1) = 24`: 51. The run's gather: a task switch
    /// and the copies of K and V (`vector(16, 2) = 9` each): 21, nothing to send. Its compute:
    /// the task switch 3; per feature the scores and dP, `2 x 4 keys x (1 + vector(4, 1) = 5)`
    /// = 48, dQ 24 and the dots and stores of dK and dV `2 x 4 x (5 + 1) = 48`: 120 per
    /// feature, 480 for the 4; per head the scale `vector(16, 2) = 9`, the masks (keys 1-3 over
    /// 1, 2, 3 tokens) `2 + 2 + 3 = 7`, the subtraction of the maximum `4 x 3 = 12`, the `exp`
    /// `1 + 64 = 65`, the multiply by the reciprocals 12, the subtraction of `D` 12, the
    /// multiply by the probabilities and the scale `2 x 9`: 135; the copy of its own partial dK,
    /// dV `vector(32, 2) = 17` and no collective operation. `51 + 21 + 3 + 480 + 135 + 17 =
    /// 707`, the exact engine's count too.
    #[test]
    fn one_pe_by_hand() {
        let backward = BlockedAttentionBackward {
            region: Region::at_origin(1, 1),
            shape: AttentionShape {
                batch: 1,
                seq_len: 4,
                heads: 1,
                features: 4,
                scale: 0.5,
            },
            block_rows: 1,
            q: &[],
            k: &[],
            v: &[],
            out: &[],
            d_out: &[],
            max: &[],
            sum: &[],
        };
        let config = FabricConfig::rectangle(1, 1).unwrap();
        assert_eq!(backward.estimate_cycles(&config).unwrap(), 707);
    }

    /// One sequence of 6 tokens over 3 rows of 2, 25 features on one column: a slot of
    /// `2 x 25 x 2 = 100` wavelets, every row in one run, every reach all 3 rows.
    ///
    /// The moves: row 0 starts the sums of owners 1 and 2 south (200) and takes its own in from
    /// the south (100); row 1 passes owner 0's north and owner 2's south (100 each) and takes in
    /// those and its own from both sides (400); row 2 starts owners 0 and 1's north (200) and
    /// takes its own in from the north (100).
    ///
    /// All starting at 0: row 0's southward sends end at 200; row 1's two chains share its ramp
    /// (100 each, 200) and wait for row 0's (200); row 2's northward sends end at 200, but row 1
    /// passes owner 0's sums only as it gets them and takes its own last, so row 2 sends owner 1's
    /// after row 1's northward end (200): 300. Row 0 has everything at 200 (row 1's northward
    /// end), row 1 at 400 (its 400 wavelets in, one a cycle), row 2 at 300 (its own sends).
    #[test]
    fn the_reduce_scatter_moves_the_gathers_wavelets_the_other_way() {
        let g = Geometry::new(Region::at_origin(1, 3), 6, 6, 1, 25);
        let runs_of = vec![0; 3];
        let windows: Vec<Range<usize>> = (0..3).map(|r| g.window(r)).collect();
        let mut moves = reduce_moves(&g, &runs_of, &windows);
        let rows = &moves[0];
        let summary: Vec<(u64, u64, u64, u64, u64)> = rows
            .iter()
            .map(|m| (m.south_on, m.south_own, m.north_on, m.north_own, m.inp))
            .collect();
        assert_eq!(
            summary,
            vec![
                (0, 200, 0, 0, 100),
                (100, 0, 100, 0, 400),
                (0, 0, 0, 200, 100)
            ]
        );
        assert_eq!(chains_ramp(rows, true), vec![200, 400, 300]);
        // Started at 1,000 each, with two hops (6 cycles each on `rectangle`) to the farthest
        // owner of rows 0 and 2: the run ends with row 1 at 1,400 + 6 = 1,406 or row 2 at
        // 1,300 + 12 = 1,312.
        let c = FabricConfig::rectangle(1, 3).unwrap();
        assert_eq!(run_end(&c, &mut moves[0], &[1000; 3]), 1406);
    }
}
