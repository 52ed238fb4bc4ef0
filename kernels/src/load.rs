//! How many kept entries of a streamed matrix each PE column receives in each chunk: the counts
//! the cost formulas of the weight-streamed kernels ([`crate::matmul`], [`crate::weight_grad`])
//! are computed from.
//!
//! Key design decision: the counts are built from `(row, column)` pairs, whatever holds them (a
//! [`StreamedMatrix`], a mask, or nothing at all for a dense matrix), so a fast timing mode can
//! cost a product without allocating its values.
//!
//! What this is not: a layout. The split of the input features over the region's columns and the
//! output-column chunks come from the kernel's plan.

use std::ops::Range;

use crate::layout::Split;
use crate::sparse::StreamedMatrix;

/// Kept entries per (chunk, PE column) of a `K x N` matrix whose rows (input features) are split
/// over the region's columns and whose columns (output features) are streamed in chunks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamLoad {
    cols: usize,
    /// `counts[chunk * cols + column]`.
    counts: Vec<u64>,
}

impl StreamLoad {
    /// Counts the pairs `(row, column)` of `entries` (every kept entry once): row `k` goes to the
    /// PE column owning it in `inputs`, column `n` to the chunk holding it. Pairs outside the
    /// matrix are ignored. O(entries + chunks x columns).
    pub fn from_entries(
        inputs: Split,
        chunks: &[Range<usize>],
        entries: impl IntoIterator<Item = (usize, usize)>,
    ) -> Self {
        let mut load = Self::zeros(inputs.parts, chunks.len());
        let rows = inputs.total;
        let Some(width) = chunks.first().map(|c| c.len().max(1)) else {
            return load;
        };
        let end = chunks.last().map_or(0, |c| c.end);
        for (k, n) in entries {
            if k < rows && n < end {
                let chunk = n / width;
                load.counts[chunk * load.cols + inputs.owner(k)] += 1;
            }
        }
        load
    }

    /// The counts of `w`'s kept entries.
    pub fn of_matrix(w: &StreamedMatrix, inputs: Split, chunks: &[Range<usize>]) -> Self {
        let entries = (0..w.cols()).flat_map(|n| w.column(n).map(move |(k, _)| (k, n)));
        Self::from_entries(inputs, chunks, entries)
    }

    /// Every entry kept: column `c` gets `|K_c| x |chunk|` entries per chunk.
    pub fn dense(inputs: Split, chunks: &[Range<usize>]) -> Self {
        let mut load = Self::zeros(inputs.parts, chunks.len());
        for (j, chunk) in chunks.iter().enumerate() {
            for c in 0..inputs.parts {
                load.counts[j * inputs.parts + c] = (inputs.block(c).len() * chunk.len()) as u64;
            }
        }
        load
    }

    /// Counts given per chunk and PE column: `counts[chunk * cols + column]` (a trailing partial
    /// chunk is dropped). For callers that count kept entries their own way, e.g. by popcount
    /// over a bitset.
    pub fn from_counts(cols: usize, mut counts: Vec<u64>) -> Self {
        let whole = counts.len() - counts.len() % cols.max(1);
        counts.truncate(whole);
        StreamLoad { cols, counts }
    }

    fn zeros(cols: usize, chunks: usize) -> Self {
        StreamLoad {
            cols,
            counts: vec![0; cols * chunks],
        }
    }

    /// PE columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Chunks.
    pub fn chunks(&self) -> usize {
        self.counts.len().checked_div(self.cols).unwrap_or(0)
    }

    /// Entries PE column `c` receives in chunk `j` (0 outside the counts).
    pub fn get(&self, j: usize, c: usize) -> u64 {
        if c >= self.cols {
            return 0;
        }
        self.counts.get(j * self.cols + c).copied().unwrap_or(0)
    }

