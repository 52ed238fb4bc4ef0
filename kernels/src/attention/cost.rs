//! The analytic cycle formulas of the attention kernels (what a fast timing mode uses): the
//! collectives from the wavelets each core must move, the compute from the instructions each PE
//! issues, summed per head and sequence segment in closed form.
//!
//! Key design decision: the compute terms mirror the instruction sequences of `pe.rs` one for
//! one, so a change there shows up as a gap in the estimate-versus-exact test.
//!
//! What it is not: a simulation. It ignores the join tasks (a few cycles per PE), contention
//! beyond the busiest core's ramp, and the skew between rows finishing their compute at
//! different times (the slowest row sets the pace, which is what it charges).

use wafersim_sim::FabricConfig;

use super::geometry::Geometry;
use super::pe::RECIPROCAL_CYCLES;

/// Cycles of one vector instruction of `len` elements at `width` elements per cycle.
fn vector(c: &FabricConfig, len: usize, width: u32) -> u64 {
    u64::from(c.issue_cycles) + (len as u64).div_ceil(u64::from(width.max(1)))
}

/// One scalar load or store.
fn scalar(c: &FabricConfig) -> u64 {
    u64::from(c.issue_cycles)
}

/// `S * hd` pairs of (load a K or V value, AXPY or dot over `len` tokens): one product.
fn product(c: &FabricConfig, seq: usize, hd: usize, len: usize) -> u64 {
    (seq * hd) as u64 * (scalar(c) + vector(c, len, c.simd.fmac_f32))
}

/// The forward's instructions for one head and one segment of `len` tokens from position
/// `first`: scores, scale, mask, max, subtract, exp, sum, reciprocals, normalise, context.
fn forward_segment(c: &FabricConfig, seq: usize, hd: usize, len: usize, first: usize) -> u64 {
    let s = &c.simd;
    let rows = seq as u64;
    let mask: u64 = (first + 1..seq)
        .map(|j| vector(c, (j - first).min(len), s.mov_f32))
        .sum();
    let max = vector(c, len, s.mov_f32) + (rows - 1) * vector(c, len, s.max);
    let sum = vector(c, len, s.mov_f32) + (rows - 1) * vector(c, len, s.arith_f32);
    let exp = u64::from(c.issue_cycles) + (seq * len) as u64 * u64::from(c.exp_cycles_per_element);
    let reciprocals = len as u64 * (2 * scalar(c) + RECIPROCAL_CYCLES);
    2 * product(c, seq, hd, len)
        + vector(c, seq * len, s.arith_f32)
        + mask
        + max
        + 2 * rows * vector(c, len, s.arith_f32)
        + exp
        + sum
        + reciprocals
}

/// The backward's instructions for one head and one segment of `len` tokens: dP, the softmax
/// gradient, dQ, and the partial dK, dV (a dot and a store per key and feature, twice).
fn backward_segment(c: &FabricConfig, seq: usize, hd: usize, len: usize) -> u64 {
    let s = &c.simd;
    let rows = seq as u64;
    let block = vector(c, seq * len, s.arith_f32);
    let softmax_grad = vector(c, len, s.arith_f32)
        + (rows - 1) * 2 * vector(c, len, s.arith_f32)
        + rows * vector(c, len, s.arith_f32)
        + 2 * block;
    vector(c, seq * len, s.mov_f32) + 4 * product(c, seq, hd, len) + softmax_grad
}

/// The forward compute task of region row `r`.
pub(super) fn forward_compute(c: &FabricConfig, g: &Geometry, r: usize) -> u64 {
    row_compute(c, g, r, |len, first| {
        forward_segment(c, g.seq, g.hd, len, first)
    })
}

/// The backward compute task of region row `r`.
pub(super) fn backward_compute(c: &FabricConfig, g: &Geometry, r: usize) -> u64 {
    row_compute(c, g, r, |len, _| backward_segment(c, g.seq, g.hd, len))
}

/// A task switch plus, for every local head, `per_segment(len, first position)` summed over
/// row `r`'s segments.
fn row_compute(
    c: &FabricConfig,
    g: &Geometry,
    r: usize,
    per_segment: impl Fn(usize, usize) -> u64,
) -> u64 {
    let per_head: u64 = g
        .segments(r)
        .iter()
        .map(|seg| per_segment(seg.len as usize, seg.first_pos as usize))
        .sum();
    u64::from(c.task_switch_cycles) + g.heads_local as u64 * per_head
}

/// Cycles for a wavelet to move one row along a store-and-forward chain: into the router, up
/// the ramp to the core, the core's next cycle, down the ramp.
fn hop(c: &FabricConfig) -> u64 {
    u64::from(c.hop_latency) + 2 * u64::from(c.ramp_latency) + 1
}

/// What row `r`'s core moves in the K/V all-gather: `(wavelets in, wavelets out)`. In: the
/// slot of every other row of its window. Out: per direction, the slots it forwards (those
/// whose reach goes on past it) and its own slot if its reach goes that way. The dK/dV
/// reduce-scatter moves the same wavelets the other way round.
fn gather_flows(g: &Geometry, r: usize) -> (u64, u64) {
    let slot = |b: usize| u64::from(g.slot_len(b));
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

/// The K/V all-gather, and the task that starts it (copying K and V into the window).
pub(super) fn gather(c: &FabricConfig, g: &Geometry) -> u64 {
    let start = u64::from(c.task_switch_cycles) + 2 * vector(c, g.fc * g.n(0), c.simd.mov_f32);
    start
        + collective(c, g, |r| {
            let (inp, out) = gather_flows(g, r);
            inp.max(out)
        })
}

/// The dK/dV reduce-scatter, and the copy of the PE's own partial sums that starts it.
pub(super) fn reduce(c: &FabricConfig, g: &Geometry) -> u64 {
    let start = vector(c, g.slot_len(0) as usize, c.simd.mov_f32);
    start
        + collective(c, g, |r| {
            let (out, inp) = gather_flows(g, r);
            inp.max(out)
        })
}
