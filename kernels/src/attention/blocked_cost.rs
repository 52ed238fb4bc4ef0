//! The analytic cycle formula of the blocked forward ([`super::BlockedAttention`]): its runs one
//! after the other, each ending when its last row does: the row's part of the unblocked gather
//! restricted to the run's owner rows, then its compute on the unblocked kernel's per-row
//! timeline (`cost::timeline`), with the instructions of `online.rs` (scores, online update,
//! context, normalisation) summed in closed form.
//!
//! Per run `k` and row `r`, in the widest column:
//!
//! 1. the gather, as the unblocked one but over the slots of the run's owners only (rows `b`
//!    with `run_of(b) = k`; their reaches are the unblocked gather's): the task switch and the
//!    copy of the PE's own K and V, then the row's part of the ramps of the column's two chains,
//!    then one store-and-forward hop per row to its farthest owner. The ramps: each core sends
//!    south the slots it passes on (once the core north of it has sent them: the chain is a
//!    pipeline) and then its own, and north likewise; while both directions have wavelets to
//!    send they take every other cycle of its ramp (the engine serves a core's operations round
//!    robin). Row `r`'s part ends with the later of its own sends and the sends of the
//!    neighbours it receives from, solved over the rows (`chains_ramp`), and no earlier than the
//!    wavelets it takes in. Where a run's owners are a whole sequence's `R` rows (the unblocked
//!    gather) the last send ends after about `1.5 R` slots, against the `R + 1` of the busiest
//!    core's wavelets alone, which is what the unblocked formula counts;
//! 2. the compute of row `r` if the run brings it keys: per local head of `d` features and segment
//!    of `L` tokens meeting `J` of the run's keys, the scores `d J (issue + issue + ceil(L /
//!    fmac_f32))`, the online update (the scale of the `J L` block, the mask `fill` of each of
//!    those keys after the segment's first token, the new maximum, the rescale factor and its
//!    `exp`, the subtraction and `exp` of the block, the run's sum, the running sum's multiply
//!    and add: `O(J)` vectors of `L`) and the context (`d` multiplies of the output row by the
//!    rescale factor, then a load and an AXPY per key and feature). A head over several columns
//!    sums its `m = sum J L` partial scores along the row between its two tasks, as in the
//!    unblocked forward. In a row's last run, its last task adds the normalisation: a load, a
//!    reciprocal and a store per token and local head, a multiply of the `n` tokens per feature.
//!
//! What it is not: a simulation. Like the unblocked formula it ignores the join tasks, the
//! ramp from the router beyond the wavelets a core takes in, and the skew between the columns of
//! a row (the widest column's gather stands for all of them). It counts the copy of a PE's own
//! K and V in every run (only a run's owners copy), and nothing for a run that gathers no row.
//! It does not check that the buffers fit the SRAM. Unlike the unblocked formula, each row
//! starts its compute when its own gather ends, not the slowest: with every row waiting for the
//! slowest, the tested shapes came out up to 4 % over.
//!
//! The backward's formula (`blocked_backward_cost.rs`) reuses the gather, the merged columns,
//! the keys per run and the chain model, which also solves its reduce-scatter: the same chains
//! with a start per row, the northward chain's own sums first, and the northward chain's
//! stall behind the rows that own the sums (`back_pressure_north`), which the gather, flowing
//! out of its owners, does not have.
//!
//! Key design decision: every fact is computed once per row (one pass over its window's tokens,
//! sorted into runs) or once per column. A PE's cost in a run is linear in its heads' features,
//! so a (row, run) is summed up in four terms (per feature before and after the sums, per head,
//! the sums' length), and neighbouring columns holding the same widths of the same heads are
//! one entry of the row's timeline: no loop per (PE, run, key), nor per (column, run). On the
//! full wse2 rectangle (750 x 994 PEs, 3 sequences of 2048 tokens, 16 heads of 128, blocks of 16
//! rows: 22 runs, 25 timeline entries per row) the estimate takes about 20 ms (190 ms with one
//! timeline entry per column, for the same cycles).

use std::ops::Range;

