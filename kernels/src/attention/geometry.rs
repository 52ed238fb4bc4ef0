//! Where things sit for the attention kernels: each PE's sequence segments, its window of gathered
//! keys (which region rows' K and V it keeps, and where each key's values land), and the host
//! order of the attention probabilities it holds.
//!
//! What it is not: no instruction is issued here; this is build-time bookkeeping (the constants a
//! compiled program would carry), shared by the forward and backward kernels and by their cost
//! formulas.
//!
//! Key design decision: a window is made of whole row tiles, not just the tokens of the PE's
//! sequences, so each slot is exactly what its owner row sends (one gather operation fills it)
//! and the partial dK, dV of a slot is exactly what its owner row receives.

use std::ops::Range;

use crate::layout::{Region, Tiling};

/// Where one key's K and V values sit in a PE's window (and its partial dK, dV in the backward's
/// partial buffer, which has the window's layout). A window is one slot per region row it keeps:
/// `[K tile | V tile]` of that row, each feature-major over the row's tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct KeyAt {
    /// Offset of the key's row slot in the window.
    base: u32,
    /// Tokens of that row (the stride between features).
    rows: u32,
    /// The key's position among that row's tokens.
    off: u32,
}

impl KeyAt {
    /// Window offset of local feature `f` of the key's K.
    pub fn k(self, f: u32) -> u32 {
        self.base + f * self.rows + self.off
    }

    /// Window offset of local feature `f` of the key's V (`fc` features per tile).
    pub fn v(self, f: u32, fc: u32) -> u32 {
        self.base + (fc + f) * self.rows + self.off
    }
}

/// A run of one PE's tokens lying in one sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Segment {
    /// First token, among the PE's tokens.
    pub start: u32,
    /// Tokens in the run.
    pub len: u32,
    /// The sequence.
    pub sequence: u32,
    /// Position of the first token in its sequence.
    pub first_pos: u32,
    /// Index in the PE's key table of key 0 of the sequence.
    pub keys: u32,
}

/// What one PE's compute task needs to know.
#[derive(Clone, Debug)]
pub(super) struct PeWork {
    /// Tokens on the PE.
    pub n: u32,
    /// Features on the PE (`heads * hd`).
    pub fc: u32,
    /// Features per head.
    pub hd: u32,
    /// Heads on the PE.
    pub heads: u32,
    /// Keys per sequence.
    pub seq: u32,
    pub scale: f32,
    pub segments: Vec<Segment>,
    /// Every window token, in token order.
    pub keys: Vec<KeyAt>,
}

/// The attention problem cut over a region.
#[derive(Clone, Debug)]
pub(super) struct Geometry {
    pub tiling: Tiling,
    pub seq: usize,
    pub heads_local: usize,
    pub hd: usize,
    /// Features per PE column.
    pub fc: usize,
    pub rows: usize,
}

impl Geometry {
    /// `tokens = batch * seq` tokens of `heads * hd` features over `region`; the caller has
    /// checked that the region's columns divide the heads.
    pub fn new(region: Region, tokens: usize, seq: usize, heads: usize, hd: usize) -> Self {
        let heads_local = heads / region.cols as usize;
        Geometry {
            tiling: Tiling::new(region, tokens, heads * hd),
            seq,
            heads_local,
            hd,
            fc: heads_local * hd,
            rows: region.rows as usize,
        }
    }

    /// Tokens of region row `r`.
    pub fn tokens(&self, r: usize) -> Range<usize> {
        self.tiling.tokens.block(r)
    }

    /// Tokens of region row `r`, as a count.
    pub fn n(&self, r: usize) -> usize {
        self.tokens(r).len()
    }

    /// The region rows whose K and V row `r` keeps: those holding any token of a sequence that
    /// row `r`'s tokens touch.
    pub fn window(&self, r: usize) -> Range<usize> {
        let t = self.tokens(r);
        let first_seq = t.start / self.seq;
        let last_seq = (t.end - 1) / self.seq;
        let owner = |i: usize| self.tiling.tokens.owner(i);
        owner(first_seq * self.seq)..owner((last_seq + 1) * self.seq - 1) + 1
    }

    /// Tokens in row `r`'s window.
    pub fn window_tokens(&self, r: usize) -> usize {
        self.window(r).map(|b| self.n(b)).sum()
    }

    /// Elements of row `b`'s slot (its K and V tiles).
    pub fn slot_len(&self, b: usize) -> u32 {
        (2 * self.fc * self.n(b)) as u32
    }

    /// Offset of row `b`'s slot in row `r`'s window (`b` in the window).
    pub fn slot(&self, r: usize, b: usize) -> u32 {
        (self.window(r).start..b).map(|x| self.slot_len(x)).sum()
    }

    /// The rows whose window holds row `b`: those that receive its K and V in the gather and
    /// contribute partial dK, dV to it. That is row `b`'s own window: `b` is in row `r`'s window
    /// exactly when the sequences the two rows touch overlap, which is symmetric. Contiguous, and
    /// monotone in `b` (windows' starts and ends never decrease from one row to the next), as
    /// the column chains require.
    pub fn reach(&self, b: usize) -> Range<usize> {
        self.window(b)
    }

