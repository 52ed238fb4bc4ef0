//! The analytic cycle formulas of the attention kernels (what a fast timing mode uses): the
//! collectives from the wavelets each core must move, the compute from the instructions each PE
//! issues, summed per head and sequence segment in closed form, and, for heads split over
//! columns, the row sums between the two halves of the compute placed on a per-row timeline.
//!
//! Key design decision: the compute terms mirror the instruction sequences of `pe.rs` one for
//! one, so a change there shows up as a gap in the estimate-versus-exact test.
//!
//! Two passes are costed, the forward and backward kernels; the blocked kernels' formulas
//! (`blocked_cost.rs`, `blocked_backward_cost.rs`) share this file's timeline and terms.
//!
//! What it is not: a simulation. It ignores the join tasks (a few cycles per PE), contention
//! beyond the busiest core's ramp, and the skew between columns finishing their gathers at
//! different times (every column starts its compute when the slowest gather is done). The
//! busiest core's wavelets undercount a gather whose chains are long and carry much: the two
//! directions' chains share each core's ramp and stall each other, about `1.5 R` slots for a
//! sequence over `R` rows where this counts `R + 1`. On one sequence of 32 tokens over 16 rows
//! of one column with 64 features (the gather as heavy as the compute) the forward's estimate is
//! 0.923 of the exact cycles; the blocked forward's formula (`blocked_cost.rs`) models the
//! shared ramps and is within 1.5 % there.

use std::ops::Range;

use wafersim_sim::FabricConfig;

use super::geometry::{Geometry, LocalHead, Segment};

/// Cycles of one vector instruction of `len` elements at `width` elements per cycle.
pub(super) fn vector(c: &FabricConfig, len: usize, width: u32) -> u64 {
    c.vector_cycles(len as u64, width)
}

/// One scalar load or store.
pub(super) fn scalar(c: &FabricConfig) -> u64 {
    u64::from(c.issue_cycles)
}

/// `S * dims` pairs of (load a K or V value, AXPY or dot over `len` tokens): one product over
/// `dims` features.
pub(super) fn product(c: &FabricConfig, seq: usize, dims: usize, len: usize) -> u64 {
    (seq * dims) as u64 * (scalar(c) + vector(c, len, c.simd.fmac_f32))
}

/// The forward's non-product instructions for one head and one segment of `len` tokens from
/// position `first`: scale, mask, max, subtract, exp, sum, reciprocals, normalise.
fn softmax(c: &FabricConfig, seq: usize, len: usize, first: usize) -> u64 {
    probabilities_from_statistics(c, seq, len, first) + softmax_statistics(c, seq, len)
}

/// What turns the scores into probabilities given one statistic per token to subtract (the
/// row max): scale, mask the future keys, subtract it from each key's row, exponentiate the
/// block.
fn probabilities_from_statistics(c: &FabricConfig, seq: usize, len: usize, first: usize) -> u64 {
    let s = &c.simd;
    let mask: u64 = (first + 1..seq).map(|j| mask_key(c, j, first, len)).sum();
    let subtract = seq as u64 * vector(c, len, s.arith_f32);
    let exp = c.transcendental_cycles((seq * len) as u64);
    vector(c, seq * len, s.arith_f32) + mask + subtract + exp
}

/// The `fill` that masks the key at position `pos` for a segment of `len` tokens from position
/// `first`: the segment's tokens before the key (none if the key is not after the first token).
pub(super) fn mask_key(c: &FabricConfig, pos: usize, first: usize, len: usize) -> u64 {
    if pos > first {
        vector(c, (pos - first).min(len), c.simd.mov_f32)
    } else {
        0
    }
}

/// One reciprocal per token of `len`: load the sum, the software reciprocal, store it.
pub(super) fn reciprocals(c: &FabricConfig, len: usize) -> u64 {
    len as u64 * (2 * scalar(c) + c.software_routine_cycles())
}

