//! The analytic cycle count of a masked weight gradient
//! ([`super::WeightGradShape::estimate_cycles`]).
//!
//! Chunk by chunk, per PE column, for the first region row (the source of the column chains)
//! and the last (where the chains end): the `next_chunk` task and the row's all-gather of `dY`
//! ([`crate::flow::all_gather`]), the `gathered` task, one index task per kept entry, the
//! end-of-chunk task, the column chain carrying the chunk's gradients south (the last row's part
//! waits for the first row's `(rows - 1)` hops away), and the join arm; after the last chunk the
//! bias sums and their chain, and the last wavelets' trip to the sink below the region. What each
//! step costs is read off the task bodies in `weight_grad.rs`.

use std::ops::Range;

use wafersim_sim::FabricConfig;

use super::{WeightGradPlan, WeightGradShape};
use crate::Precision;
use crate::flow;
use crate::layout::Split;
use crate::load::{StreamLoad, StreamTerms};

/// Instruction costs of the fabric for this kernel.
struct Costs<'a> {
    config: &'a FabricConfig,
    precision: Precision,
    /// Tokens of the largest tile.
    t: u64,
}

impl Costs<'_> {
    fn switch(&self) -> u64 {
        u64::from(self.config.task_switch_cycles)
    }

    fn issue(&self) -> u64 {
        u64::from(self.config.issue_cycles)
    }

    fn vector(&self, len: u64, width: u32) -> u64 {
        self.config.vector_cycles(len, width)
    }

    /// One index task: decode (1 cycle), a dot product over the tokens, store the result.
    fn per_entry(&self) -> u64 {
        let simd = &self.config.simd;
        let width = match self.precision {
            Precision::F32 => simd.fmac_f32,
            Precision::F16 => simd.fmac_mixed,
        };
        self.switch() + 1 + self.vector(self.t, width) + self.issue()
    }

    fn arm(&self) -> u64 {
        self.switch() + 2 * self.issue()
    }

    /// `next_chunk` for `chunk` on PE column `c`: copy its own `dY` piece into the gathered
    /// buffer, then issue the all-gather (a counter store and one issue per operation).
    fn next_chunk(&self, outs: Split, chunk: &Range<usize>, c: usize) -> u64 {
        let cols = outs.parts;
        let simd = &self.config.simd;
        let own = overlap(chunk, outs.block(c));
        let mov = match self.precision {
            Precision::F32 => simd.mov_f32,
            Precision::F16 => simd.mov_f16,
        };
        let copy = if own > 0 {
            self.vector(own * self.t, mov)
        } else {
            0
        };
        let touched = outs.blocks_overlapping(chunk) as u64;
        let others = touched - u64::from(own > 0);
        let sends = if own > 0 {
            u64::from(c > 0) + u64::from(c + 1 < cols)
        } else {
            0
        };
        let ops = others + sends;
        let join = if ops > 0 { self.issue() * (1 + ops) } else { 0 };
        self.switch() + copy + join
    }

    /// The last `next_chunk`: with the bias, sum each own `dY` column and issue its chain.
    fn finish(&self, own_columns: u64, bias: bool) -> u64 {
        if !bias {
            return self.switch();
        }
        let width = match self.precision {
            Precision::F32 => self.config.simd.arith_f32,
            Precision::F16 => self.config.simd.arith_f16,
        };
        self.switch() + own_columns * (self.vector(self.t, width) + self.issue()) + self.issue()
    }
}

/// Items of `a` also in `b`.
fn overlap(a: &Range<usize>, b: Range<usize>) -> u64 {
    a.end.min(b.end).saturating_sub(a.start.max(b.start)) as u64
}

/// The fabric's column geometry: region rows, the cycles of one core-to-core hop, and from a
/// last-row core's push to the sink at the fabric's south edge.
struct Column {
    rows: u64,
    hop: u64,
    exit: u64,
}

impl Column {
    fn new(config: &FabricConfig, shape: &WeightGradShape) -> Self {
        let region = shape.region;
        let below = u64::from(config.height.saturating_sub(region.origin.y + region.rows));
        Column {
            rows: u64::from(region.rows),
            hop: flow::core_to_core(config),
            exit: u64::from(config.ramp_latency) + u64::from(config.hop_latency) * (1 + below),
        }
    }

    /// When the first and the last row finish a chain of `len` values they issued at `top` and
    /// `bottom` (one past the last cycle; the issue times if there is nothing to send).
    fn reduce(&self, top: u64, bottom: u64, len: u64) -> (u64, u64) {
        if len == 0 {
            return (top, bottom);
        }
        let down = top + (self.rows - 1) * self.hop;
        (top + len + 1, bottom.max(down) + len + 1)
    }
}

