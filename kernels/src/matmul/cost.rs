//! The analytic cycle count of a weight-streamed product ([`super::MatmulShape::estimate_cycles`]).
//!
//! Chunk by chunk, per PE column of the slowest region row (the last row with the most tokens):
//! the column's weight tasks, the end-of-chunk task, the row's reduce-scatter timed by
//! [`crate::flow::reduce_scatter`], the join arm and the `chunk_done` task; the next chunk starts
//! on each column when its `chunk_done` ends. What each step costs is read off the program in
//! `matmul.rs` instruction by instruction (the task bodies are the reference).

use std::ops::Range;

use wafersim_sim::FabricConfig;

use super::{MatmulPlan, MatmulShape};
use crate::Precision;
use crate::flow;
use crate::layout::Split;
use crate::load::{StreamLoad, StreamTerms};

/// Instruction costs of the fabric.
struct Costs<'a> {
    config: &'a FabricConfig,
}

impl Costs<'_> {
    fn switch(&self) -> u64 {
        u64::from(self.config.task_switch_cycles)
    }

    fn issue(&self) -> u64 {
        u64::from(self.config.issue_cycles)
    }

    /// One vector instruction over `len` elements at `width` per cycle.
    fn vector(&self, len: u64, width: u32) -> u64 {
        self.config.vector_cycles(len, width)
    }

    /// The weight task(s) of one kept entry on a PE with `t` tokens: decode the index (1 cycle
    /// of scalar work) and one AXPY of length `t`; in fp32 an index-only task comes first.
    fn per_entry(&self, precision: Precision, t: u64) -> u64 {
        let simd = &self.config.simd;
        match precision {
            Precision::F16 => self.switch() + 1 + self.vector(t, simd.fmac_mixed),
            Precision::F32 => 2 * self.switch() + 1 + self.vector(t, simd.fmac_f32),
        }
    }

    /// A join arm: load, decrement, store the counter.
    fn arm(&self) -> u64 {
        self.switch() + 2 * self.issue()
    }
}

/// Items of `a` also in `b`.
fn overlap(a: &Range<usize>, b: Range<usize>) -> u64 {
    a.end.min(b.end).saturating_sub(a.start.max(b.start)) as u64
}

/// The last block of `split` with the most items.
fn last_largest(split: Split) -> usize {
    match split.total % split.parts {
        0 => split.parts - 1,
        extra => extra - 1,
    }
}

/// The end-of-chunk task of PE column `c`: copy its own piece of the chunk into `Y`, then issue
/// the reduce-scatter (a counter store and one issue per operation).
fn end_task(costs: &Costs<'_>, outs: Split, chunk: &Range<usize>, c: usize, t: u64) -> u64 {
    let cols = outs.parts;
    let own = overlap(chunk, outs.block(c));
    let copy = if own > 0 {
        costs.vector(own * t, costs.config.simd.mov_f32)
    } else {
        0
    };
    // One operation per other block the chunk touches, and the own block's sends east and west.
    let touched = outs.blocks_overlapping(chunk) as u64;
    let ops = if own > 0 {
        touched - 1 + u64::from(c > 0) + u64::from(c + 1 < cols)
    } else {
        touched
    };
    let join = if ops > 0 {
        costs.issue() * (1 + ops)
    } else {
        0
    };
    costs.switch() + copy + join
}

/// The `chunk_done` task: clear the partial sums; after the last chunk, add the bias to the
/// PE's own output columns.
fn chunk_done(costs: &Costs<'_>, plan: &MatmulPlan, bias_columns: u64, t: u64) -> u64 {
    let chunk_max = plan.chunks.iter().map(Range::len).max().unwrap_or(0) as u64;
    let simd = &costs.config.simd;
    let bias = bias_columns * (costs.issue() + costs.vector(t, simd.arith_f32));
    costs.switch() + costs.vector(chunk_max * t, simd.mov_f32) + bias
}

/// The per-entry cost on the slowest row (the last with the most tokens) and the fill: the
/// first wavelet reaching that row, `hop (1 + y) + ramp` after the start.
pub(super) fn terms(config: &FabricConfig, shape: &MatmulShape, plan: &MatmulPlan) -> StreamTerms {
    let costs = Costs { config };
    let tokens = plan.input.tokens;
    let row = u64::from(shape.region.origin.y) + last_largest(tokens) as u64;
    StreamTerms {
        per_entry: costs.per_entry(shape.precision, tokens.max_len() as u64),
        fill_drain: u64::from(config.hop_latency) * (1 + row) + u64::from(config.ramp_latency),
    }
}

/// Core cycles of the tasks each PE column runs (on its slowest row), by the same terms as
/// [`estimate`]: the weight tasks, the end-of-chunk task, the join arm and `chunk_done` of
/// every chunk. The reductions' transfers are asynchronous and not counted.
pub(super) fn busy_per_column(
    config: &FabricConfig,
    shape: &MatmulShape,
    plan: &MatmulPlan,
    load: &StreamLoad,
) -> Vec<u64> {
    let costs = Costs { config };
    let cols = shape.region.cols as usize;
    let t = plan.input.tokens.max_len() as u64;
    let entry = terms(config, shape, plan).per_entry;
    let outs = plan.output.features;
    let arm = if cols > 1 { costs.arm() } else { 0 };
    (0..cols)
        .map(|c| {
            let bias = if shape.bias {
                outs.block(c).len() as u64
            } else {
                0
            };
            let chunks = plan.chunks.iter().enumerate().map(|(j, chunk)| {
                let last = j + 1 == plan.chunks.len();
                load.get(j, c) * entry
                    + end_task(&costs, outs, chunk, c, t)
                    + arm
                    + chunk_done(&costs, plan, if last { bias } else { 0 }, t)
            });
            chunks.sum()
        })
        .collect()
}

pub(super) fn estimate(
    config: &FabricConfig,
    shape: &MatmulShape,
    plan: &MatmulPlan,
    load: &StreamLoad,
) -> u64 {
    let costs = Costs { config };
    let cols = shape.region.cols as usize;
    let t = plan.input.tokens.max_len() as u64;
    let StreamTerms {
        per_entry: entry,
        fill_drain: first,
    } = terms(config, shape, plan);
    let outs = plan.output.features;
    let mut resume = vec![first; cols];
    for (j, chunk) in plan.chunks.iter().enumerate() {
        let issue: Vec<u64> = (0..cols)
            .map(|c| resume[c] + load.get(j, c) * entry + end_task(&costs, outs, chunk, c, t))
            .collect();
        let joined: Vec<u64> = if cols == 1 {
            issue
        } else {
            let segments: Vec<u64> = (0..cols)
                .map(|b| overlap(chunk, outs.block(b)) * t)
                .collect();
            flow::reduce_scatter(config, &issue, &segments)
                .into_iter()
                .map(|done| done - 1 + costs.arm())
                .collect()
        };
        let last = j + 1 == plan.chunks.len();
        resume = (0..cols)
            .map(|c| {
                let bias = if last && shape.bias {
                    outs.block(c).len() as u64
                } else {
                    0
                };
                joined[c] + chunk_done(&costs, plan, bias, t)
            })
            .collect();
    }
    resume.into_iter().max().unwrap_or(0)
}
