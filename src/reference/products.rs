//! Plain products on row-major `f32` matrices, in `f64`: the oracle for single-layer fabric runs
//! (`wafersim gemm`).

/// `X W` for `X` `t x k` and `W` `k x n` (row-major), in `f64`.
pub fn matmul(x: &[f32], w: &[f32], t: usize, k: usize, n: usize) -> Vec<f64> {
    assert_eq!(
        (x.len(), w.len()),
        (t * k, k * n),
        "matmul operands are not {t}x{k} and {k}x{n}"
    );
    let mut y = vec![0.0; t * n];
    for row in 0..t {
        for j in 0..k {
            let xv = f64::from(x[row * k + j]);
            for col in 0..n {
                y[row * n + col] += xv * f64::from(w[j * n + col]);
            }
        }
    }
    y
}

/// `X^T dY` (`k x n`) kept only where `keep` is true, in `f64`.
pub fn masked_weight_grad(
    x: &[f32],
    dy: &[f32],
    keep: &[bool],
    t: usize,
    k: usize,
    n: usize,
) -> Vec<f64> {
    assert_eq!(
        (x.len(), dy.len(), keep.len()),
        (t * k, t * n, k * n),
        "operand shapes"
    );
    let mut g = vec![0.0; k * n];
    for row in 0..t {
        for j in 0..k {
            let xv = f64::from(x[row * k + j]);
            for col in 0..n {
                g[j * n + col] += xv * f64::from(dy[row * n + col]);
            }
        }
    }
    for (v, &kept) in g.iter_mut().zip(keep) {
        if !kept {
            *v = 0.0;
        }
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_products_by_hand() {
        // [[1, 2], [3, 4]] [[5, 6], [7, 8]] = [[19, 22], [43, 50]].
        assert_eq!(
            matmul(&[1., 2., 3., 4.], &[5., 6., 7., 8.], 2, 2, 2),
            vec![19., 22., 43., 50.]
        );
        // X^T dY with X = [[1, 2], [3, 4]], dY = [[5, 6], [7, 8]]: [[26, 30], [38, 44]], masked.
        let keep = [true, false, true, true];
        assert_eq!(
            masked_weight_grad(&[1., 2., 3., 4.], &[5., 6., 7., 8.], &keep, 2, 2, 2),
            vec![26., 0., 38., 44.]
        );
    }
}
