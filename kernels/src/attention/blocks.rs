//! Where things sit for the blocked attention: which kernel run gathers each region row's K and
//! V, and what one PE's compute sees in one run (the keys of each of its segments, where they
//! land in its block window, where their scores go).
//!
//! The blocked kernels cut each PE's window ([`Geometry::window`]) into *key blocks* of at most
//! `block_rows` region rows of each sequence's rows, so a PE holds the K and V, and the scores
//! (or probabilities), of one block per run only: `block_rows` rows, or up to about twice that
//! for a row whose tokens end one sequence and start the next (it takes part in both
//! sequences' runs). The SRAM counts (`runs_sizes`) use each run's real sizes. Run `k` gathers the rows whose *run*
//! ([`Geometry::run_of`]) is `k`: a row's run counts blocks of `block_rows` rows from the first
//! row of its own window. Every PE that keeps a row in its window receives it in that row's run,
//! so a run's gather is the full gather ([`crate::vchain::VerticalChain::all_gather`]) restricted
//! to the owners of that run: their reaches are the full gather's, so they stay monotone and
//! every PE of a chain passes the same ones.
//!
//! What it is not: no instruction is issued here (build-time bookkeeping only), and it does not
//! decide `block_rows` (the kernel's planner does, from the SRAM).
//!
//! Key design decision: runs are counted per window, not over the whole region. Rows of one
//! sequence share a window, so all sequences of a pass are processed side by side, run after
//! run; a global cut (rows `k B .. (k + 1) B` in run `k`) would leave every sequence but one
//! idle in each run. The price: a row whose tokens start a sequence has the previous sequence's
//! window, so its run is counted from there, and the keys of a segment in one run need not be
//! contiguous positions. The online softmax does not care in which order or grouping keys come,
//! and the causal mask is applied per key from its position.

use wafersim_sim::{Buf, VecRef};

use super::geometry::{Geometry, KeyAt, LocalHead, heads_where};

/// One key of a segment in a run: where its K and V sit in the block window, and its position
/// in its sequence (for the causal mask).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RunKey {
    pub at: KeyAt,
    pub pos: u32,
}

/// A run of one PE's tokens lying in one sequence, with the keys of that sequence the run
/// brings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct RunSegment {
    /// First token, among the PE's tokens.
    pub start: u32,
    /// Tokens in the run.
    pub len: u32,
    /// Position of the first token in its sequence.
    pub first_pos: u32,
    /// The sequence's keys gathered in this run, in position order.
    pub keys: Vec<RunKey>,
    /// Offset of the segment's `[key][token]` scores within one head's scores.
    pub scores_at: u32,
}

/// What one PE's compute tasks need in one run.
#[derive(Clone, Debug)]
pub(super) struct RunWork {
    /// Tokens on the PE.
    pub n: u32,
    /// Features on the PE.
    pub fc: u32,
    /// The heads with features on the PE, in head order.
    pub heads: Vec<LocalHead>,
    pub scale: f32,
    /// Only the segments this run brings keys to.
    pub segments: Vec<RunSegment>,
    /// Elements of one head's scores in this run (`sum of keys x len` over the segments).
    pub head_scores: u32,
    /// The longest segment (scratch rows).
    pub longest: u32,
    /// Whether no later run brings this PE keys: it normalises its output at the end.
    pub last: bool,
}

/// A row's sizes in one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RunSizes {
    /// Tokens of the block window.
    pub window: usize,
    /// Scores of one head (`sum of keys x len` over the segments).
    pub head_scores: usize,
}

impl RunWork {
    /// The local heads shared with other columns, with their index among the local heads.
    pub fn shared_heads(&self) -> impl Iterator<Item = (u32, &LocalHead)> {
        heads_where(&self.heads, true)
    }

    /// The local heads no other column holds, with their index among the local heads.
    pub fn whole_heads(&self) -> impl Iterator<Item = (u32, &LocalHead)> {
        heads_where(&self.heads, false)
    }

    /// Local feature `f` of the segment's tokens in a feature-major tile.
    pub fn tokens(&self, tile: Buf, f: u32, seg: &RunSegment) -> VecRef {
        tile.slice(f * self.n + seg.start, seg.len)
    }

    /// Local head `i`'s statistic of the segment's tokens (`[head][token]`).
    pub fn statistic(&self, buf: Buf, i: u32, seg: &RunSegment) -> VecRef {
        buf.slice(i * self.n + seg.start, seg.len)
    }
}

impl Geometry {
    /// The run that gathers row `b`'s K and V: blocks of `block_rows` rows counted from the
    /// first row of `b`'s window (`block_rows >= 1`).
    pub fn run_of(&self, b: usize, block_rows: usize) -> usize {
        (b - self.window(b).start) / block_rows
    }