use wafersim_sim::FabricConfig;

use super::cost::{
    Group, PeCompute, collective_cycles, gather_start, mask_key, owner_sends, product, reciprocals,
    timeline, vector,
};
use super::geometry::{Geometry, LocalHead, Segment};

/// K and V: the tiles a run gathers per row.
pub(super) const KV_TILES: u64 = 2;

/// The whole blocked forward: every run's end (its last row's gather and compute), added up
/// (`block_rows >= 1`).
pub(super) fn total(c: &FabricConfig, g: &Geometry, block_rows: usize) -> u64 {
    let runs_of: Vec<usize> = (0..g.rows).map(|b| g.run_of(b, block_rows)).collect();
    let windows: Vec<Range<usize>> = (0..g.rows).map(|r| g.window(r)).collect();
    let gathers = run_gathers(c, g, &runs_of, &windows);
    run_ends(c, g, &runs_of, &windows, &gathers).iter().sum()
}

/// `[run][row]`: when each row's gather ends in each run: the unblocked gather's start, the
/// row's part of the ramps of the run's column chains ([`chains_ramp`]) and a hop per row to its
/// farthest owner (none for a row the run gives nothing).
pub(super) fn run_gathers(
    c: &FabricConfig,
    g: &Geometry,
    runs_of: &[usize],
    windows: &[Range<usize>],
) -> Vec<Vec<u64>> {
    let runs = runs_of.iter().max().map_or(0, |k| k + 1);
    // `[run][row]`: what each core moves in each run.
    let mut moves = vec![vec![RowMoves::default(); g.rows]; runs];
    for (r, window) in windows.iter().enumerate() {
        for b in window.clone() {
            let slot = KV_TILES * (g.fc(0) * g.n(b)) as u64;
            let sends = owner_sends(slot, r, b, &windows[b]);
            moves[runs_of[b]][r].gather(r, b, slot, sends);
        }
    }
    let start = gather_start(c, g, KV_TILES);
    moves
        .iter()
        .map(|rows| {
            let ends = chains_ramp(rows, false);
            rows.iter()
                .zip(ends)
                .map(|(row, end)| start + collective_cycles(c, end, row.farthest + 1))
                .collect()
        })
        .collect()
}

/// What one row's core moves in one run's collective over a column (the gather, or the
/// backward's reduce-scatter): when it issues its operations, whether it takes in wavelets from
/// the north and from the south, how many rows away its farthest owner is, and in wavelets what
/// it takes in, what it passes on southwards and northwards (what it must first receive from
/// upstream), and what it starts itself each way (its own slot in the gather; in the
/// reduce-scatter its partial sums of the owners whose reach starts or ends with it).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct RowMoves {
    pub start: u64,
    pub from_north: bool,
    pub from_south: bool,
    pub farthest: usize,
    pub inp: u64,
    pub south_on: u64,
    pub south_own: u64,
    pub north_on: u64,
    pub north_own: u64,
    /// Wavelets taken in from the south after everything the row passes north (in the
    /// reduce-scatter, its own sums from the rows south of it; 0 in the gather).
    pub north_last_in: u64,
}

impl RowMoves {
    /// Row `r`'s part in gathering owner `b`'s slot of `slot` wavelets, of which it sends
    /// `(south, north)`: its own sends, or one more slot taken in and passed on.
    fn gather(&mut self, r: usize, b: usize, slot: u64, (south, north): (u64, u64)) {
        if b == r {
            self.south_own += south;
            self.north_own += north;
        } else {
            self.inp += slot;
            self.south_on += south;
            self.north_on += north;
            self.from_north |= b < r;
            self.from_south |= b > r;
            self.farthest = self.farthest.max(b.abs_diff(r));
        }
    }
}

/// Cycles for a core to push `work` wavelets through its ramp from cycle `start`, the other
/// direction's chain taking every other cycle until cycle `other` (the two chains' operations
/// share the ramp round robin), all of them after.
fn shared_ramp(start: u64, work: u64, other: u64) -> u64 {
    let shared = other.saturating_sub(start);
    if 2 * work <= shared {
        start + 2 * work
    } else {
        start + work + shared / 2
    }
}