    /// All kept entries.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Entries the busiest column receives beyond the mean, summed over the chunks, times the
    /// number of columns (an integer): `sum_j (cols x max_c n[j][c] - sum_c n[j][c])`. Each
    /// chunk's reduction waits for its busiest column, so this over `cols`, times the per-entry
    /// cost, is what the imbalance of the load costs.
    pub fn excess_over_mean_scaled(&self) -> u64 {
        let cols = self.cols.max(1) as u64;
        self.counts
            .chunks(self.cols.max(1))
            .map(|chunk| {
                let busiest = chunk.iter().copied().max().unwrap_or(0);
                cols * busiest - chunk.iter().sum::<u64>()
            })
            .sum()
    }
}

/// The terms of a weight-streamed kernel's cost formula that a breakdown of its cycles by cause
/// reads: what one kept entry costs and the kernel's fixed latencies. Computed by
/// `MatmulShape::terms` and `WeightGradShape::terms` from the same helpers as their
/// `estimate_cycles`, so the breakdown and the estimate cannot disagree on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamTerms {
    /// Core cycles of the task(s) one kept entry fires on the slowest row (task switch, index
    /// decode, the vector operation over the row's tokens, and in the weight gradient the store).
    pub per_entry: u64,
    /// Cycles of pipeline fill and drain: the stream's first wavelet reaching the slowest row
    /// (product) or the last gradient wavelet's trip from the region to the host (gradient).
    pub fill_drain: u64,
}

/// Kept entries of a matrix counted once per output column and PE column, so that the load of
/// any chunking follows in O(output columns x PE columns) without going over the entries again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnCounts {
    parts: usize,
    /// `counts[n * parts + c]`: entries of output column `n` in PE column `c`'s rows.
    counts: Vec<u64>,
}

impl ColumnCounts {
    /// A `rows x outs` matrix with row-major `keep` streamed as is: its rows (input features)
    /// split over `parts` PE columns, its columns the output features. O(rows x outs).
    pub fn streamed(rows: usize, outs: usize, keep: &[bool], parts: usize) -> Self {
        let split = Split::new(rows, parts);
        let mut counts = vec![0; outs * parts];
        for (k, row) in keep.chunks(outs.max(1)).take(rows).enumerate() {
            let block = split.owner(k);
            for (n, _) in row.iter().enumerate().filter(|(_, kept)| **kept) {
                counts[n * parts + block] += 1;
            }
        }
        ColumnCounts { parts, counts }
    }

    /// The same matrix streamed transposed (`outs x rows`): its columns split over the PE
    /// columns, its rows the output features.
    pub fn streamed_transposed(rows: usize, outs: usize, keep: &[bool], parts: usize) -> Self {
        let split = Split::new(outs, parts);
        let owner: Vec<usize> = (0..outs).map(|n| split.owner(n)).collect();
        let mut counts = vec![0; rows * parts];
        for (k, row) in keep.chunks(outs.max(1)).take(rows).enumerate() {
            for (n, _) in row.iter().enumerate().filter(|(_, kept)| **kept) {
                counts[k * parts + owner[n]] += 1;
            }
        }
        ColumnCounts { parts, counts }
    }

    /// [`Self::streamed`] and [`Self::streamed_transposed`] of the same matrix in one pass over
    /// `keep` (the mask is read once, for the cost of two counter updates per kept entry).
    pub fn both_ways(rows: usize, outs: usize, keep: &[bool], parts: usize) -> (Self, Self) {
        let (in_split, out_split) = (Split::new(rows, parts), Split::new(outs, parts));
        let owner: Vec<usize> = (0..outs).map(|n| out_split.owner(n)).collect();
        let mut forward = vec![0; outs * parts];
        let mut transposed = vec![0; rows * parts];
        for (k, row) in keep.chunks(outs.max(1)).take(rows).enumerate() {
            let block = in_split.owner(k);
            let per_k = &mut transposed[k * parts..(k + 1) * parts];
            for (n, _) in row.iter().enumerate().filter(|(_, kept)| **kept) {
                forward[n * parts + block] += 1;
                per_k[owner[n]] += 1;
            }
        }
        (
            ColumnCounts {
                parts,
                counts: forward,
            },
            ColumnCounts {
                parts,
                counts: transposed,
            },
        )
    }