    /// Row `r`'s tokens cut by sequence.
    pub fn segments(&self, r: usize) -> Vec<Segment> {
        let t = self.tokens(r);
        let win_start = self.tokens(self.window(r).start).start;
        let mut out = Vec::new();
        let mut g = t.start;
        while g < t.end {
            let s = g / self.seq;
            let end = t.end.min((s + 1) * self.seq);
            out.push(Segment {
                start: (g - t.start) as u32,
                len: (end - g) as u32,
                sequence: s as u32,
                first_pos: (g - s * self.seq) as u32,
                keys: (s * self.seq - win_start) as u32,
            });
            g = end;
        }
        out
    }

    /// The longest of row `r`'s segments.
    pub fn longest_segment(&self, r: usize) -> usize {
        self.segments(r)
            .iter()
            .map(|s| s.len as usize)
            .max()
            .unwrap_or(0)
    }

    /// Where every token of row `r`'s window sits in the window.
    fn keys(&self, r: usize) -> Vec<KeyAt> {
        self.window(r)
            .flat_map(|b| {
                let (base, rows) = (self.slot(r, b), self.n(b) as u32);
                (0..rows).map(move |off| KeyAt { base, rows, off })
            })
            .collect()
    }

    /// Everything row `r`'s compute task needs.
    pub fn work(&self, r: usize, scale: f32) -> PeWork {
        PeWork {
            n: self.n(r) as u32,
            fc: self.fc as u32,
            hd: self.hd as u32,
            heads: self.heads_local as u32,
            seq: self.seq as u32,
            scale,
            segments: self.segments(r),
            keys: self.keys(r),
        }
    }

    /// Elements of a PE's probabilities on row `r`: `heads x tokens x keys`.
    pub fn probs_len(&self, r: usize) -> usize {
        self.heads_local * self.n(r) * self.seq
    }

    /// For each element of PE (c, r)'s probabilities, in its order (per local head, per segment,
    /// key-major `[key][token]`), the index in the host's `[batch][head][query][key]` array of
    /// `heads` heads.
    pub fn probs_indices(&self, heads: usize, c: usize, r: usize) -> Vec<usize> {
        let s = self.seq;
        let mut out = Vec::with_capacity(self.probs_len(r));
        for h in 0..self.heads_local {
            let head = c * self.heads_local + h;
            for seg in self.segments(r) {
                let plane = (seg.sequence as usize * heads + head) * s * s;
                for j in 0..s {
                    for t in 0..seg.len as usize {
                        let query = seg.first_pos as usize + t;
                        out.push(plane + query * s + j);
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2 sequences of 7 tokens over 3 rows (5, 5, 4 tokens): row 0 holds 0-4 (sequence 0),
    /// row 1 holds 5-9 (5-6 of sequence 0, 7-9 of sequence 1), row 2 holds 10-13 (sequence 1).
    #[test]
    fn windows_segments_and_keys_of_rows_that_split_sequences() {
        let g = Geometry::new(Region::at_origin(1, 3), 14, 7, 2, 4);
        assert_eq!(g.fc, 8);
        // Row 0 needs sequence 0 = tokens 0-6 = rows 0-1; row 2 sequence 1 = rows 1-2.
        assert_eq!(g.window(0), 0..2);
        assert_eq!(g.window_tokens(0), 10);
        assert_eq!(g.window(1), 0..3);
        assert_eq!(g.window(2), 1..3);
        // So row 0's K and V go to rows 0-1, row 1's everywhere, row 2's to rows 1-2: each
        // row's reach is the set of rows whose window holds it.
        for b in 0..3 {
            let holders: Vec<usize> = (0..3).filter(|&r| g.window(r).contains(&b)).collect();
            assert_eq!(holders, g.reach(b).collect::<Vec<_>>(), "row {b}");
        }
        let segs = g.segments(1);
        assert_eq!(segs.len(), 2);
        assert_eq!((segs[0].start, segs[0].len, segs[0].first_pos), (0, 2, 5));
        assert_eq!((segs[1].start, segs[1].len, segs[1].first_pos), (2, 3, 0));
        // Sequence 1 starts at token 7: key index 7 of row 1's table (window starts at 0).
        assert_eq!(segs[1].keys, 7);
        // Row 2's window starts at token 5 (row 1): sequence 1's key 0 is its entry 2.
        assert_eq!(g.segments(2)[0].keys, 2);
        // Token 7 in row 1's window: row 1's slot starts after row 0's 2 x 8 x 5 = 80 elements;
        // it is token 2 of row 1 (stride 5): K feature 3 at 80 + 3 x 5 + 2, V feature 3 at
        // 80 + (8 + 3) x 5 + 2.
        let key = g.work(1, 1.0).keys[7];
        assert_eq!(key.k(3), 97);
        assert_eq!(key.v(3, 8), 137);
    }

    #[test]
    fn probability_indices_cover_each_kept_entry_once() {
        // B = 2, S = 5, 2 heads over 2 columns, 3 rows: the PEs' probabilities together hold
        // every (sequence, head, query, key) entry exactly once.
        let g = Geometry::new(Region::at_origin(2, 3), 10, 5, 2, 3);
        let mut seen = [0u8; 2 * 2 * 5 * 5];
        for c in 0..2 {
            for r in 0..3 {
                let idx = g.probs_indices(2, c, r);
                assert_eq!(idx.len(), g.probs_len(r));
                for i in idx {
                    seen[i] += 1;
                }
            }
        }
        assert!(seen.iter().all(|&s| s == 1));
    }
}