/// The ramps of one column's two chains (`rows`: what each row's core moves): for each row, when
/// it has sent and received its last wavelet, hops aside. Each row sends south what it passes
/// on, once the row north of it has sent it (the chain is a pipeline), then its own slot; and
/// the same northwards. While both directions have wavelets to send, each gets every other cycle
/// of the core's ramp. So a row's southward sends end at the later of (its southward wavelets at
/// the shared rate while its northward chain lasts) and (the northern row's southward end, then
/// its own slot), and symmetrically; solved by sweeping the rows south then north until nothing
/// moves (every end only grows with the others). A row has received everything when the
/// neighbours it receives from have sent their last, and no earlier than one cycle per wavelet
/// it takes in (its ramp from the router carries one per cycle). With the chains of a whole
/// sequence's rows the last send ends after about 1.5 slots per row, where the busiest core's
/// wavelets alone (`max(in, out)`) are one.
///
/// Each row starts at its `start` (0 in the gather; its compute's end in the reduce-scatter).
/// `north_own_first`: the northward chain sends what the row starts itself before what it
/// passes on (the reduce-scatter, whose northward operations go by owner from the north: the
/// owners whose reach ends at the row first); otherwise after, as the gather's own slot.
pub(super) fn chains_ramp(rows: &[RowMoves], north_own_first: bool) -> Vec<u64> {
    let n = rows.len();
    let (mut south, mut north) = (vec![0u64; n], vec![0u64; n]);
    // Every end only grows, and is bounded. The ends of a row whose two directions share its
    // ramp to the last wavelet approach theirs geometrically (each sweep quarters the gap), so
    // the loop stops when nothing moves, within `n + 64` sweeps (the tested shapes and the
    // wse2 one take at most 7).
    for _ in 0..n + 64 {
        let mut moved = false;
        for r in 0..n {
            let previous = r.checked_sub(1).map_or(0, |p| south[p]);
            let end = direction_end(rows[r].south(), rows[r].north(), previous, north[r])
                .after(rows[r].start, false);
            moved |= end != south[r];
            south[r] = end;
        }
        for r in (0..n).rev() {
            // What the row passes on comes before what it takes in last.
            let previous = north
                .get(r + 1)
                .map_or(0, |end| end.saturating_sub(rows[r].north_last_in));
            let end = direction_end(rows[r].north(), rows[r].south(), previous, south[r])
                .after(rows[r].start, north_own_first);
            moved |= end != north[r];
            north[r] = end;
        }
        if !moved {
            break;
        }
    }
    if north_own_first {
        back_pressure_north(rows, &south, &mut north);
    }
    (0..n)
        .map(|r| {
            let from_north = r.checked_sub(1).filter(|_| rows[r].from_north);
            let from_south = Some(r + 1).filter(|_| rows[r].from_south);
            let arrived = from_north
                .map_or(0, |p| south[p])
                .max(from_south.and_then(|p| north.get(p).copied()).unwrap_or(0));
            south[r]
                .max(north[r])
                .max(arrived)
                .max(rows[r].start + rows[r].inp)
        })
        .collect()
}

/// The reduce-scatter's northward chain flows into the rows that own its sums, where it meets
/// the southward one: a row passing sums north sends them only as fast as the row north of it
/// takes them in, and that row takes its own sums last (after what it passes on), so a row's
/// northward sends end no earlier than the northern row's, then its own sums at the shared rate
/// of the row's ramp. One sweep northwards after the two chains' ends are solved: the stall
/// comes from the owners' rows, where both chains share the ramps, back through the rows that
/// only pass the sums on.
fn back_pressure_north(rows: &[RowMoves], south: &[u64], north: &mut [u64]) {
    for r in 1..rows.len() {
        let downstream = &rows[r - 1];
        if downstream.north_on == 0 || north[r] == 0 {
            continue;
        }
        let other = if rows[r].south_on + rows[r].south_own > 0 {
            south[r]
        } else {
            0
        };
        north[r] = north[r].max(shared_ramp(north[r - 1], downstream.north_last_in, other));
    }
}