    /// Runs the blocked kernels take: one more than the largest run of any row.
    pub fn runs(&self, block_rows: usize) -> usize {
        (0..self.rows)
            .map(|b| self.run_of(b, block_rows) + 1)
            .max()
            .unwrap_or(0)
    }

    /// The rows of row `r`'s window gathered in run `k`, in order.
    pub fn run_window(&self, r: usize, k: usize, block_rows: usize) -> Vec<usize> {
        self.window(r)
            .filter(|&b| self.run_of(b, block_rows) == k)
            .collect()
    }

    /// The last run that brings row `r` keys.
    pub fn last_run(&self, r: usize, block_rows: usize) -> usize {
        self.window(r)
            .map(|b| self.run_of(b, block_rows))
            .max()
            .unwrap_or(0)
    }

    /// Offset of owner `b`'s slot in PE (c, r)'s block window of run `k` (`b` gathered there).
    pub fn run_slot(&self, c: usize, r: usize, k: usize, block_rows: usize, b: usize) -> u32 {
        self.run_window(r, k, block_rows)
            .into_iter()
            .take_while(|&x| x < b)
            .map(|x| self.slot_len(c, x))
            .sum()
    }

    /// Elements of PE (c, r)'s block window in run `k`.
    pub fn run_window_len(&self, c: usize, r: usize, k: usize, block_rows: usize) -> usize {
        self.run_window(r, k, block_rows)
            .into_iter()
            .map(|b| self.slot_len(c, b) as usize)
            .sum()
    }

    /// For each of PE (c, r)'s softmax statistics (per local head, per token: `[head][token]`),
    /// its index in the host's `[batch][head][query]` array.
    pub fn statistics_indices(&self, c: usize, r: usize) -> Vec<usize> {
        let mut out = Vec::new();
        for head in self.local_heads(c) {
            for token in self.tokens(r) {
                let (sequence, pos) = (token / self.seq, token % self.seq);
                out.push((sequence * self.heads + head.head as usize) * self.seq + pos);
            }
        }
        out
    }

    /// Row `r`'s sizes in run `k`, counted without building its key tables: the tokens of its
    /// block window and the scores of one head.
    pub fn run_sizes(&self, r: usize, k: usize, block_rows: usize) -> RunSizes {
        self.runs_sizes(r, block_rows)
            .get(k)
            .copied()
            .unwrap_or(RunSizes {
                window: 0,
                head_scores: 0,
            })
    }

    /// Row `r`'s sizes in each of its runs (index = run, up to its last), in one pass over its
    /// window.
    pub fn runs_sizes(&self, r: usize, block_rows: usize) -> Vec<RunSizes> {
        let empty = RunSizes {
            window: 0,
            head_scores: 0,
        };
        let mut sizes = vec![empty; self.last_run(r, block_rows) + 1];
        let segments = self.segments(r);
        for b in self.window(r) {
            let run = &mut sizes[self.run_of(b, block_rows)];
            let t = self.tokens(b);
            run.window += t.len();
            for seg in &segments {
                let s = seg.sequence as usize;
                let keys = t
                    .end
                    .min((s + 1) * self.seq)
                    .saturating_sub(t.start.max(s * self.seq));
                run.head_scores += keys * seg.len as usize;
            }
        }
        sizes
    }

    /// Everything PE (c, r)'s compute needs in run `k`.
    pub fn run_work(&self, c: usize, r: usize, k: usize, block_rows: usize, scale: f32) -> RunWork {
        // Each owner with its slot's offset in the block window (`run_slot`, summed once).
        let mut at = 0;
        let owners: Vec<(usize, u32)> = self
            .run_window(r, k, block_rows)
            .into_iter()
            .map(|b| {
                let base = at;
                at += self.slot_len(c, b);
                (b, base)
            })
            .collect();
        let mut segments = Vec::new();
        let mut scores_at = 0;
        for seg in self.segments(r) {
            let keys = self.run_keys(&owners, seg.sequence as usize);
            if keys.is_empty() {
                continue;
            }
            let len = seg.len;
            segments.push(RunSegment {
                start: seg.start,
                len,
                first_pos: seg.first_pos,
                scores_at,
                keys,
            });
            let last = segments.last().map_or(0, |s| s.keys.len() as u32 * len);
            scores_at += last;
        }
        RunWork {
            n: self.n(r) as u32,
            fc: self.fc(c) as u32,
            heads: self.local_heads(c),
            scale,
            longest: self.longest_segment(r) as u32,
            head_scores: scores_at,
            segments,
            last: self.last_run(r, block_rows) == k,
        }
    }

