//! Tests of the mask rule: exact counts, the rounding rule, determinism, the one-stream-per-matrix
//! contract, uniformity of the chosen positions, the per-row law and the bitset helpers.

use super::*;
use crate::model::Matrix;

fn config(n_layer: usize, d: usize, n_inner: usize) -> GptConfig {
    GptConfig {
        n_layer,
        n_embd: d,
        n_head: 2,
        n_positions: 8,
        vocab_size: 11,
        n_inner,
        layer_norm_epsilon: 1e-5,
        scale_attn_weights: true,
    }
}

#[test]
fn validate_accepts_fractions_below_one_and_names_refused_values() {
    for ok in [0.0, 0.5, 0.75, 0.999_999] {
        assert_eq!(validate(ok), Ok(ok));
    }
    for bad in [-0.1, 1.0, 1.5, f64::INFINITY, f64::NEG_INFINITY] {
        assert_eq!(validate(bad), Err(SparsityError::OutOfRange { value: bad }));
    }
    let nan = validate(f64::NAN).unwrap_err();
    assert!(matches!(nan, SparsityError::OutOfRange { value } if value.is_nan()));
    assert_eq!(
        validate(1.0).unwrap_err().to_string(),
        "sparsity 1 is not a fraction in [0, 1)"
    );
}

#[test]
fn parse_sparsity_reads_text_and_refuses_non_numbers() {
    assert_eq!(parse_sparsity("0.75"), Ok(0.75));
    assert_eq!(parse_sparsity(" 0 "), Ok(0.0));
    assert_eq!(
        parse_sparsity("1"),
        Err(SparsityError::OutOfRange { value: 1.0 })
    );
    assert_eq!(
        parse_sparsity("half").unwrap_err().to_string(),
        "sparsity \"half\" is not a number"
    );
    assert!(matches!(
        parse_sparsity("NaN"),
        Err(SparsityError::OutOfRange { .. })
    ));
}

#[test]
fn pruned_count_rounds_the_product_half_away_from_zero() {
    // (numel, s, round(s * numel)); every product below is exact in f64.
    let cases = [
        (10, 0.25, 3),          // 2.5 -> 3 (ties-to-even would give 2)
        (4, 0.125, 1),          // 0.5 -> 1 (ties-to-even would give 0)
        (6, 0.25, 2),           // 1.5 -> 2
        (7, 0.5, 4),            // 3.5 -> 4
        (12, 0.5, 6),           // exact
        (3, 0.1, 0),            // 0.3 -> 0
        (1, 0.6, 1),            // 0.6 -> 1
        (0, 0.5, 0),            // empty matrix
        (100, 0.999, 100),      // 99.9 -> 100: everything pruned, still s < 1
        (64 * 64, 0.75, 3072),  // tiny preset Q
        (64 * 256, 0.9, 14746), // 14745.6 -> 14746
        (768 * 3072, 0.5, 1_179_648),
    ];
    for (numel, s, zeros) in cases {
        assert_eq!(pruned_count(numel, s), zeros, "numel {numel}, s {s}");
    }
}

#[test]
fn random_masks_have_exactly_the_rounded_number_of_zeros() {
    let cases = [
        (2, 5, 0.25, 3), // numel 10: round(2.5) = 3
        (1, 1, 0.4, 0),
        (1, 1, 0.6, 1),
        (8, 8, 0.5, 32),
        (16, 64, 0.75, 768),
        (64, 16, 0.9, 922), // 921.6
        (5, 7, 0.0, 0),
        (3, 3, 0.99, 9),
    ];
    for (rows, cols, s, zeros) in cases {
        for seed in [0, 1, 12345] {
            let mask = Mask::random(rows, cols, s, seed, 4).unwrap();
            assert_eq!(mask.zeros(), zeros, "{rows}x{cols} s={s} seed={seed}");
            assert_eq!(mask.nnz(), rows * cols - zeros);
            assert_eq!(
                (mask.rows(), mask.cols(), mask.numel()),
                (rows, cols, rows * cols)
            );
        }
    }
}