impl RowMoves {
    /// `(passed on, own)` southwards.
    fn south(&self) -> (u64, u64) {
        (self.south_on, self.south_own)
    }

    /// `(passed on, own)` northwards.
    fn north(&self) -> (u64, u64) {
        (self.north_on, self.north_own)
    }
}

/// One direction of one row's sends, before its start time is known: `(on, own)` its wavelets
/// passed on and its own, `other` when the row's sends the other way end (0 if it has none),
/// `upstream` when the upstream row's sends in this direction end (0 if nothing is passed on).
struct Direction {
    on: u64,
    own: u64,
    other: u64,
    upstream: u64,
}

/// When a row's sends in one direction end: `(on, own)` its wavelets passed on and its own,
/// `(other_on, other_own)` the other direction's, `previous` when the upstream row's sends in
/// this direction end, `other_end` when this row's sends the other way end.
fn direction_end(
    (on, own): (u64, u64),
    (other_on, other_own): (u64, u64),
    previous: u64,
    other_end: u64,
) -> Direction {
    Direction {
        on,
        own,
        other: if other_on + other_own > 0 {
            other_end
        } else {
            0
        },
        upstream: if on > 0 { previous } else { 0 },
    }
}

impl Direction {
    /// The end for a row starting at `start`: every wavelet at the shared rate from the start,
    /// and no earlier than the upstream row's end (what is passed on is received first); its
    /// own sends wait for that too unless they go first (`own_first`). 0 if it sends nothing.
    fn after(&self, start: u64, own_first: bool) -> u64 {
        if self.on + self.own == 0 {
            return 0;
        }
        let all = shared_ramp(start, self.on + self.own, self.other).max(self.upstream);
        if own_first {
            all
        } else {
            all.max(shared_ramp(start.max(self.upstream), self.own, self.other))
        }
    }
}

/// Each run's end: the latest over the rows of its gather's end (`gathers`, `[run][row]`) and,
/// if the run brings it keys, its PEs' tasks after it, on the unblocked forward's timeline.
fn run_ends(
    c: &FabricConfig,
    g: &Geometry,
    runs_of: &[usize],
    windows: &[Range<usize>],
    gathers: &[Vec<u64>],
) -> Vec<u64> {
    let (columns, groups) = merged_columns(g);
    let mut slowest: Vec<u64> = gathers
        .iter()
        .map(|rows| rows.iter().copied().max().unwrap_or(0))
        .collect();
    let mut pes = Vec::with_capacity(g.cols);
    for (r, window) in windows.iter().enumerate() {
        let keys = RowKeys::of(c, g, r, window, runs_of);
        let normalise = Normalise::of(c, g.n(r));
        for (k, most) in slowest.iter_mut().enumerate().take(keys.runs) {
            let Some(run) = keys.run_row(c, k) else {
                continue;
            };
            let last = (k + 1 == keys.runs).then_some(normalise);
            pes.clear();
            pes.extend(columns.iter().map(|col| col.compute(c, &run, last)));
            let gathered = gathers[k][r];
            *most = (*most).max(gathered + timeline(c, &pes, &groups, run.head_scores));
        }
    }
    slowest
}

/// The row's columns, neighbours holding the same features of the same heads merged into one
/// entry (a run costs them the same, and the timeline's maxima do not see repeats), and the
/// groups of the heads over several columns, over those entries.
pub(super) fn merged_columns(g: &Geometry) -> (Vec<ColumnHeads>, Vec<Group>) {
    let (mut entries, mut entry_of) = (Vec::new(), Vec::with_capacity(g.cols));
    let mut previous: Option<Vec<LocalHead>> = None;
    for col in 0..g.cols {
        let mut heads = g.local_heads(col);
        // Where a head's features start on the column does not change its cost.
        heads.iter_mut().for_each(|h| h.first = 0);
        if previous.as_ref() != Some(&heads) {
            entries.push(ColumnHeads::of(&heads));
            previous = Some(heads);
        }
        entry_of.push(entries.len() - 1);
    }
    let groups = (0..g.heads)
        .map(|h| g.head_columns(h))
        .filter(|columns| columns.len() > 1)
        .map(|columns| Group {
            pes: entry_of[columns.start]..entry_of[columns.end - 1] + 1,
            columns: columns.len(),
        })
        .collect();
    (entries, groups)
}