    /// The keys of sequence `s` in `owners` (a run's owner rows with their slots' offsets in
    /// the PE's block window), where they sit in that window.
    fn run_keys(&self, owners: &[(usize, u32)], s: usize) -> Vec<RunKey> {
        let sequence = s * self.seq..(s + 1) * self.seq;
        let mut keys = Vec::new();
        for &(b, base) in owners {
            let tokens = self.tokens(b);
            let rows = tokens.len() as u32;
            for (off, token) in tokens.enumerate() {
                if sequence.contains(&token) {
                    keys.push(RunKey {
                        at: KeyAt::new(base, rows, off as u32),
                        pos: (token - sequence.start) as u32,
                    });
                }
            }
        }
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Region;

    /// The rows of a column's runs together gather each window row exactly once, and each
    /// segment meets every key of its sequence exactly once, whatever the block size.
    #[test]
    fn runs_cover_every_window_row_and_key_once() {
        // 3 sequences of 10 tokens over 7 rows (5, 5, 4, 4, 4, 4, 4 tokens): rows 1, 3 and 5
        // hold the ends of one sequence and the starts of the next.
        let g = Geometry::new(Region::at_origin(2, 7), 30, 10, 2, 4);
        for block_rows in 1..=4 {
            for r in 0..7 {
                let mut rows: Vec<usize> = (0..g.runs(block_rows))
                    .flat_map(|k| g.run_window(r, k, block_rows))
                    .collect();
                rows.sort_unstable();
                assert_eq!(
                    rows,
                    g.window(r).collect::<Vec<_>>(),
                    "row {r}, B {block_rows}"
                );
                for k in 0..g.runs(block_rows) {
                    let sizes = g.run_sizes(r, k, block_rows);
                    let work = g.run_work(1, r, k, block_rows, 1.0);
                    assert_eq!(sizes.head_scores, work.head_scores as usize);
                    let window = g.run_window_len(1, r, k, block_rows);
                    assert_eq!(2 * g.fc(1) * sizes.window, window);
                }
                for seg in g.segments(r) {
                    let mut positions: Vec<u32> = (0..g.runs(block_rows))
                        .flat_map(|k| g.run_work(1, r, k, block_rows, 1.0).segments)
                        .filter(|s| s.start == seg.start)
                        .flat_map(|s| s.keys.into_iter().map(|key| key.pos))
                        .collect();
                    positions.sort_unstable();
                    assert_eq!(positions, (0..10).collect::<Vec<_>>());
                }
            }
        }
    }

    #[test]
    fn a_row_starting_a_sequence_counts_its_run_from_the_previous_one() {
        // Same cut: row 1 holds tokens 5-9 (sequence 0), row 2 tokens 10-13 (sequence 1), row
        // 3 tokens 14-17 (14-19 of sequence 1 end in row 4: 18, 19; 20, 21 start sequence 2).
        let g = Geometry::new(Region::at_origin(2, 7), 30, 10, 2, 4);
        assert_eq!(g.window(2), 2..5);
        assert_eq!(g.window(4), 2..7);
        // With blocks of 2 rows: rows 2, 3 run 0 and row 4 run 1 (from row 2's window); row 5
        // (tokens 22-25) counts from row 4, sequence 2's first row: run 0, row 6 run 1.
        let runs: Vec<usize> = (0..7).map(|b| g.run_of(b, 2)).collect();
        assert_eq!(runs, vec![0, 0, 0, 0, 1, 0, 1]);
        assert_eq!(g.runs(2), 2);
        // Row 5's window is rows 4-6: row 5 in run 0, then rows 4 and 6 in run 1: sequence
        // 2's positions 0, 1 (row 4's tokens 20, 21) and 6-9 (row 6), not contiguous.
        assert_eq!(g.run_window(5, 0, 2), vec![5]);
        assert_eq!(g.run_window(5, 1, 2), vec![4, 6]);
        let work = g.run_work(0, 5, 1, 2, 1.0);
        assert_eq!(work.segments.len(), 1);
        let pos: Vec<u32> = work.segments[0].keys.iter().map(|k| k.pos).collect();
        assert_eq!(pos, vec![0, 1, 6, 7, 8, 9]);
        assert!(work.last);
        assert!(!g.run_work(0, 5, 0, 2, 1.0).last);
        // Token 20 is at offset 2 of row 4's 4-token tile, whose slot comes first in the block
        // window: K feature 1 at 1 x 4 + 2. Row 6's slot follows row 4's 2 x 4 x 4 elements
        // (8 features over 2 columns): token 26 (position 6), V feature 0 at 32 + 4 x 4 + 0.
        assert_eq!(work.segments[0].keys[0].at.k(1), 6);
        assert_eq!(work.segments[0].keys[2].at.v(0, 4), 48);
        // 6 keys for the row's one segment of 4 tokens.
        assert_eq!(work.head_scores, 6 * 4);
    }
}
