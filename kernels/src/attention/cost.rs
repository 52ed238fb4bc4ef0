//! The analytic cycle formulas of the attention kernels (what a fast timing mode uses): the
//! collectives from the wavelets each core must move, the compute from the instructions each PE
//! issues, summed per head and sequence segment in closed form, and, for heads split over
//! columns, the row sums between the two halves of the compute placed on a per-row timeline.
//!
//! Key design decision: the compute terms mirror the instruction sequences of `pe.rs` one for
//! one, so a change there shows up as a gap in the estimate-versus-exact test.
//!
//! What it is not: a simulation. It ignores the join tasks (a few cycles per PE), contention
//! beyond the busiest core's ramp, and the skew between columns finishing their gathers at
//! different times (every column starts its compute when the slowest gather is done).

use wafersim_sim::FabricConfig;

use super::geometry::{Geometry, LocalHead, Segment};
use super::pe::RECIPROCAL_CYCLES;

/// Cycles of one vector instruction of `len` elements at `width` elements per cycle.
fn vector(c: &FabricConfig, len: usize, width: u32) -> u64 {
    c.vector_cycles(len as u64, width)
}

/// One scalar load or store.
fn scalar(c: &FabricConfig) -> u64 {
    u64::from(c.issue_cycles)
}

/// `S * dims` pairs of (load a K or V value, AXPY or dot over `len` tokens): one product over
/// `dims` features.
fn product(c: &FabricConfig, seq: usize, dims: usize, len: usize) -> u64 {
    (seq * dims) as u64 * (scalar(c) + vector(c, len, c.simd.fmac_f32))
}

/// The forward's non-product instructions for one head and one segment of `len` tokens from
/// position `first`: scale, mask, max, subtract, exp, sum, reciprocals, normalise.
fn softmax(c: &FabricConfig, seq: usize, len: usize, first: usize) -> u64 {
    let s = &c.simd;
    let rows = seq as u64;
    let mask: u64 = (first + 1..seq)
        .map(|j| vector(c, (j - first).min(len), s.mov_f32))
        .sum();
    let max = vector(c, len, s.mov_f32) + (rows - 1) * vector(c, len, s.max);
    let sum = vector(c, len, s.mov_f32) + (rows - 1) * vector(c, len, s.arith_f32);
    let exp = u64::from(c.issue_cycles) + (seq * len) as u64 * u64::from(c.exp_cycles_per_element);
    let reciprocals = len as u64 * (2 * scalar(c) + RECIPROCAL_CYCLES);
    vector(c, seq * len, s.arith_f32)
        + mask
        + max
        + 2 * rows * vector(c, len, s.arith_f32)
        + exp
        + sum
        + reciprocals
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

    /// What follows: softmax and context (forward), or the softmax gradient, dQ and the
    /// partial dK, dV (backward).
    fn after_sum(&self, c: &FabricConfig, seq: usize, dims: usize, pass: Pass) -> u64 {
        let products = if pass == Pass::Forward { 1 } else { 3 };
        self.segments
            .iter()
            .map(|&(len, rest, _)| rest + products * product(c, seq, dims, len))
            .sum()
    }
}

/// One PE's compute, in the order its tasks run it.
#[derive(Clone, Copy, Debug, Default)]
struct PeCompute {
    /// From the compute task's start to the group sums' start: the task switch, the shared
    /// heads' partial products, the issue of the sums.
    to_sums: u64,
    /// The whole heads, after that, in the same task.
    whole: u64,
    /// The second task, on the shared heads once summed (0 if there are none).
    shared_rest: u64,
    shared: bool,
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
fn hop(c: &FabricConfig) -> u64 {
    u64::from(c.hop_latency) + 2 * u64::from(c.ramp_latency) + 1
}

/// Row `r`'s compute, from the start of the compute tasks to the last PE's end: each PE's first
/// task; for every head over several columns, the partial sums' chain east once every column
/// has issued them, the turnaround task on the last column once its core is free, the totals'
/// chain back west; each PE's second task once its heads' totals are back.
pub(super) fn row_compute(c: &FabricConfig, g: &Geometry, r: usize, pass: Pass) -> u64 {
    let row = RowCosts::new(c, g, &g.segments(r), pass);
    let pes: Vec<PeCompute> = (0..g.cols)
        .map(|col| pe_compute(c, g, &row, &g.local_heads(col), pass))
        .collect();
    let first_task_end = |pe: &PeCompute| pe.to_sums + pe.whole;
    let mut totals_back = vec![0u64; g.cols];
    let m = g.head_block_len(r) as u64;
    for h in 0..g.heads {
        let group = g.head_columns(h);
        if group.len() < 2 {
            continue;
        }
        let chain = m + (group.len() as u64 - 1) * hop(c);
        let ready = group.clone().map(|col| pes[col].to_sums).max().unwrap_or(0);
        let last = group.end - 1;
        let turn = (ready + chain).max(first_task_end(&pes[last]));
        let back = turn + u64::from(c.task_switch_cycles) + 3 * scalar(c) + chain;
        for col in group {
            totals_back[col] = totals_back[col].max(back);
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

/// What row `r`'s core in column `col` moves in the K/V all-gather: `(wavelets in, wavelets
/// out)`. In: the slot of every other row of its window. Out: per direction, the slots it
/// forwards (those whose reach goes on past it) and its own slot if its reach goes that way.
/// The dK/dV reduce-scatter moves the same wavelets the other way round.
fn gather_flows(g: &Geometry, col: usize, r: usize) -> (u64, u64) {
    let slot = |b: usize| u64::from(g.slot_len(col, b));
    let goes_on = |b: usize, next: Option<usize>| next.is_some_and(|x| g.reach(b).contains(&x));
    let (south, north) = (Some(r + 1), r.checked_sub(1));
    let mut flows = (0, 0);
    for b in g.window(r) {
        if b != r {
            flows.0 += slot(b);
        }
        let onward = (b <= r && goes_on(b, south)) as u64 + (b >= r && goes_on(b, north)) as u64;
        flows.1 += onward * slot(b);
    }
    flows
}

/// A collective over the column chains: the busiest core's ramp (`flows` gives each row's
/// wavelets in and out), plus one store-and-forward hop per row of the longest reach.
fn collective(c: &FabricConfig, g: &Geometry, flows: impl Fn(usize) -> u64) -> u64 {
    let busiest = (0..g.rows).map(flows).max().unwrap_or(0);
    let span = (0..g.rows).map(|b| g.reach(b).len()).max().unwrap_or(1);
    busiest + (span as u64 - 1) * hop(c)
}

/// The K/V all-gather, and the task that starts it (copying K and V into the window), in the
/// widest column (the layout's first columns are the widest).
pub(super) fn gather(c: &FabricConfig, g: &Geometry) -> u64 {
    let start = u64::from(c.task_switch_cycles) + 2 * vector(c, g.fc(0) * g.n(0), c.simd.mov_f32);
    start
        + collective(c, g, |r| {
            let (inp, out) = gather_flows(g, 0, r);
            inp.max(out)
        })
}

/// The dK/dV reduce-scatter, and the copy of the PE's own partial sums that starts it.
pub(super) fn reduce(c: &FabricConfig, g: &Geometry) -> u64 {
    let start = vector(c, g.slot_len(0, 0) as usize, c.simd.mov_f32);
    start
        + collective(c, g, |r| {
            let (out, inp) = gather_flows(g, 0, r);
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