/// What a PE's heads cost in one run: per feature before the group sums (the products a shared
/// head sums), per feature after them, per head after them (the element-wise work), and what
/// ends the last task.
#[derive(Clone, Copy, Debug)]
pub(super) struct HeadCosts {
    pub before_sums: u64,
    pub after_sums: u64,
    pub per_head: u64,
    pub tail: u64,
}

/// The heads with features on one column, by whether other columns share them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct ColumnHeads {
    pub shared: u64,
    pub shared_dims: u64,
    pub whole: u64,
    pub whole_dims: u64,
}

impl ColumnHeads {
    fn of(local: &[LocalHead]) -> Self {
        let mut heads = ColumnHeads::default();
        for h in local {
            let dims = u64::from(h.dims);
            if h.shared() {
                heads.shared += 1;
                heads.shared_dims += dims;
            } else {
                heads.whole += 1;
                heads.whole_dims += dims;
            }
        }
        heads
    }

    /// The PE's tasks in one run (`last`: the normalisation, in the PE's last run), in the
    /// order `online.rs` and the kernel run them: the task switch, the shared heads' partial
    /// scores and the issue of their sums (a send and a receive each), the whole heads; then,
    /// if it has shared heads, a second task with their update and context. The normalisation
    /// ends the last task.
    fn compute(self, c: &FabricConfig, run: &RunRow, last: Option<Normalise>) -> PeCompute {
        let normalise = last.map_or(0, |n| {
            n.per_head * (self.shared + self.whole)
                + n.per_feature * (self.shared_dims + self.whole_dims)
        });
        let costs = HeadCosts {
            before_sums: run.scores,
            after_sums: run.context,
            per_head: run.update,
            tail: normalise,
        };
        self.tasks(c, costs)
    }

    /// The PE's tasks given its heads' costs: the task switch, the shared heads' work before
    /// their sums and the issue of the sums (a send and a receive each), the whole heads; then,
    /// if it has shared heads, a second task with the rest of theirs. `tail` ends the last task.
    pub(super) fn tasks(self, c: &FabricConfig, costs: HeadCosts) -> PeCompute {
        let switch = u64::from(c.task_switch_cycles);
        let HeadCosts {
            before_sums,
            after_sums,
            per_head,
            tail,
        } = costs;
        let whole = self.whole_dims * (before_sums + after_sums) + self.whole * per_head;
        if self.shared == 0 {
            return PeCompute {
                to_sums: switch,
                whole: whole + tail,
                shared_rest: 0,
                shared: false,
            };
        }
        PeCompute {
            to_sums: switch
                + self.shared_dims * before_sums
                + 2 * self.shared * u64::from(c.issue_cycles),
            whole,
            shared_rest: switch + self.shared * per_head + self.shared_dims * after_sums + tail,
            shared: true,
        }
    }
}

/// The last run's normalisation of a row of `n` tokens: per local head a load, a reciprocal and
/// a store per token; per feature one multiply of the output row.
#[derive(Clone, Copy, Debug)]
struct Normalise {
    per_head: u64,
    per_feature: u64,
}

impl Normalise {
    fn of(c: &FabricConfig, n: usize) -> Self {
        Normalise {
            per_head: reciprocals(c, n),
            per_feature: vector(c, n, c.simd.arith_f32),
        }
    }
}

/// One row's compute in one run, per local head apart from its width.
#[derive(Clone, Copy, Debug, Default)]
struct RunRow {
    /// Per feature of a head on the PE: the scores (a load and an AXPY per key and segment).
    scores: u64,
    /// Per feature: the context (the output row's rescale, a load and an AXPY per key).
    context: u64,
    /// Per head: the online update of every segment, masks included.
    update: u64,
    /// Elements of one head's scores: what a head over several columns sums.
    head_scores: u64,
}

