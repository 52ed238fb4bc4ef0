//! Property tests of the fabric's linear-layer kernels: random small shapes, sparsities, fabric
//! sizes and precisions, each checked against a plain f64 product computed here.
//!
//! Properties:
//! - the forward product `X W` and the input gradient `dY W^T` equal the CPU product within the
//!   storage precision's tolerance;
//! - FMACs executed equal kept weights x tokens, exactly (a pruned weight costs nothing);
//! - dense and sparse runs of the same layer agree when the pruned weights are zero anyway:
//!   within rounding for the product (the row reduction's order follows the timing), to the bit
//!   for the weight gradients at the kept positions (skipping `acc += 0 * x` changes nothing);
//! - `wafersim::gemm::run_gemm` keeps exactly `k n - round(s k n)` weights and reports
//!   `2 T nnz` FLOPs per phase.
//!
//! Case counts are small (the whole file runs in a few seconds in the test profile); a failure
//! prints the shrunk shape.

use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use wafersim::flops::Phase;
use wafersim::gemm::{GemmSpec, run_gemm};
use wafersim::runtime::Fidelity;
use wafersim_kernels::{Precision, Region, StreamMatmul, StreamedMatrix, WeightGrad};
use wafersim_sim::{FabricConfig, RunOptions};

/// A deterministic value in [-1, 1) from an index and a salt (a hash: reproducible shrinking).
fn value(i: usize, salt: u64) -> f32 {
    let mut h =
        (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 31;
    h = h.wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^= h >> 29;
    2.0 * ((h % 1_000_003) as f32 / 1_000_003.0) - 1.0
}

fn values(len: usize, salt: u64) -> Vec<f32> {
    (0..len).map(|i| value(i, salt)).collect()
}

/// One random layer: shapes, a keep pattern, and the fabric it runs on.
#[derive(Debug, Clone)]
struct Layer {
    t: usize,
    k: usize,
    n: usize,
    sparsity: f64,
    width: u32,
    height: u32,
    fp16: bool,
    seed: u64,
}

impl Layer {
    fn x(&self) -> Vec<f32> {
        values(self.t * self.k, self.seed)
    }

    fn dy(&self) -> Vec<f32> {
        values(self.t * self.n, self.seed ^ 1)
    }

    /// Kept entries: about `1 - sparsity` of them, drawn from the seed.
    fn keep(&self) -> Vec<bool> {
        (0..self.k * self.n)
            .map(|i| f64::from(value(i, self.seed ^ 2) + 1.0) / 2.0 >= self.sparsity)
            .collect()
    }

    /// `W` with its pruned entries set to zero.
    fn w(&self) -> Vec<f32> {
        let keep = self.keep();
        values(self.k * self.n, self.seed ^ 3)
            .into_iter()
            .zip(keep)
            .map(|(v, kept)| if kept { v } else { 0.0 })
            .collect()
    }

    fn fabric(&self) -> FabricConfig {
        FabricConfig::rectangle(self.width, self.height).unwrap()
    }

    /// The largest region with no more rows than tokens and no more columns than features.
    fn region(&self, features: usize) -> Region {
        let rows = (self.height as usize).min(self.t) as u32;
        let cols = (self.width as usize).min(features) as u32;
        Region::at_origin(cols, rows)
    }

    fn precision(&self) -> Precision {
        if self.fp16 {
            Precision::F16
        } else {
            Precision::F32
        }
    }

    /// Error allowed per output, relative to the sum of the magnitudes of its `terms` products:
    /// f32 summation of `terms` products in any order is within `(terms + 2) u` of that sum
    /// (`u = 2^-24`, Higham's bound with the product rounding); fp16 storage also rounds each of
    /// the two factors by up to `2^-11`.
    fn bound(&self, terms: usize) -> f64 {
        let f32_sum = (terms as f64 + 2.0) * 2f64.powi(-24);
        if self.fp16 {
            f32_sum + 2.0 * 2f64.powi(-11)
        } else {
            f32_sum
        }
    }

    /// A loose error relative to the largest output, for results whose terms are not visible.
    fn tolerance(&self) -> f64 {
        if self.fp16 { 2e-2 } else { 1e-4 }
    }
}

fn layer() -> impl Strategy<Value = Layer> {
    (
        1usize..=10,
        1usize..=10,
        1usize..=10,
        prop_oneof![Just(0.0), Just(0.5), Just(0.9), 0.0f64..1.0],
        1u32..=4,
        1u32..=4,
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(t, k, n, sparsity, width, height, fp16, seed)| Layer {
            t,
            k,
            n,
            sparsity,
            width,
            height,
            fp16,
            seed,
        })
}

/// `A[r x c] B[c x m]` in f64, row-major: each output with the sum of its terms' magnitudes.
fn cpu_product(a: &[f32], b: &[f32], r: usize, c: usize, m: usize) -> Vec<(f64, f64)> {
    (0..r * m)
        .map(|i| {
            let (row, col) = (i / m, i % m);
            (0..c)
                .map(|j| f64::from(a[row * c + j]) * f64::from(b[j * m + col]))
                .fold((0.0, 0.0), |(sum, abs), term| {
                    (sum + term, abs + term.abs())
                })
        })
        .collect()
}

fn transpose(w: &[f32], k: usize, n: usize) -> Vec<f32> {
    (0..n * k).map(|i| w[(i % k) * n + i / k]).collect()
}

/// The first output outside `bound x` the magnitude of its terms: `(index, got, want)`.
fn outside_bound(got: &[f32], want: &[(f64, f64)], bound: f64) -> Option<(usize, f32, f64)> {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .enumerate()
        .find(|(_, (g, (w, abs)))| {
            !g.is_finite() || (f64::from(**g) - w).abs() > bound * abs + f64::MIN_POSITIVE
        })
        .map(|(i, (g, (w, _)))| (i, *g, *w))
}

/// Largest difference between `a` and `b` relative to the largest magnitude in `b`.
fn max_rel_gap(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(1e-3f64, |m, v| m.max(f64::from(v.abs())));
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).abs() / scale)
        .fold(0.0, f64::max)
}

