//! The weight matrices kernels stream: only their kept entries, column by column.
//!
//! A [`StreamedMatrix`] is `K x N` (input features by output features, the `X W` convention)
//! stored compressed by output column. Which entries are kept is the caller's mask, not the
//! values: a kept weight that happens to be `0.0` is still streamed (it still gets a gradient),
//! and a pruned one never is.

/// A `rows x cols` matrix holding only its kept entries, compressed by column.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamedMatrix {
    rows: usize,
    cols: usize,
    /// Entries of column `n` are `col_start[n] .. col_start[n + 1]`.
    col_start: Vec<usize>,
    /// Row of each entry, increasing within a column.
    row: Vec<u32>,
    value: Vec<f32>,
}

impl StreamedMatrix {
    /// The entries of the row-major `data` where `keep` is true (every entry when `keep` is
    /// `None`).
    pub fn from_dense(rows: usize, cols: usize, data: &[f32], keep: Option<&[bool]>) -> Self {
        assert_eq!(data.len(), rows * cols, "data is not {rows} x {cols}");
        if let Some(k) = keep {
            assert_eq!(k.len(), data.len(), "mask is not {rows} x {cols}");
        }
        let mut col_start = Vec::with_capacity(cols + 1);
        let (mut row, mut value) = (Vec::new(), Vec::new());
        col_start.push(0);
        for n in 0..cols {
            for k in 0..rows {
                let i = k * cols + n;
                if keep.is_none_or(|keep| keep[i]) {
                    row.push(k as u32);
                    value.push(data[i]);
                }
            }
            col_start.push(row.len());
        }
        StreamedMatrix {
            rows,
            cols,
            col_start,
            row,
            value,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Number of kept entries.
    pub fn nnz(&self) -> usize {
        self.value.len()
    }

    /// Whether every entry is kept: then the matrix streams exactly what its dense form does.
    pub fn keeps_every_entry(&self) -> bool {
        self.nnz() == self.rows * self.cols
    }

    /// `(row, value)` of the kept entries of column `n`, by increasing row.
    pub fn column(&self, n: usize) -> impl Iterator<Item = (usize, f32)> + '_ {
        let range = self.col_start[n]..self.col_start[n + 1];
        self.row[range.clone()]
            .iter()
            .zip(&self.value[range])
            .map(|(&r, &v)| (r as usize, v))
    }

    /// The transpose (`cols x rows`) with the same kept entries.
    pub fn transpose(&self) -> StreamedMatrix {
        let mut count = vec![0usize; self.rows + 1];
        for &r in &self.row {
            count[r as usize + 1] += 1;
        }
        for i in 0..self.rows {
            count[i + 1] += count[i];
        }
        let col_start = count.clone();
        let mut next = count;
        let mut row = vec![0u32; self.nnz()];
        let mut value = vec![0f32; self.nnz()];
        for n in 0..self.cols {
            for (r, v) in self.column(n) {
                let slot = next[r];
                row[slot] = n as u32;
                value[slot] = v;
                next[r] += 1;
            }
        }
        StreamedMatrix {
            rows: self.cols,
            cols: self.rows,
            col_start,
            row,
            value,
        }
    }

    /// The matrix as row-major dense values (pruned entries 0).
    pub fn to_dense(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for n in 0..self.cols {
            for (r, v) in self.column(n) {
                out[r * self.cols + n] = v;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_zeros_stay_and_pruned_entries_go() {
        // [[1, 0], [2, 3]] keeping all but (1, 1): the kept 0.0 at (0, 1) is still an entry.
        let m = StreamedMatrix::from_dense(
            2,
            2,
            &[1.0, 0.0, 2.0, 3.0],
            Some(&[true, true, true, false]),
        );
        assert_eq!(m.nnz(), 3);
        assert_eq!(m.column(0).collect::<Vec<_>>(), vec![(0, 1.0), (1, 2.0)]);
        assert_eq!(m.column(1).collect::<Vec<_>>(), vec![(0, 0.0)]);
        assert_eq!(m.to_dense(), vec![1.0, 0.0, 2.0, 0.0]);
    }

    #[test]
    fn transpose_moves_every_entry() {
        let data: Vec<f32> = (0..12).map(|v| v as f32 + 1.0).collect();
        let keep: Vec<bool> = (0..12).map(|i| i % 3 != 1).collect();
        let m = StreamedMatrix::from_dense(3, 4, &data, Some(&keep));
        let t = m.transpose();
        assert_eq!((t.rows(), t.cols(), t.nnz()), (4, 3, m.nnz()));
        let (d, dt) = (m.to_dense(), t.to_dense());
        for r in 0..3 {
            for c in 0..4 {
                assert_eq!(d[r * 4 + c], dt[c * 3 + r]);
            }
        }
        assert_eq!(t.transpose(), m);
    }
}
