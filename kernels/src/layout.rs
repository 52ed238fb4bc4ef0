//! Where data lives: fabric regions, near-equal splits, and the tiling of a `[T x F]` matrix over
//! a region.
//!
//! The one layout every kernel shares: tokens are split over the region's rows, features over
//! its columns, and each PE stores its tile *feature-major*, so the values of one feature for the
//! PE's tokens form one contiguous vector (one AXPY operand). A kernel whose output features are
//! split the way the next kernel splits its input features hands its output over in place.

use std::ops::Range;

use wafersim_sim::Coord;

/// A rectangle of PEs: `cols` columns by `rows` rows from `origin` (its north-west PE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub origin: Coord,
    pub cols: u32,
    pub rows: u32,
}

impl Region {
    /// The `cols x rows` rectangle at the fabric's north-west corner.
    pub fn at_origin(cols: u32, rows: u32) -> Self {
        Region {
            origin: Coord::new(0, 0),
            cols,
            rows,
        }
    }

    /// The PE at column `c`, row `r` of the region.
    pub fn pe(&self, c: u32, r: u32) -> Coord {
        Coord::new(self.origin.x + c, self.origin.y + r)
    }

    /// Number of PEs.
    pub fn pes(&self) -> u64 {
        u64::from(self.cols) * u64::from(self.rows)
    }
}

/// `total` items cut into `parts` contiguous blocks whose sizes differ by at most one (the first
/// `total % parts` blocks are one larger).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Split {
    pub total: usize,
    pub parts: usize,
}

impl Split {
    pub fn new(total: usize, parts: usize) -> Self {
        assert!(parts > 0, "a split needs at least one part");
        Split { total, parts }
    }

    /// The items of block `b`.
    pub fn block(&self, b: usize) -> Range<usize> {
        let base = self.total / self.parts;
        let extra = self.total % self.parts;
        let start = b * base + b.min(extra);
        start..start + base + usize::from(b < extra)
    }

    /// Size of the largest block.
    pub fn max_len(&self) -> usize {
        self.total.div_ceil(self.parts)
    }

    /// The block holding item `i`.
    pub fn owner(&self, i: usize) -> usize {
        let base = self.total / self.parts;
        let extra = self.total % self.parts;
        let big = extra * (base + 1);
        if i < big {
            i / (base + 1)
        } else {
            extra + (i - big) / base.max(1)
        }
    }

    /// How many nonempty blocks share an item with `range` (items past `total` ignored), in
    /// O(1): the blocks from the owner of its first item to that of its last (empty blocks come
    /// last, so none lies between).
    pub fn blocks_overlapping(&self, range: &Range<usize>) -> usize {
        let end = range.end.min(self.total);
        if range.start >= end || self.parts == 0 {
            return 0;
        }
        self.owner(end - 1) - self.owner(range.start) + 1
    }
}

/// A `[tokens x features]` matrix laid over a region: tokens by rows, features by columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    pub tokens: Split,
    pub features: Split,
}

impl Tiling {
    /// `tokens x features` over `region`.
    pub fn new(region: Region, tokens: usize, features: usize) -> Self {
        Tiling {
            tokens: Split::new(tokens, region.rows as usize),
            features: Split::new(features, region.cols as usize),
        }
    }

    /// The tile of PE column `c`, row `r` of the row-major matrix `m`, feature-major.
    pub fn tile(&self, m: &[f32], c: usize, r: usize) -> Vec<f32> {
        let (ts, fs) = (self.tokens.block(r), self.features.block(c));
        let width = self.features.total;
        fs.flat_map(|f| ts.clone().map(move |t| m[t * width + f]))
            .collect()
    }

    /// Writes a feature-major tile of PE column `c`, row `r` back into the row-major `m`.
    pub fn untile(&self, tile: &[f32], m: &mut [f32], c: usize, r: usize) {
        let (ts, fs) = (self.tokens.block(r), self.features.block(c));
        let (width, rows) = (self.features.total, ts.len());
        for (fi, f) in fs.enumerate() {
            for (ti, t) in ts.clone().enumerate() {
                m[t * width + f] = tile[fi * rows + ti];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn blocks_overlapping_counts_what_a_scan_of_the_blocks_counts() {
        for (total, parts) in [(10, 3), (7, 7), (3, 5), (2048, 750), (0, 4)] {
            let split = Split::new(total, parts);
            for start in 0..total.min(40) + 1 {
                for end in start..(total + 2).min(start + 60) {
                    let range = start..end;
                    let scan = (0..parts)
                        .filter(|&b| {
                            let blk = split.block(b);
                            blk.start.max(start) < blk.end.min(end)
                        })
                        .count();
                    assert_eq!(
                        split.blocks_overlapping(&range),
                        scan,
                        "{total}/{parts} {range:?}"
                    );
                }
            }
        }
    }

    use super::*;

    #[test]
    fn splits_cover_everything_once_with_sizes_within_one() {
        for total in 0..40 {
            for parts in 1..9 {
                let s = Split::new(total, parts);
                let mut next = 0;
                for b in 0..parts {
                    let r = s.block(b);
                    assert_eq!(r.start, next);
                    assert!(r.len() == total / parts || r.len() == total / parts + 1);
                    for i in r.clone() {
                        assert_eq!(s.owner(i), b, "total {total} parts {parts} item {i}");
                    }
                    next = r.end;
                }
                assert_eq!(next, total);
            }
        }
        // 10 over 4: 3, 3, 2, 2.
        assert_eq!(Split::new(10, 4).block(1), 3..6);
        assert_eq!(Split::new(10, 4).block(3), 8..10);
    }

    #[test]
    fn tiles_are_feature_major_and_untile_inverts_tile() {
        // 3 tokens x 4 features over 2 rows x 2 columns: PE (c 1, r 0) holds tokens 0-1,
        // features 2-3, as [f2 t0, f2 t1, f3 t0, f3 t1].
        let m: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let t = Tiling::new(Region::at_origin(2, 2), 3, 4);
        assert_eq!(t.tile(&m, 1, 0), vec![2.0, 6.0, 3.0, 7.0]);
        let mut back = vec![0.0; 12];
        for c in 0..2 {
            for r in 0..2 {
                t.untile(&t.tile(&m, c, r), &mut back, c, r);
            }
        }
        assert_eq!(back, m);
    }
}