/// The keys each of a row's segments meets in each run, from one pass over its window.
pub(super) struct RowKeys {
    segments: Vec<Segment>,
    /// Runs that bring the row keys (its last run is `runs - 1`).
    pub runs: usize,
    /// `[run][segment]`: the keys of the segment's sequence the run brings, and the cycles of
    /// their masks.
    keys: Vec<(usize, u64)>,
}

impl RowKeys {
    pub(super) fn of(
        c: &FabricConfig,
        g: &Geometry,
        r: usize,
        window: &Range<usize>,
        runs_of: &[usize],
    ) -> Self {
        let segments = g.segments(r);
        let runs = window.clone().map(|b| runs_of[b] + 1).max().unwrap_or(0);
        let mut keys = vec![(0, 0); runs * segments.len()];
        let first_sequence = segments.first().map_or(0, |s| s.sequence as usize);
        for b in window.clone() {
            let row = runs_of[b] * segments.len();
            for token in g.tokens(b) {
                let (sequence, pos) = (token / g.seq, token % g.seq);
                let Some(i) = sequence.checked_sub(first_sequence) else {
                    continue;
                };
                let Some(seg) = segments.get(i) else {
                    continue;
                };
                let (first, len) = (seg.first_pos as usize, seg.len as usize);
                let entry = &mut keys[row + i];
                *entry = (entry.0 + 1, entry.1 + mask_key(c, pos, first, len));
            }
        }
        RowKeys {
            segments,
            runs,
            keys,
        }
    }

    /// The segments run `k` brings keys to: `(tokens, keys, cycles of the keys' masks)`.
    pub(super) fn run_segments(&self, k: usize) -> impl Iterator<Item = (usize, usize, u64)> {
        let at = k * self.segments.len();
        let keys = self.keys.get(at..at + self.segments.len()).unwrap_or(&[]);
        self.segments
            .iter()
            .zip(keys)
            .filter(|(_, (count, _))| *count > 0)
            .map(|(seg, &(count, mask))| (seg.len as usize, count, mask))
    }

    /// Run `k`'s compute terms, if it brings the row any key.
    fn run_row(&self, c: &FabricConfig, k: usize) -> Option<RunRow> {
        let mut run = RunRow::default();
        for (len, count, mask) in self.run_segments(k) {
            let per_feature = product(c, count, 1, len);
            run.scores += per_feature;
            run.context += vector(c, len, c.simd.arith_f32) + per_feature;
            run.update += online_update(c, count, len) + mask;
            run.head_scores += (count * len) as u64;
        }
        (run.head_scores > 0).then_some(run)
    }
}