/// What the forward adds to find and apply the statistics itself: the row max, the row sum of
/// the exponentials, one reciprocal per token, and the multiply by it of each key's row.
fn softmax_statistics(c: &FabricConfig, seq: usize, len: usize) -> u64 {
    let s = &c.simd;
    let rows = seq as u64;
    let max = vector(c, len, s.mov_f32) + (rows - 1) * vector(c, len, s.max);
    let sum = vector(c, len, s.mov_f32) + (rows - 1) * vector(c, len, s.arith_f32);
    let normalise = rows * vector(c, len, s.arith_f32);
    max + sum + reciprocals(c, len) + normalise
}

/// The backward's softmax gradient for one head and one segment of `len` tokens.
fn softmax_grad(c: &FabricConfig, seq: usize, len: usize) -> u64 {
    let s = &c.simd;
    let rows = seq as u64;
    let block = vector(c, seq * len, s.arith_f32);
    vector(c, len, s.arith_f32)
        + (rows - 1) * 2 * vector(c, len, s.arith_f32)
        + rows * vector(c, len, s.arith_f32)
        + 2 * block
}

/// Which pass a timeline is for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Pass {
    Forward,
    Backward,
}

impl Pass {
    /// Products after the scores (or dP) are summed: the context (forward); dQ, dK and dV
    /// (backward).
    fn products_after_sum(self) -> u64 {
        match self {
            Pass::Forward => 1,
            Pass::Backward => 3,
        }
    }
}

/// Tiles of each row the all-gather moves: K and V.
const GATHERED_TILES: u64 = 2;

/// Per segment of a row: the instructions that do not depend on a head's width, and its length.
struct RowCosts {
    /// `(segment length, softmax or softmax-gradient cycles, cycles of a fill of the block)`.
    segments: Vec<(usize, u64, u64)>,
}

impl RowCosts {
    fn new(c: &FabricConfig, g: &Geometry, segments: &[Segment], pass: Pass) -> Self {
        let segments = segments
            .iter()
            .map(|seg| {
                let (len, first) = (seg.len as usize, seg.first_pos as usize);
                match pass {
                    Pass::Forward => (len, softmax(c, g.seq, len, first), 0),
                    Pass::Backward => (
                        len,
                        softmax_grad(c, g.seq, len),
                        vector(c, g.seq * len, c.simd.mov_f32),
                    ),
                }
            })
            .collect();
        RowCosts { segments }
    }

    /// The partial products a head of `dims` features runs before its sums are needed: the
    /// scores (forward), or the fill and dP (backward), over every segment.
    fn before_sum(&self, c: &FabricConfig, seq: usize, dims: usize) -> u64 {
        self.segments
            .iter()
            .map(|&(len, _, fill)| fill + product(c, seq, dims, len))
            .sum()
    }

    /// What follows: softmax and context (forward), the softmax gradient, dQ and the partial
    /// dK, dV (backward).
    fn after_sum(&self, c: &FabricConfig, seq: usize, dims: usize, pass: Pass) -> u64 {
        let products = pass.products_after_sum();
        self.segments
            .iter()
            .map(|&(len, rest, _)| rest + products * product(c, seq, dims, len))
            .sum()
    }
}

/// One PE's compute, in the order its tasks run it.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct PeCompute {
    /// From the compute task's start to the group sums' start: the task switch, the shared
    /// heads' partial products, the issue of the sums.
    pub to_sums: u64,
    /// The whole heads, after that, in the same task.
    pub whole: u64,
    /// The second task, on the shared heads once summed (0 if there are none).
    pub shared_rest: u64,
    pub shared: bool,
}

fn pe_compute(
    c: &FabricConfig,
    g: &Geometry,
    row: &RowCosts,
    heads: &[LocalHead],
    pass: Pass,
) -> PeCompute {
    let mut pe = PeCompute {
        to_sums: u64::from(c.task_switch_cycles),
        ..PeCompute::default()
    };
    let mut ops = 0;
    for h in heads {
        let dims = h.dims as usize;
        if h.shared() {
            pe.shared = true;
            pe.to_sums += row.before_sum(c, g.seq, dims);
            pe.shared_rest += row.after_sum(c, g.seq, dims, pass);
            // A send and a receive, or one receive on the group's last column: two issues.
            ops += 2;
        } else {
            pe.whole += row.before_sum(c, g.seq, dims) + row.after_sum(c, g.seq, dims, pass);
        }
    }
    if pe.shared {
        pe.to_sums += ops * u64::from(c.issue_cycles);
        pe.shared_rest += u64::from(c.task_switch_cycles);
    }
    pe
}

