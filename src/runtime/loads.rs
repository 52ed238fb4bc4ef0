//! Kept entries per (chunk, PE column) of a masked matrix, counted from the mask's bits: the
//! loads the fast engine's weight-streamed kernels are costed from.
//!
//! Key design decision: nothing is listed. Streamed as is (forward, weight gradient), row `k`
//! of `W` goes to one PE column and its kept entries in a chunk of output columns are one
//! popcount; streamed transposed (input gradient), row `k` is one output column and its kept
//! entries are spread over the PE columns owning their column index. Either way the work is
//! O(weights / 64 + rows x chunks) or O(kept entries), with no per-matrix tables, so
//! MediSwift-XL's 1.2 B weights are counted in about a second.
//!
//! What this is not: a second definition of a load. The result equals
//! `ColumnCounts::streamed(..).load(chunks)` (and the transposed one) on the same mask, which the
//! tests check.

use std::ops::Range;

use wafersim_kernels::{Split, StreamLoad};

use crate::sparsity::Mask;

/// `mask` (`rows x cols`, `[in, out]`) streamed as is: its rows (input features) split over the
/// PE columns by `inputs`, its columns (output features) cut into `chunks`.
pub(crate) fn streamed(mask: &Mask, inputs: Split, chunks: &[Range<usize>]) -> StreamLoad {
    if mask.is_dense() {
        return StreamLoad::dense(inputs, chunks);
    }
    let parts = inputs.parts;
    let mut counts = vec![0; chunks.len() * parts];
    for c in 0..parts {
        for k in inputs.block(c) {
            for (j, chunk) in chunks.iter().enumerate() {
                counts[j * parts + c] += mask.kept_in_row(k, chunk.clone());
            }
        }
    }
    StreamLoad::from_counts(parts, counts)
}

/// `mask` streamed transposed (`W^T`, for `dX = dY W^T`): its columns split over the PE
/// columns by `inputs`, its rows cut into `chunks`.
pub(crate) fn transposed(mask: &Mask, inputs: Split, chunks: &[Range<usize>]) -> StreamLoad {
    if mask.is_dense() {
        return StreamLoad::dense(inputs, chunks);
    }
    let parts = inputs.parts;
    let owner: Vec<usize> = (0..mask.cols()).map(|n| inputs.owner(n)).collect();
    let mut counts = vec![0; chunks.len() * parts];
    for (j, chunk) in chunks.iter().enumerate() {
        let row = &mut counts[j * parts..(j + 1) * parts];
        for k in chunk.clone() {
            mask.for_each_kept_in_row(k, |n| {
                if let Some(count) = owner.get(n).and_then(|&c| row.get_mut(c)) {
                    *count += 1;
                }
            });
        }
    }
    StreamLoad::from_counts(parts, counts)
}

#[cfg(test)]
mod tests {
    use wafersim_kernels::ColumnCounts;

    use super::*;

    /// The popcount loads equal the per-entry counts of `ColumnCounts`, for uneven splits and
    /// chunks, rows not a multiple of 64 bits, and a dense mask.
    #[test]
    fn loads_equal_the_entry_counts() {
        for (rows, cols, parts, sparsity) in [(37, 70, 5, 0.6), (64, 64, 8, 0.9), (13, 200, 3, 0.0)]
        {
            let mask = Mask::random(rows, cols, sparsity, 4, 2).unwrap();
            let keep = mask.keep();
            let chunks_of = |n: usize, width: usize| -> Vec<Range<usize>> {
                (0..n.div_ceil(width))
                    .map(|j| j * width..((j + 1) * width).min(n))
                    .collect()
            };
            let (out_chunks, in_chunks) = (chunks_of(cols, 9), chunks_of(rows, 7));
            assert_eq!(
                streamed(&mask, Split::new(rows, parts), &out_chunks),
                ColumnCounts::streamed(rows, cols, &keep, parts).load(&out_chunks),
                "{rows}x{cols}"
            );
            assert_eq!(
                transposed(&mask, Split::new(cols, parts), &in_chunks),
                ColumnCounts::streamed_transposed(rows, cols, &keep, parts).load(&in_chunks),
                "{rows}x{cols} transposed"
            );
        }
    }
}
