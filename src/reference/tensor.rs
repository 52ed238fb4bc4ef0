//! The reference's working matrix: row-major `f64`, with conversions from and to the model's
//! `f32` [`Matrix`].
//!
//! Every activation and gradient of the reference lives in one of these. Only inputs (parameters)
//! are `f32`; they are widened where they are read.

use crate::model::Matrix;

/// A dense row-major `rows x cols` matrix of `f64`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Mat {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    pub fn at(&self, r: usize, c: usize) -> f64 {
        self.data[r * self.cols + c]
    }

    pub fn set(&mut self, r: usize, c: usize, value: f64) {
        self.data[r * self.cols + c] = value;
    }

    pub fn add_at(&mut self, r: usize, c: usize, value: f64) {
        self.data[r * self.cols + c] += value;
    }

    pub fn row(&self, r: usize) -> &[f64] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    /// Element-wise sum of two same-shaped matrices.
    pub fn plus(&self, other: &Mat) -> Mat {
        let data = self
            .data
            .iter()
            .zip(&other.data)
            .map(|(a, b)| a + b)
            .collect();
        Mat {
            rows: self.rows,
            cols: self.cols,
            data,
        }
    }

    /// Rounded to `f32`.
    pub fn to_matrix(&self) -> Matrix {
        Matrix {
            rows: self.rows,
            cols: self.cols,
            data: to_f32(&self.data),
        }
    }
}

/// Rounds a vector to `f32`.
pub(crate) fn to_f32(values: &[f64]) -> Vec<f32> {
    values.iter().map(|&x| x as f32).collect()
}