/// One region row's chunk on every column: from `resume` (its `next_chunk` starting) to the
/// issue of its column reduction.
fn row_chunk(
    costs: &Costs<'_>,
    outs: Split,
    chunk: &Range<usize>,
    entries: &[u64],
    resume: &[u64],
) -> Vec<u64> {
    let cols = resume.len();
    let issued: Vec<u64> = (0..cols)
        .map(|c| resume[c] + costs.next_chunk(outs, chunk, c))
        .collect();
    let segments: Vec<u64> = (0..cols)
        .map(|b| overlap(chunk, outs.block(b)) * costs.t)
        .collect();
    let gathered: Vec<u64> = if cols == 1 {
        issued
    } else {
        flow::all_gather(costs.config, &issued, &segments)
            .into_iter()
            .map(|done| done - 1 + costs.arm())
            .collect()
    };
    (0..cols)
        .map(|c| {
            let end_task = if entries[c] > 0 {
                costs.switch() + 2 * costs.issue()
            } else {
                costs.switch()
            };
            gathered[c] + costs.switch() + entries[c] * costs.per_entry() + end_task
        })
        .collect()
}

/// The per-entry cost (an index task on the largest tile) and the drain: the last gradient
/// wavelet's trip from the last region row to the sink, `ramp + hop (1 + rows below)`.
pub(super) fn terms(
    config: &FabricConfig,
    shape: &WeightGradShape,
    plan: &WeightGradPlan,
) -> StreamTerms {
    let costs = Costs {
        config,
        precision: shape.precision,
        t: plan.input.tokens.max_len() as u64,
    };
    StreamTerms {
        per_entry: costs.per_entry(),
        fill_drain: Column::new(config, shape).exit,
    }
}

/// Core cycles of the tasks each PE column runs (its first row), by the same terms as
/// [`estimate`]: per chunk `next_chunk`, the join arm, `gathered`, the index tasks, the
/// end-of-chunk task and its arm; then the bias sums. Transfers are asynchronous, not counted.
pub(super) fn busy_per_column(
    config: &FabricConfig,
    shape: &WeightGradShape,
    plan: &WeightGradPlan,
    load: &StreamLoad,
) -> Vec<u64> {
    let costs = Costs {
        config,
        precision: shape.precision,
        t: plan.input.tokens.max_len() as u64,
    };
    let cols = shape.region.cols as usize;
    let outs = plan.output.features;
    let gather_arm = if cols > 1 { costs.arm() } else { 0 };
    (0..cols)
        .map(|c| {
            let chunks: u64 = plan
                .chunks
                .iter()
                .enumerate()
                .map(|(j, chunk)| {
                    let entries = load.get(j, c);
                    let (end_task, arm) = if entries > 0 {
                        (costs.switch() + 2 * costs.issue(), costs.arm())
                    } else {
                        (costs.switch(), 0)
                    };
                    costs.next_chunk(outs, chunk, c)
                        + gather_arm
                        + costs.switch()
                        + entries * costs.per_entry()
                        + end_task
                        + arm
                })
                .sum();
            chunks + costs.finish(outs.block(c).len() as u64, shape.bias)
        })
        .collect()
}

pub(super) fn estimate(
    config: &FabricConfig,
    shape: &WeightGradShape,
    plan: &WeightGradPlan,
    load: &StreamLoad,
) -> u64 {
    let costs = Costs {
        config,
        precision: shape.precision,
        t: plan.input.tokens.max_len() as u64,
    };
    let column = Column::new(config, shape);
    let cols = shape.region.cols as usize;
    let outs = plan.output.features;
    let (mut top, mut bottom) = (vec![0; cols], vec![0; cols]);
    let mut arrived = 0;
    for (j, chunk) in plan.chunks.iter().enumerate() {
        let entries: Vec<u64> = (0..cols).map(|c| load.get(j, c)).collect();
        let top_issue = row_chunk(&costs, outs, chunk, &entries, &top);
        let bottom_issue = row_chunk(&costs, outs, chunk, &entries, &bottom);
        for c in 0..cols {
            let (t, b) = column.reduce(top_issue[c], bottom_issue[c], entries[c]);
            let joined = |done: u64| {
                if entries[c] > 0 {
                    done - 1 + costs.arm()
                } else {
                    done
                }
            };
            (top[c], bottom[c]) = (joined(t), joined(b));
            if entries[c] > 0 {
                arrived = arrived.max(b - 1 + column.exit);
            }
        }
    }
    let mut end = arrived;
    for c in 0..cols {
        let own = outs.block(c).len() as u64;
        let finish = costs.finish(own, shape.bias);
        end = end.max(bottom[c] + finish);
        if shape.bias {
            let (_, b) = column.reduce(top[c] + finish, bottom[c] + finish, own);
            end = end.max(b - 1 + column.exit);
        }
    }
    end
}
