//! The SRAM the blocked attention kernels need on a PE, from the shape alone: per run, per
//! kernel (forward, the backward's prelude, a backward run), what they allocate and how much of
//! it a training step keeps resident anyway (the Q, K, V and output tiles, the softmax
//! statistics), so that a compiler can pick the largest key block that fits beside the resident
//! activations.
//!
//! What it is not: the kernels' own fit check (`plan` in `blocked.rs` and `blocked_backward.rs`
//! count the same elements with these functions) or a cost model.
//!
//! Key design decision: one function per kernel gives both the total and the resident part, so
//! the totals the kernels check and the scratch a step adds can never disagree.

use wafersim_sim::FabricConfig;

use super::blocks::RunSizes;
use super::{AttentionShape, ColumnFacts, Geometry, geometry};
use crate::error::KernelError;
use crate::layout::Region;

/// One PE's f32 elements in one run of one kernel, and how many of them a training step keeps
/// resident between its forward and backward passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Elements {
    pub total: u64,
    pub resident: u64,
}

impl Elements {
    fn scratch(self) -> u64 {
        self.total - self.resident
    }
}

/// What a PE's buffers depend on in its row, in one run.
#[derive(Clone, Copy, Debug)]
pub(super) struct RowSizes {
    pub n: u64,
    pub longest: u64,
    /// Tokens of the run's block window.
    pub window: u64,
    /// Scores of one head in the run.
    pub scores: u64,
}

impl RowSizes {
    pub fn of(g: &Geometry, r: usize, sizes: RunSizes) -> Self {
        RowSizes {
            n: g.n(r) as u64,
            longest: g.longest_segment(r) as u64,
            window: sizes.window as u64,
            scores: sizes.head_scores as u64,
        }
    }
}

/// A forward run: Q, K, V, O tiles and the statistics (resident); the block window, the
/// scores, two rows of the longest segment and one of the tokens, the join counter and a group
/// counter.
pub(super) fn forward(col: ColumnFacts, row: RowSizes) -> Elements {
    let resident = 4 * col.fc * row.n + 2 * col.heads * row.n;
    let scratch = 2 * col.fc * row.window
        + col.heads * row.scores
        + 2 * row.longest
        + row.n
        + 1
        + col.counter;
    Elements {
        total: resident + scratch,
        resident,
    }
}

/// A backward run: Q, K, V tiles and the statistics (resident: the maximum and the sum, whose
/// reciprocal takes the sum's place); dO, `D`, the block window and partial dK, dV, the scores
/// and dP, dQ, dK, dV, the join counter and a group counter.
pub(super) fn backward(col: ColumnFacts, row: RowSizes) -> Elements {
    let resident = 3 * col.fc * row.n + 2 * col.heads * row.n;
    let scratch = col.fc * (4 * row.n + 4 * row.window)
        + col.heads * (row.n + 2 * row.scores)
        + 1
        + col.counter;
    Elements {
        total: resident + scratch,
        resident,
    }
}

/// The backward's prelude: O and the sums (resident); dO, `D`, a row of the tokens and a group
/// counter.
pub(super) fn prelude(col: ColumnFacts, n: u64) -> Elements {
    let resident = col.fc * n + col.heads * n;
    let scratch = col.fc * n + col.heads * n + n + col.counter;
    Elements {
        total: resident + scratch,
        resident,
    }
}

/// The SRAM the blocked kernels need on the fullest PE of a region, for one block size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockedMemory {
    /// Bytes of the forward's fullest run.
    pub forward_bytes: u64,
    /// Bytes of the backward's fullest run (its prelude included).
    pub backward_bytes: u64,
    /// The most either kernel holds beyond the Q, K, V and output tiles and the softmax
    /// statistics: what a step that keeps those needs on top of them.
    pub scratch_bytes: u64,
}

/// The distinct column facts of a region (a few: the columns' widths and heads take two or three
/// values), so that a pass over rows and runs need not visit every column.
fn distinct_columns(g: &Geometry) -> Vec<ColumnFacts> {
    let mut columns: Vec<ColumnFacts> = Vec::new();
    for c in 0..g.cols {
        let col = ColumnFacts::of(g, c);
        if !columns.contains(&col) {
            columns.push(col);
        }
    }
    columns
}

/// `(forward total, backward total, scratch of either)` on the fullest PE and run, in elements.
fn fullest_runs(g: &Geometry, block_rows: usize) -> (u64, u64, u64) {
    let columns = distinct_columns(g);
    let mut most = (0, 0, 0);
    for r in 0..g.rows {
        for sizes in g.runs_sizes(r, block_rows) {
            if sizes.window == 0 {
                continue;
            }
            let row = RowSizes::of(g, r, sizes);
            for &col in &columns {
                let (f, b) = (forward(col, row), backward(col, row));
                most.0 = most.0.max(f.total);
                most.1 = most.1.max(b.total);
                most.2 = most.2.max(f.scratch()).max(b.scratch());
            }
        }
    }
    most
}

impl AttentionShape {
    /// The SRAM the blocked kernels need on `region` with `block_rows` rows per key block (the
    /// fullest PE of each); an error when the region refuses the shape.
    pub fn blocked_memory(
        &self,
        config: &FabricConfig,
        region: Region,
        block_rows: usize,
    ) -> Result<BlockedMemory, KernelError> {
        let g = geometry(super::BLOCKED_KERNEL, config, region, self)?;
        let block_rows = block_rows.max(1);
        let most_tokens = (0..g.rows).map(|r| g.n(r) as u64).max().unwrap_or(0);
        let (prelude_total, prelude_scratch) = distinct_columns(&g)
            .into_iter()
            .map(|col| prelude(col, most_tokens))
            .fold((0, 0), |(t, s), e| (t.max(e.total), s.max(e.scratch())));
        let (forward_total, backward_total, scratch) = fullest_runs(&g, block_rows);
        Ok(BlockedMemory {
            forward_bytes: 4 * forward_total,
            backward_bytes: 4 * backward_total.max(prelude_total),
            scratch_bytes: 4 * scratch.max(prelude_scratch),
        })
    }

    /// The most region rows per key block (up to the region's rows) whose kernels hold at most
    /// `scratch_bytes` beyond what a step keeps resident, if one row per block does.
    pub fn largest_block_rows(
        &self,
        config: &FabricConfig,
        region: Region,
        scratch_bytes: u64,
    ) -> Result<Option<usize>, KernelError> {
        let fits = |rows: usize| -> Result<bool, KernelError> {
            Ok(self.blocked_memory(config, region, rows)?.scratch_bytes <= scratch_bytes)
        };
        if !fits(1)? {
            return Ok(None);
        }
        // The scratch grows with the block (its window and scores: more rows per run never
        // shrink a run's window), so a bisection finds the largest that fits; every size it
        // returns was itself found to fit.
        let (mut fitting, mut too_many) = (1, region.rows as usize + 1);
        while too_many - fitting > 1 {
            let mid = fitting + (too_many - fitting) / 2;
            if fits(mid)? {
                fitting = mid;
            } else {
                too_many = mid;
            }
        }
        Ok(Some(fitting))
    }
}