#[test]
fn model_masks_cover_the_six_matrices_of_every_block_at_exact_counts() {
    let c = config(3, 8, 24);
    let masks = ModelMasks::random(&c, 0.75, 7).unwrap();
    assert_eq!(masks.layers().len(), 3);
    for layer in 0..3 {
        for kind in SparseKind::ALL {
            let m = masks.get(layer, kind).unwrap();
            let shape = match kind {
                SparseKind::Fc => (8, 24),
                SparseKind::FcProj => (24, 8),
                _ => (8, 8),
            };
            assert_eq!((m.rows(), m.cols()), shape);
            // 64 * 0.75 = 48, 192 * 0.75 = 144
            assert_eq!(m.zeros(), if shape == (8, 8) { 48 } else { 144 });
        }
    }
    assert!(masks.get(3, SparseKind::Q).is_none());
    assert_eq!(masks.numel(), 3 * (4 * 64 + 2 * 192));
    assert_eq!(masks.nnz(), 3 * (4 * 16 + 2 * 48));
    assert_eq!(masks.sparsity(), 0.75);
    let dense = ModelMasks::dense(&c);
    assert_eq!(dense.nnz(), dense.numel());
    assert_eq!(dense.sparsity(), 0.0);
    assert_eq!(
        ModelMasks::random(&c, 1.0, 7),
        Err(SparsityError::OutOfRange { value: 1.0 })
    );
}

#[test]
fn masks_are_deterministic_in_the_seed() {
    let c = config(2, 8, 32);
    let a = ModelMasks::random(&c, 0.5, 42).unwrap();
    let b = ModelMasks::random(&c, 0.5, 42).unwrap();
    let other = ModelMasks::random(&c, 0.5, 43).unwrap();
    assert_eq!(a, b);
    // Two independent 50 % masks of 64 entries coincide with probability 1 / C(64, 32) ~ 1e-18.
    assert_ne!(a.get(0, SparseKind::Q), other.get(0, SparseKind::Q));
}

#[test]
fn each_matrix_uses_its_own_stream() {
    let c = config(2, 8, 32);
    let masks = ModelMasks::random(&c, 0.5, 9).unwrap();
    for layer in 0..2 {
        for kind in SparseKind::ALL {
            let m = masks.get(layer, kind).unwrap();
            let alone = Mask::random(
                m.rows(),
                m.cols(),
                0.5,
                9,
                (6 * layer + kind.index()) as u64,
            );
            assert_eq!(m, &alone.unwrap(), "layer {layer} {}", kind.name());
        }
    }
    // Same shape, different streams: different masks.
    assert_ne!(masks.get(0, SparseKind::Q), masks.get(0, SparseKind::K));
    assert_ne!(masks.get(0, SparseKind::Q), masks.get(1, SparseKind::Q));
}

#[test]
fn changing_one_matrix_shape_leaves_the_other_masks_alone() {
    let base = ModelMasks::random(&config(2, 8, 32), 0.5, 3).unwrap();
    // Wider FFN: only Fc and FcProj change shape.
    let wider = ModelMasks::random(&config(2, 8, 40), 0.5, 3).unwrap();
    // More layers: layers 0 and 1 keep their streams.
    let deeper = ModelMasks::random(&config(4, 8, 32), 0.5, 3).unwrap();
    for layer in 0..2 {
        for kind in [
            SparseKind::Q,
            SparseKind::K,
            SparseKind::V,
            SparseKind::AttnProj,
        ] {
            assert_eq!(base.get(layer, kind), wider.get(layer, kind));
        }
        assert_eq!(base.layers()[layer], deeper.layers()[layer]);
    }
}