    /// The counts per (chunk, PE column) of `chunks` of the output columns.
    pub fn load(&self, chunks: &[Range<usize>]) -> StreamLoad {
        let mut load = StreamLoad::zeros(self.parts, chunks.len());
        for (j, chunk) in chunks.iter().enumerate() {
            for n in chunk.clone() {
                let Some(row) = self.counts.get(n * self.parts..(n + 1) * self.parts) else {
                    break;
                };
                for (c, count) in row.iter().enumerate() {
                    load.counts[j * self.parts + c] += count;
                }
            }
        }
        load
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_land_in_their_column_block_and_chunk() {
        // K = 5 over 2 columns: rows 0-2 and 3-4; N = 5 in chunks 0..2, 2..4, 4..5.
        let inputs = Split::new(5, 2);
        let chunks = [0..2, 2..4, 4..5];
        let load = StreamLoad::from_entries(inputs, &chunks, [(0, 0), (4, 1), (2, 2), (3, 4)]);
        assert_eq!((load.get(0, 0), load.get(0, 1)), (1, 1));
        assert_eq!((load.get(1, 0), load.get(1, 1)), (1, 0));
        assert_eq!((load.get(2, 0), load.get(2, 1)), (0, 1));
        assert_eq!(load.total(), 4);
        // The same entries as a 5 x 5 mask, counted per output column first.
        let mut keep = vec![false; 25];
        for (k, n) in [(0, 0), (4, 1), (2, 2), (3, 4)] {
            keep[k * 5 + n] = true;
        }
        assert_eq!(ColumnCounts::streamed(5, 5, &keep, 2).load(&chunks), load);
        let (forward, transposed) = ColumnCounts::both_ways(5, 5, &keep, 2);
        assert_eq!(forward, ColumnCounts::streamed(5, 5, &keep, 2));
        assert_eq!(
            transposed,
            ColumnCounts::streamed_transposed(5, 5, &keep, 2)
        );
        // Transposed, row k is output column k and column n is split over the PE columns
        // (0-2, 3-4): (0, 0) and (2, 2) in block 0, (4, 1) in block 0, (3, 4) in block 1.
        let everything = std::iter::once(0..5).collect::<Vec<_>>();
        let t = ColumnCounts::streamed_transposed(5, 5, &keep, 2).load(&everything);
        assert_eq!((t.get(0, 0), t.get(0, 1)), (3, 1));
        // Dense: 3 x 2, 2 x 2 / 3 x 2, 2 x 2 / 3 x 1, 2 x 1.
        let dense = StreamLoad::dense(inputs, &chunks);
        assert_eq!(
            (0..3)
                .flat_map(|j| [dense.get(j, 0), dense.get(j, 1)])
                .collect::<Vec<_>>(),
            vec![6, 4, 6, 4, 3, 2]
        );
    }

    #[test]
    fn excess_over_mean_counts_the_busiest_column_per_chunk() {
        // Chunk 0: (3, 1) -> 2 x 3 - 4 = 2; chunk 1: (2, 2) -> 0; chunk 2: (0, 5) -> 10 - 5 = 5.
        let load = StreamLoad {
            cols: 2,
            counts: vec![3, 1, 2, 2, 0, 5],
        };
        assert_eq!(load.excess_over_mean_scaled(), 7);
        let even = StreamLoad::dense(Split::new(4, 2), &[0..3, 3..5]);
        assert_eq!(even.excess_over_mean_scaled(), 0);
    }

    #[test]
    fn a_matrix_counts_as_its_entries() {
        let keep = [true, false, true, true, true, false];
        let w = StreamedMatrix::from_dense(2, 3, &[1.0; 6], Some(&keep));
        let one_chunk = std::iter::once(0..3).collect::<Vec<_>>();
        let load = StreamLoad::of_matrix(&w, Split::new(2, 2), &one_chunk);
        // Row 0 keeps columns 0 and 2, row 1 keeps columns 0 and 1.
        assert_eq!((load.get(0, 0), load.get(0, 1)), (2, 2));
    }
}