/// `online.rs`'s update of one head and segment of `len` tokens meeting `keys` keys, but the
/// masks: scale the block; the new maximum (a move, a max per further key, a max with the
/// running one); the rescale factor (a subtraction, its `exp`) and the maximum's move; the
/// subtraction of the maximum from each key's row and the block's `exp`; the run's sum (a move
/// and an add per further key); the running sum's multiply by the factor and the add of the
/// run's sum.
fn online_update(c: &FabricConfig, keys: usize, len: usize) -> u64 {
    let s = &c.simd;
    let row = |width: u32| vector(c, len, width);
    let count = keys as u64;
    let scale = vector(c, keys * len, s.arith_f32);
    let max = row(s.mov_f32) + count * row(s.max);
    let rescale = row(s.arith_f32) + c.transcendental_cycles(len as u64) + row(s.mov_f32);
    let exps = count * row(s.arith_f32) + c.transcendental_cycles((keys * len) as u64);
    let sum = row(s.mov_f32) + (count - 1) * row(s.arith_f32) + 2 * row(s.arith_f32);
    scale + max + rescale + exps + sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{AttentionShape, BlockedAttention};
    use crate::layout::Region;

    // Prices on `rectangle` fabrics (the `wse2` ones): a vector instruction of `len` elements
    // costs `1 + ceil(len / width)` (fp32 move and add 2 per cycle, max and FMAC 1), a scalar
    // load or store 1, a reciprocal 4, a task switch 3, `exp` `1 + 4 len`.

    /// One sequence of 4 tokens, one head of 4 features, on one PE: one run.
    ///
    /// Gather: a task switch and the copies of K and V (`vector(16, 2) = 9` each): 21; nothing
    /// to send. Compute: the task switch 3; scores, per feature 4 keys x (1 + vector(4, 1) = 5)
    /// = 24, 96 for the 4 features; context, per feature `vector(4, 2) = 3` and 24: 108; the
    /// update: scale `vector(16, 2) = 9`, mask (keys 1-3 over 1, 2, 3 tokens) `2 + 2 + 3 = 7`,
    /// maximum `3 + 4 x 5 = 23`, rescale factor `3 + (1 + 16) + 3 = 23`, the block's
    /// subtraction and `exp` `4 x 3 + (1 + 64) = 77`, the sums `3 + 3 x 3 + 2 x 3 = 18`: 157;
    /// the normalisation, `4 x (1 + 4 + 1) = 24` reciprocals and `4 x 3` multiplies: 36.
    /// `21 + 3 + 96 + 108 + 157 + 36 = 421`, the exact engine's count too.
    #[test]
    fn one_pe_by_hand() {
        let blocked = BlockedAttention {
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
        };
        let config = FabricConfig::rectangle(1, 1).unwrap();
        assert_eq!(blocked.estimate_cycles(&config).unwrap(), 421);
    }

    /// What row `r` of `rows` moves in a gather where the rows `owners` each send a slot of
    /// `slot` wavelets to every row.
    fn everyone_wants(r: usize, rows: usize, owners: Range<usize>, slot: u64) -> RowMoves {
        let mut moves = RowMoves::default();
        for b in owners {
            moves.gather(r, b, slot, owner_sends(slot, r, b, &(0..rows)));
        }
        moves
    }

    /// Three rows each owning a slot of 100 wavelets that every row wants. The middle row
    /// passes row 0's slot south and row 2's north and sends its own both ways: 400 wavelets
    /// through one ramp, shared by the two chains to the end, so 400 cycles, where the busiest
    /// core's count alone (`max(in, out)`) is 400 too; the sweeps approach it from below by
    /// halves (200, 350, 387, 396, 399) and stop at 399, when the end rows have it too. With only
    /// the middle row's slot (a run owning one row), it sends 100 each way over the shared ramp:
    /// 200 (199).
    #[test]
    fn the_two_chains_share_each_cores_ramp() {
        let all: Vec<RowMoves> = (0..3).map(|r| everyone_wants(r, 3, 0..3, 100)).collect();
        assert_eq!(
            (all[1].south_on, all[1].south_own, all[1].inp),
            (100, 100, 200)
        );
        assert_eq!(chains_ramp(&all, false), vec![399; 3]);
        let middle: Vec<RowMoves> = (0..3).map(|r| everyone_wants(r, 3, 1..2, 100)).collect();
        assert_eq!(chains_ramp(&middle, false), vec![199; 3]);
    }

    /// Sixteen rows each owning a slot of 256 wavelets wanted by all: the middle rows pass on
    /// 15 slots and send their own both ways (17 slots, what the busiest core's count gives),
    /// but the two chains stall each other. Row 1 can send its own slot south only after row
    /// 0's, sharing its ramp with the 14 slots it passes north; row 2 after rows 0 and 1's; and
    /// so on: the southward chain leaves row 14 after `1.5 x 16 - 1 = 23` slots, 5,888 cycles
    /// (the same two-chain model written separately as a short Python iteration gives 23 slots
    /// for 16 rows, `1.5 R - 1` for every even `R` from 4 to 32; the exact engine's gather on
    /// such a column, less its start and hops, took 6,150 cycles).
    #[test]
    fn a_whole_sequences_chains_take_about_one_and_a_half_slots_per_row() {
        let rows = 16;
        let moves: Vec<RowMoves> = (0..rows)
            .map(|r| everyone_wants(r, rows, 0..rows, 256))
            .collect();
        assert_eq!(chains_ramp(&moves, false).iter().max(), Some(&(23 * 256)));
    }
}