/// Over many seeds, every position of a 4 x 5 matrix must be pruned equally often.
///
/// Derivation of the bounds. With `n` positions and `k` zeros per draw, each position is pruned
/// with probability `p = k / n`; over `N` independent draws its count `O_i` has mean `E = N p`
/// and variance `N p (1 - p)`, and `Cov(O_i, O_j) = -N p (1 - p) / (n - 1)` (sampling without
/// replacement: `P(i and j) = k (k-1) / (n (n-1))`). So `Z_i = (O_i - E) / sqrt(E)` has covariance
/// `a (I - 11^T / n)` with `a = (1 - p) n / (n - 1)`, and by the CLT the statistic
/// `X = sum_i Z_i^2` is `a` times a chi-square with `n - 1` degrees of freedom. For `n = 20`
/// (19 degrees of freedom) the 1e-4 and 0.9999 quantiles of chi-square are 3.97 and 50.80, so a
/// correct sampler falls outside `[3.97, 50.80]` for one seed range in 5000. A biased sampler
/// (say, one position 10 % too often: 100 counts at E = 1000, contributing 10 / a) or a
/// too-regular one (X near 0) fails.
#[test]
fn zero_positions_are_uniform_over_many_seeds() {
    let (rows, cols, n) = (4usize, 5usize, 20usize);
    let draws = 4000u64;
    for sparsity in [0.25, 0.75] {
        let k = pruned_count(n, sparsity);
        let mut counts = vec![0u64; n];
        for seed in 0..draws {
            let mask = Mask::random(rows, cols, sparsity, seed, 3).unwrap();
            for (i, &kept) in mask.keep().iter().enumerate() {
                counts[i] += u64::from(!kept);
            }
        }
        let p = k as f64 / n as f64;
        let expected = draws as f64 * p;
        let x: f64 = counts
            .iter()
            .map(|&o| (o as f64 - expected).powi(2) / expected)
            .sum();
        let a = (1.0 - p) * n as f64 / (n as f64 - 1.0);
        let chi2 = x / a;
        assert!(
            (3.97..50.80).contains(&chi2),
            "s = {sparsity}: chi-square {chi2} (19 dof), counts {counts:?}"
        );
    }
}

fn params_of_ones(c: &GptConfig) -> GptParams {
    let mut p = GptParams::zeros(c);
    for (_, t) in p.tensors_mut() {
        t.fill(1.0);
    }
    p
}

#[test]
fn apply_zeroes_exactly_the_pruned_weights_and_from_params_zeros_recovers_them() {
    let c = config(2, 8, 32);
    let masks = ModelMasks::random(&c, 0.75, 5).unwrap();
    let mut p = params_of_ones(&c);
    masks.apply(&mut p).unwrap();
    for (layer, block) in p.blocks.iter().enumerate() {
        for kind in SparseKind::ALL {
            let w = &block.linear(kind).weight;
            let m = masks.get(layer, kind).unwrap();
            for r in 0..w.rows {
                for col in 0..w.cols {
                    let expected = if m.is_kept(r, col) { 1.0 } else { 0.0 };
                    assert_eq!(w.at(r, col), expected);
                }
            }
            assert!(block.linear(kind).bias.iter().all(|&b| b == 1.0));
        }
        assert!(block.ln_1.gamma.iter().all(|&g| g == 1.0));
    }
    assert!(p.wte.data.iter().all(|&w| w == 1.0));
    let recovered = ModelMasks::from_params_zeros(&p);
    assert_eq!(recovered.layers(), masks.layers());
    // Every matrix has numel divisible by 4, so the measured fraction is exactly 0.75.
    assert_eq!(recovered.sparsity(), 0.75);
}

#[test]
fn is_kept_is_false_outside_the_matrix() {
    let m = Mask::dense(2, 3);
    assert!(m.is_kept(1, 2));
    assert!(!m.is_kept(2, 0));
    assert!(!m.is_kept(0, 3));
    assert_eq!(
        Mask::from_keep(2, 3, vec![true; 5]),
        Err(SparsityError::KeepLength {
            rows: 2,
            cols: 3,
            expected: 6,
            got: 5
        })
    );
    let m = Mask::from_nonzeros(1, 3, &[0.0, 2.0, -0.0]).unwrap();
    assert_eq!(m.keep(), &[false, true, false]);
}

