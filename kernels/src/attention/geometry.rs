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
    /// Token `off` of a row slot of `rows` tokens at window offset `base`.
    pub fn new(base: u32, rows: u32, off: u32) -> Self {
        KeyAt { base, rows, off }
    }

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

/// A head whose features lie (partly) on one PE column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct LocalHead {
    /// The head.
    pub head: u32,
    /// Its first feature on the column, as an offset in the column's tile.
    pub first: u32,
    /// Its features on the column.
    pub dims: u32,
    /// The region columns holding any of its features: partial scores are summed over them.
    pub group: Range<usize>,
}

impl LocalHead {
    /// Whether other columns hold features of the head too.
    pub fn shared(&self) -> bool {
        self.group.len() > 1
    }
}

/// What one PE's compute task needs to know.
#[derive(Clone, Debug)]
pub(super) struct PeWork {
    /// Tokens on the PE.
    pub n: u32,
    /// Features on the PE.
    pub fc: u32,
    /// The heads with features on the PE, in head order (the order of the probabilities).
    pub heads: Vec<LocalHead>,
    /// Keys per sequence.
    pub seq: u32,
    pub scale: f32,
    pub segments: Vec<Segment>,
    /// Every window token, in token order.
    pub keys: Vec<KeyAt>,
}

impl PeWork {
    /// The local heads shared with other columns, with their index among the local heads.
    pub fn shared_heads(&self) -> impl Iterator<Item = (u32, &LocalHead)> {
        heads_where(&self.heads, true)
    }

    /// The local heads no other column holds, with their index among the local heads.
    pub fn whole_heads(&self) -> impl Iterator<Item = (u32, &LocalHead)> {
        heads_where(&self.heads, false)
    }
}

/// The heads of `heads` that other columns share (or not), with their index in `heads`.
pub(super) fn heads_where(
    heads: &[LocalHead],
    shared: bool,
) -> impl Iterator<Item = (u32, &LocalHead)> {
    let indexed = heads.iter().enumerate().map(|(i, h)| (i as u32, h));
    indexed.filter(move |(_, h)| h.shared() == shared)
}

/// The attention problem cut over a region.
#[derive(Clone, Debug)]
pub(super) struct Geometry {
    pub tiling: Tiling,
    pub seq: usize,
    pub heads: usize,
    pub hd: usize,
    pub rows: usize,
    pub cols: usize,
}

impl Geometry {
    /// `tokens = batch * seq` tokens of `heads * hd` features over `region` (the caller has
    /// checked that the region has no more columns than features).
    pub fn new(region: Region, tokens: usize, seq: usize, heads: usize, hd: usize) -> Self {
        Geometry {
            tiling: Tiling::new(region, tokens, heads * hd),
            seq,
            heads,
            hd,
            rows: region.rows as usize,
            cols: region.cols as usize,
        }
    }

    /// Features of PE column `c`.
    pub fn fc(&self, c: usize) -> usize {
        self.tiling.features.block(c).len()
    }

    /// The region columns holding features of head `h`.
    pub fn head_columns(&self, h: usize) -> Range<usize> {
        let owner = |f: usize| self.tiling.features.owner(f);
        owner(h * self.hd)..owner((h + 1) * self.hd - 1) + 1
    }