/// Cycles for a wavelet to move one column or row along a chain through the cores: into the
/// router, down the ramp to the core, the core's next cycle, up the ramp.
pub(super) fn hop(c: &FabricConfig) -> u64 {
    u64::from(c.hop_latency) + 2 * u64::from(c.ramp_latency) + 1
}

/// Row `r`'s compute, from the start of the compute tasks to the last PE's end: the
/// [`timeline`] of its PEs' tasks and its heads' group sums of `S n_r` values.
pub(super) fn row_compute(c: &FabricConfig, g: &Geometry, r: usize, pass: Pass) -> u64 {
    let row = RowCosts::new(c, g, &g.segments(r), pass);
    let pes: Vec<PeCompute> = (0..g.cols)
        .map(|col| pe_compute(c, g, &row, &g.local_heads(col), pass))
        .collect();
    let groups: Vec<Group> = (0..g.heads)
        .map(|h| {
            let columns = g.head_columns(h);
            Group {
                columns: columns.len(),
                pes: columns,
            }
        })
        .collect();
    timeline(c, &pes, &groups, g.head_block_len(r) as u64)
}

/// A head's column group on a row's timeline: the entries of the row's PEs it spans (its
/// columns, or fewer where equal neighbouring columns stand for each other) and how many
/// columns its sums' chains cross.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Group {
    pub pes: Range<usize>,
    pub columns: usize,
}

/// A row's compute from its PEs' tasks (`pes`: one per column, or one per run of equal
/// columns) and the column groups of its heads, whose `m` partial sums each travel east along
/// the group and back west: each PE's first task; for every group of several columns, the chain
/// east once every column has issued its sums, the turnaround task on the last column once its
/// core is free, the chain back west; each PE's second task once its groups' totals are back.
pub(super) fn timeline(c: &FabricConfig, pes: &[PeCompute], groups: &[Group], m: u64) -> u64 {
    let first_task_end = |pe: &PeCompute| pe.to_sums + pe.whole;
    let mut totals_back = vec![0u64; pes.len()];
    for group in groups {
        if group.columns < 2 {
            continue;
        }
        let chain = m + (group.columns as u64 - 1) * hop(c);
        let ready = group.pes.clone().map(|i| pes[i].to_sums).max().unwrap_or(0);
        let last = group.pes.end - 1;
        let turn = (ready + chain).max(first_task_end(&pes[last]));
        let back = turn + u64::from(c.task_switch_cycles) + 3 * scalar(c) + chain;
        for i in group.pes.clone() {
            totals_back[i] = totals_back[i].max(back);
        }
    }
    pes.iter()
        .zip(totals_back)
        .map(|(pe, back)| {
            let first = first_task_end(pe);
            if pe.shared {
                first.max(back) + pe.shared_rest
            } else {
                first
            }
        })
        .max()
        .unwrap_or(0)
}

/// What row `r`'s core in column `col` moves in an all-gather of `tiles` tiles per row (K and
/// V: 2; K alone: 1): `(wavelets in, wavelets out)`. In: the slot of every other row of its
/// window. Out: per direction, the slots it forwards (those whose reach goes on past it) and its
/// own slot if its reach goes that way. The dK/dV reduce-scatter moves the K/V gather's wavelets
/// the other way round.
fn gather_flows(g: &Geometry, col: usize, r: usize, tiles: u64) -> (u64, u64) {
    let mut flows = (0, 0);
    for b in g.window(r) {
        let slot = tiles * (g.fc(col) * g.n(b)) as u64;
        let (inp, out) = owner_flows(slot, r, b, &g.reach(b));
        flows = (flows.0 + inp, flows.1 + out);
    }
    flows
}