#[test]
fn masks_that_do_not_fit_the_model_are_refused() {
    let masks = ModelMasks::dense(&config(2, 8, 32));
    let mut fewer_layers = params_of_ones(&config(1, 8, 32));
    assert_eq!(
        masks.apply(&mut fewer_layers),
        Err(SparsityError::LayerCount { masks: 2, model: 1 })
    );
    let mut p = params_of_ones(&config(2, 8, 32));
    p.blocks[1].fc.weight = Matrix::zeros(8, 31);
    let err = masks.apply(&mut p).unwrap_err();
    assert_eq!(
        err.to_string(),
        "mask of layer 1 `fc` is 8 x 32, the weight is 8 x 31"
    );
}

/// The zeros of one row follow the hypergeometric law of a uniform draw over the whole matrix,
/// not an even share per row. A 4 x 5 matrix with 10 zeros: row 0 holds `x` of them with
/// probability `C(10, x) C(10, 5 - x) / C(20, 5)`, i.e. (252, 2100, 5400, 5400, 2100, 252) /
/// 15,504 for x = 0..5. Over 4000 seeds, Pearson's statistic has 5 degrees of freedom; its
/// 1e-4 and 0.9999 quantiles are 0.082 and 25.74 (regularised gamma, computed with torch).
#[test]
fn zeros_per_row_are_hypergeometric() {
    let draws = 4000u64;
    let mut counts = [0u64; 6];
    for seed in 0..draws {
        let mask = Mask::random(4, 5, 0.5, seed, 1).unwrap();
        let zeros = (0..5).filter(|&c| !mask.is_kept(0, c)).count();
        counts[zeros] += 1;
    }
    let weights = [252.0, 2100.0, 5400.0, 5400.0, 2100.0, 252.0];
    let chi2: f64 = counts
        .iter()
        .zip(weights)
        .map(|(&o, w)| {
            let expected = draws as f64 * w / 15_504.0;
            (o as f64 - expected).powi(2) / expected
        })
        .sum();
    assert!(
        (0.082..25.74).contains(&chi2),
        "chi-square {chi2} (5 dof), counts {counts:?}"
    );
}

/// The bitset's row helpers against the flags: counts over column ranges (crossing 64-bit
/// words, clamped at the row's end) and the kept columns in order.
#[test]
fn row_counts_and_kept_columns_match_the_flags() {
    let (rows, cols) = (5, 70);
    let mask = Mask::random(rows, cols, 0.6, 9, 0).unwrap();
    let keep = mask.keep();
    for r in 0..rows {
        let flags = &keep[r * cols..(r + 1) * cols];
        for (start, end) in [(0, 70), (3, 66), (60, 70), (10, 10), (65, 200)] {
            let want = flags[start.min(cols)..end.min(cols)]
                .iter()
                .filter(|&&k| k)
                .count();
            assert_eq!(
                mask.kept_in_row(r, start..end),
                want as u64,
                "row {r} {start}..{end}"
            );
        }
        let mut kept = Vec::new();
        mask.for_each_kept_in_row(r, |c| kept.push(c));
        let want: Vec<usize> = (0..cols).filter(|&c| flags[c]).collect();
        assert_eq!(kept, want, "row {r}");
    }
    assert_eq!(mask.kept_in_row(rows, 0..cols), 0, "past the last row");
}

/// tiny's smallest sparse matrices are 64 x 64 = 4096 weights: 0.9998 prunes round(4095.18) =
/// 4095 (one kept), 0.9999 prunes round(4095.59) = 4096 (none).
#[test]
fn a_sparsity_must_keep_a_weight_of_the_smallest_matrix() {
    let config = GptConfig::preset("tiny").unwrap();
    assert!(check_keeps_weights(&config, 0.9998).is_ok());
    let err = check_keeps_weights(&config, 0.9999).unwrap_err();
    assert!(matches!(
        err,
        SparsityError::PrunesEverything {
            rows: 64,
            cols: 64,
            ..
        }
    ));
    assert!(ModelMasks::random(&config, 0.9999, 1).is_err());
}

#[test]
fn minus_zero_is_zero() {
    let zero = parse_sparsity("-0").unwrap();
    assert!(zero == 0.0 && zero.is_sign_positive());
    assert_eq!(format!("{zero}"), "0");
}