fn bits(v: &[f32]) -> Vec<u32> {
    // -0.0 and 0.0 are the same number; compare everything else to the bit.
    v.iter()
        .map(|x| if *x == 0.0 { 0 } else { x.to_bits() })
        .collect()
}

/// Runs `Y = X W` for a `rows x cols` weight on the layer's fabric: `(Y, FMACs)`.
fn stream(layer: &Layer, x: &[f32], w: &StreamedMatrix) -> (Vec<f32>, u64) {
    let kernel = StreamMatmul {
        region: layer.region(w.rows().min(w.cols())),
        tokens: layer.t,
        x,
        w,
        bias: None,
        precision: layer.precision(),
    };
    let run = kernel
        .run(&layer.fabric(), RunOptions::default())
        .expect("a small layer runs");
    (run.y, run.stats.total.fmacs)
}

/// `cases` cases from a fixed seed, so CI runs the same cases every time (failures found are
/// also replayed from `properties.proptest-regressions`).
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        rng_seed: RngSeed::Fixed(0x0005_EED7),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(200))]

    #[test]
    fn forward_and_input_gradient_equal_the_cpu_and_cost_nnz_times_tokens(l in layer()) {
        let (x, dy, w, keep) = (l.x(), l.dy(), l.w(), l.keep());
        let nnz = keep.iter().filter(|&&k| k).count() as u64;
        let sparse = StreamedMatrix::from_dense(l.k, l.n, &w, Some(&keep));
        let dense = StreamedMatrix::from_dense(l.k, l.n, &w, None);
        prop_assert_eq!(sparse.nnz() as u64, nnz);

        let (y, fmacs) = stream(&l, &x, &sparse);
        let want = cpu_product(&x, &w, l.t, l.k, l.n);
        let bad = outside_bound(&y, &want, l.bound(l.k));
        prop_assert!(bad.is_none(), "forward (index, fabric, cpu): {:?}", bad);
        prop_assert_eq!(fmacs, nnz * l.t as u64);

        // Not to the bit: the owner of an output column adds the partial sums arriving from the
        // east and from the west as they arrive (two concurrent receive-adds into one buffer), so
        // their order follows the timing, which the pruned weights change. See
        // docs/robustness.md.
        let (y_dense, fmacs_dense) = stream(&l, &x, &dense);
        let bad = outside_bound(&y_dense, &want, l.bound(l.k));
        prop_assert!(bad.is_none(), "dense forward (index, fabric, cpu): {:?}", bad);
        let gap = max_rel_gap(&y, &y_dense);
        prop_assert!(gap < l.tolerance(), "dense and sparse differ by {}", gap);
        prop_assert_eq!(fmacs_dense, (l.k * l.n * l.t) as u64);

        let (dx, fmacs) = stream(&l, &dy, &sparse.transpose());
        let want = cpu_product(&dy, &transpose(&w, l.k, l.n), l.t, l.n, l.k);
        let bad = outside_bound(&dx, &want, l.bound(l.n));
        prop_assert!(bad.is_none(), "input gradient (index, fabric, cpu): {:?}", bad);
        prop_assert_eq!(fmacs, nnz * l.t as u64);
    }

    #[test]
    fn weight_gradients_equal_the_cpu_at_kept_positions_dense_or_sparse(l in layer()) {
        let (x, dy, w, keep) = (l.x(), l.dy(), l.w(), l.keep());
        let nnz = keep.iter().filter(|&&k| k).count() as u64;
        let run = |pattern: &StreamedMatrix| {
            let kernel = WeightGrad {
                region: l.region(l.k.min(l.n)),
                tokens: l.t,
                x: &x,
                dy: &dy,
                pattern,
                bias: false,
                precision: l.precision(),
            };
            let run = kernel.run(&l.fabric(), RunOptions::default()).expect("a small layer runs");
            (run.grad.to_dense(), run.stats.total.fmacs)
        };
        let (sparse, fmacs) = run(&StreamedMatrix::from_dense(l.k, l.n, &w, Some(&keep)));
        let (dense, fmacs_dense) = run(&StreamedMatrix::from_dense(l.k, l.n, &w, None));
        prop_assert_eq!(fmacs, nnz * l.t as u64);
        prop_assert_eq!(fmacs_dense, (l.k * l.n * l.t) as u64);
        // dW = X^T dY, masked.
        let full = cpu_product(&transpose(&x, l.t, l.k), &dy, l.k, l.t, l.n);
        let masked: Vec<(f64, f64)> = full
            .iter()
            .zip(&keep)
            .map(|(&g, &k)| if k { g } else { (0.0, 0.0) })
            .collect();
        let bad = outside_bound(&sparse, &masked, l.bound(l.t));
        prop_assert!(bad.is_none(), "weight gradient (index, fabric, cpu): {:?}", bad);
        let dense_at_kept: Vec<f32> = dense.iter().zip(&keep).map(|(g, &k)| if k { *g } else { 0.0 }).collect();
        prop_assert_eq!(bits(&sparse), bits(&dense_at_kept));
    }
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn run_gemm_keeps_round_s_kn_zeros_and_counts_two_t_nnz_flops(
        l in layer(),
        sparsity in 0.0f64..0.8,
    ) {
        let spec = GemmSpec {
            tokens: l.t,
            k: l.k,
            n: l.n,
            sparsity,
            phases: Phase::ALL.to_vec(),
            precision: l.precision(),
            seed: l.seed,
            region: None,
            cycle_limit: None,
            fidelity: Fidelity::Exact,
            numerics: true,
        };
        let weights = l.k * l.n;
        let zeros = (sparsity * weights as f64).round() as usize;
        prop_assume!(zeros < weights);
        let report = run_gemm(&spec, &l.fabric()).expect("a small gemm runs");
        prop_assert_eq!(report.nnz, weights - zeros);
        for p in &report.phases {
            prop_assert_eq!(p.flops_executed, 2 * (l.t * report.nnz) as u64);
            prop_assert_eq!(p.flops_dense, 2 * (l.t * weights) as u64);
            // run_gemm draws N(0, 1) data: the same tolerance holds relative to the largest output.
            let error = p.max_rel_error.expect("exact runs check their values");
            prop_assert!(error < l.tolerance(), "{:?}: {}", p.phase, error);
        }
    }
}