/// What row `r`'s core moves of owner row `b`'s slot of `slot` wavelets (`b` in its window,
/// `reach` the rows `b`'s slot goes to): `(wavelets in, wavelets out)`. It takes the slot in
/// unless it is its own, and sends it on once per direction the reach goes on past `r`.
fn owner_flows(slot: u64, r: usize, b: usize, reach: &Range<usize>) -> (u64, u64) {
    let inp = if b != r { slot } else { 0 };
    let (south, north) = owner_sends(slot, r, b, reach);
    (inp, south + north)
}

/// What row `r`'s core sends of owner row `b`'s slot of `slot` wavelets (`b` in its window,
/// `reach` the rows `b`'s slot goes to): `(south, north)`, the slot once per direction the
/// reach goes on past `r` (from the north southwards, from the south northwards, its own both
/// ways).
pub(super) fn owner_sends(slot: u64, r: usize, b: usize, reach: &Range<usize>) -> (u64, u64) {
    let goes_on = |next: Option<usize>| next.is_some_and(|x| reach.contains(&x));
    let south = b <= r && goes_on(Some(r + 1));
    let north = b >= r && goes_on(r.checked_sub(1));
    (u64::from(south) * slot, u64::from(north) * slot)
}

/// A collective over the column chains: the busiest core's ramp (`flows` gives each row's
/// wavelets in and out), plus one store-and-forward hop per row of the longest reach.
fn collective(c: &FabricConfig, g: &Geometry, flows: impl Fn(usize) -> u64) -> u64 {
    let busiest = (0..g.rows).map(flows).max().unwrap_or(0);
    let span = (0..g.rows).map(|b| g.reach(b).len()).max().unwrap_or(1);
    collective_cycles(c, busiest, span)
}

/// A collective whose busiest core moves `busiest` wavelets through its ramp and whose longest
/// reach is `span` rows: the ramp, plus one store-and-forward hop per further row.
pub(super) fn collective_cycles(c: &FabricConfig, busiest: u64, span: usize) -> u64 {
    busiest + (span.max(1) as u64 - 1) * hop(c)
}

/// The task that starts a gather of `tiles` tiles per row: a task switch and the copy of the
/// PE's own tiles into its window, in the widest column (the layout's first columns are the
/// widest).
pub(super) fn gather_start(c: &FabricConfig, g: &Geometry, tiles: u64) -> u64 {
    let copy = vector(c, g.fc(0) * g.n(0), c.simd.mov_f32);
    u64::from(c.task_switch_cycles) + tiles * copy
}

/// The all-gather of K and V, and the task that starts it (copying them into the window), in
/// the widest column.
pub(super) fn gather(c: &FabricConfig, g: &Geometry) -> u64 {
    gather_start(c, g, GATHERED_TILES)
        + collective(c, g, |r| {
            let (inp, out) = gather_flows(g, 0, r, GATHERED_TILES);
            inp.max(out)
        })
}

/// The dK/dV reduce-scatter, and the copy of the PE's own partial sums that starts it.
pub(super) fn reduce(c: &FabricConfig, g: &Geometry) -> u64 {
    let start = vector(c, g.slot_len(0, 0) as usize, c.simd.mov_f32);
    start
        + collective(c, g, |r| {
            let (out, inp) = gather_flows(g, 0, r, GATHERED_TILES);
            inp.max(out)
        })
}

/// The whole pass: gather, the slowest row's compute, and the backward's reduce-scatter.
pub(super) fn total(c: &FabricConfig, g: &Geometry, pass: Pass) -> u64 {
    let compute = (0..g.rows)
        .map(|r| row_compute(c, g, r, pass))
        .max()
        .unwrap_or(0);
    let reduce = if pass == Pass::Backward {
        reduce(c, g)
    } else {
        0
    };
    gather(c, g) + compute + reduce
}

#[cfg(test)]
mod tests {
    use wafersim_sim::FabricConfig;

    use crate::attention::{Attention, AttentionShape};
    use crate::layout::Region;