    /// The heads with features on column `c`, in head order.
    pub fn local_heads(&self, c: usize) -> Vec<LocalHead> {
        let f = self.tiling.features.block(c);
        if f.is_empty() {
            return Vec::new();
        }
        (f.start / self.hd..=(f.end - 1) / self.hd)
            .map(|h| {
                let lo = f.start.max(h * self.hd);
                let hi = f.end.min((h + 1) * self.hd);
                LocalHead {
                    head: h as u32,
                    first: (lo - f.start) as u32,
                    dims: (hi - lo) as u32,
                    group: self.head_columns(h),
                }
            })
            .collect()
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

    /// Elements of row `b`'s slot (its K and V tiles) in column `c`.
    pub fn slot_len(&self, c: usize, b: usize) -> u32 {
        (2 * self.fc(c) * self.n(b)) as u32
    }

    /// Offset of row `b`'s slot in row `r`'s window in column `c` (`b` in the window).
    pub fn slot(&self, c: usize, r: usize, b: usize) -> u32 {
        (self.window(r).start..b).map(|x| self.slot_len(c, x)).sum()
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

    /// Where every token of row `r`'s window sits in column `c`'s window.
    fn keys(&self, c: usize, r: usize) -> Vec<KeyAt> {
        self.window(r)
            .flat_map(|b| {
                let (base, rows) = (self.slot(c, r, b), self.n(b) as u32);
                (0..rows).map(move |off| KeyAt { base, rows, off })
            })
            .collect()
    }

    /// Everything PE (c, r)'s compute tasks need.
    pub fn work(&self, c: usize, r: usize, scale: f32) -> PeWork {
        PeWork {
            n: self.n(r) as u32,
            fc: self.fc(c) as u32,
            heads: self.local_heads(c),
            seq: self.seq as u32,
            scale,
            segments: self.segments(r),
            keys: self.keys(c, r),
        }
    }

    /// Elements of one head's probabilities (or dP) on row `r`: `tokens x keys`.
    pub fn head_block_len(&self, r: usize) -> usize {
        self.n(r) * self.seq
    }

    /// Elements of PE (c, r)'s probabilities: `local heads x tokens x keys`.
    pub fn probs_len(&self, c: usize, r: usize) -> usize {
        self.local_heads(c).len() * self.head_block_len(r)
    }

    /// For each element of PE (c, r)'s probabilities, in its order (per local head, per segment,
    /// key-major `[key][token]`), the index in the host's `[batch][head][query][key]` array.
    pub fn probs_indices(&self, c: usize, r: usize) -> Vec<usize> {
        let s = self.seq;
        let mut out = Vec::with_capacity(self.probs_len(c, r));
        for local in self.local_heads(c) {
            let head = local.head as usize;
            for seg in self.segments(r) {
                let plane = (seg.sequence as usize * self.heads + head) * s * s;
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
        assert_eq!(g.fc(0), 8);
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
        let key = g.work(0, 1, 1.0).keys[7];
        assert_eq!(key.k(3), 97);
        assert_eq!(key.v(3, 8), 137);
    }

    #[test]
    fn heads_split_by_the_feature_split() {
        // 3 heads of 4 (12 features) over 5 columns: 3, 3, 2, 2, 2 features. Column 1 holds
        // features 3-5: the last of head 0 and the first two of head 1.
        let g = Geometry::new(Region::at_origin(5, 1), 4, 4, 3, 4);
        let heads = g.local_heads(1);
        let summary: Vec<_> = heads
            .iter()
            .map(|h| (h.head, h.first, h.dims, h.group.clone()))
            .collect();
        assert_eq!(summary, vec![(0, 0, 1, 0..2), (1, 1, 2, 1..3)]);
        assert!(heads.iter().all(LocalHead::shared));
        // Head 2 is features 8-11: columns 3 (8-9) and 4 (10-11).
        assert_eq!(g.head_columns(2), 3..5);
        assert_eq!(g.local_heads(4)[0].first, 0);
        // Slots follow the column's width: 2 x 2 features x 4 tokens on column 4.
        assert_eq!(g.slot_len(4, 0), 16);
        // Whole heads on columns dividing the heads: 4 heads of 2 over 2 columns.
        let g = Geometry::new(Region::at_origin(2, 1), 4, 4, 4, 2);
        let heads = g.local_heads(1);
        assert_eq!(heads.len(), 2);
        assert_eq!(
            (heads[1].head, heads[1].first, heads[1].group.clone()),
            (3, 2, 1..2)
        );
        assert!(!heads[0].shared());
    }

    #[test]
    fn probability_indices_cover_each_kept_entry_once_per_column_of_its_head() {
        // B = 2, S = 5, 2 heads of 3 over 2 columns and 3 rows: the PEs' probabilities together
        // hold every (sequence, head, query, key) entry exactly once.
        let g = Geometry::new(Region::at_origin(2, 3), 10, 5, 2, 3);
        let count = |g: &Geometry| {
            let mut seen = [0u8; 2 * 2 * 5 * 5];
            for c in 0..g.cols {
                for r in 0..3 {
                    let idx = g.probs_indices(c, r);
                    assert_eq!(idx.len(), g.probs_len(c, r));
                    for i in idx {
                        seen[i] += 1;
                    }
                }
            }
            seen
        };
        assert!(count(&g).iter().all(|&s| s == 1));
        // Over 4 columns (2, 2, 1, 1 features) head 0 is columns 0-1 and head 1 columns 1-3:
        // each column keeps the whole probabilities of its heads, so head 0's entries are held
        // twice and head 1's three times (planes of 25 entries, sequence-major).
        let g = Geometry::new(Region::at_origin(4, 3), 10, 5, 2, 3);
        for (plane, entries) in count(&g).chunks(25).enumerate() {
            let want = if plane % 2 == 0 { 2 } else { 3 };
            assert!(entries.iter().all(|&s| s == want), "plane {plane}");
        }
    }
}