    /// The forward's estimate of one sequence of 4 tokens, one head of 2 features, on
    /// `cols x rows` PEs of the `wse2` machine.
    fn forward(cols: u32, rows: u32) -> u64 {
        let attention = Attention {
            region: Region::at_origin(cols, rows),
            shape: AttentionShape {
                batch: 1,
                seq_len: 4,
                heads: 1,
                features: 2,
                scale: 1.0,
            },
            q: &[],
            k: &[],
            v: &[],
        };
        attention.estimate_cycles(&FabricConfig::wse2()).unwrap()
    }

    // Prices on `wse2`: a vector instruction of `len` elements costs `1 + ceil(len / width)`
    // (fp32 move and add 2 per cycle, max and FMAC 1), a scalar load or store 1, a reciprocal
    // (software) 4, a task switch 3, `exp` 4 cycles per element after its issue; a hop between cores
    // `1 + 2 x 2 + 1 = 6`.

    /// One PE (S = 4, one segment of 4 tokens from position 0, F_c = 2, the head whole): the
    /// start task 3 and the copies of K and V into the window `2 vector(2 x 4 = 8, mov 2) =
    /// 2 x 5` (one PE: nothing to send, no hops); the compute task's switch 3; the scores and the
    /// context, each `S d (load + vector(4, fmac 1)) = 4 x 2 x (1 + 5) = 48`; the probabilities
    /// from the statistics: scale `vector(16, 2) = 9`, mask `vector(1) + vector(2) + vector(3) =
    /// 2 + 2 + 3 = 7`, subtract `4 vector(4, 2) = 12`, exp `1 + 16 x 4 = 65`: 93; the statistics:
    /// max `vector(4, mov) + 3 vector(4, max) = 3 + 3 x 5 = 18`, sum `vector(4, mov) +
    /// 3 vector(4, add) = 3 + 3 x 3 = 12`, reciprocals `4 x (2 + 4) = 24`, normalise
    /// `4 vector(4, mul) = 4 x 3 = 12`: 66. In all `3 + 10 + 3 + 96 + 93 + 66 = 271`.
    #[test]
    fn the_forward_on_one_pe_by_hand() {
        assert_eq!(forward(1, 1), 271);
    }

    /// 2 x 2 PEs: the head's 2 features over 2 columns (one each, so the head is shared and its
    /// scores summed along each row), 2 tokens per row, both rows in one sequence (each row's
    /// window and reach is both rows). The slowest row is row 0 (its mask is longest).
    ///
    /// Gather (column 0, F_c = 1, n = 2): each row receives the other's slot and sends its own
    /// one way, a slot being `2 x 1 x 2` wavelets, plus one hop of 6; started by copying 2
    /// tiles of 2 (`vector(2, mov) = 2` each) after a task switch of 3: `3 + 2 x 2 + 4 + 6 =
    /// 17`.
    ///
    /// Row 0: partial scores `4 x 1 x (1 + vector(2, fmac) = 3) = 16`, after the task switch and
    /// before 2 issues: the sums are issued at `3 + 16 + 2 = 21`. They travel east in
    /// `m + (g - 1) hop = S n + 6 = 14`, the turnaround task takes `3 + 3`, and 14 back west: at
    /// 55 both columns have the full scores. Then the second task: a task switch 3 and the
    /// probabilities from the statistics: scale `vector(8, 2) = 5`, mask (keys 1..3 over 1, 2,
    /// 2 tokens) `2 + 2 + 2 = 6`, subtract `4 vector(2, 2) = 8`, exp `1 + 8 x 4 = 33`: 52; the
    /// context, a load and an AXPY per key and feature, `4 x 1 x (1 + 3) = 16`, and the
    /// statistics: max `2 + 3 x 3 = 11`, sum `2 + 3 x 2 = 8`, reciprocals `2 x (2 + 4) = 12`,
    /// normalise `4 x 2 = 8`: 39. In all `17 + 55 + 3 + 52 + 16 + 39 = 182`.
    #[test]
    fn the_forward_with_the_group_sums_of_a_head_over_two_columns_by_hand() {
        assert_eq!(forward(2, 2), 182);
    }
}
