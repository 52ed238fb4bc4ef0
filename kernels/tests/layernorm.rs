//! LayerNorm forward and backward on the fabric against a plain f64 CPU LayerNorm.
//!
//! Tolerance: every output is compared as `max |got - want| / max |want|` over the tensor and
//! must stay below 1e-5. The kernel computes in f32 (unit roundoff 6e-8): a token's sums take
//! at most `F` roundings each (here F <= 64, so <= 4e-6 relative to the sum's terms), `xhat`
//! about ten more, and `rstd` is the correctly rounded f32 `1/sqrt`. The parameter gradients
//! add `T` roundings (T <= 37). So a few 1e-6 is the worst expected, 1e-5 leaves margin, and an
//! error in a formula (a missing term, a wrong mean) shows up as 1e-2 or more.

use wafersim_kernels::*;
use wafersim_sim::{FabricConfig, RunOptions};

const TOLERANCE: f64 = 1e-5;
const EPS: f32 = 1e-5;

/// A deterministic value in [-0.5, 0.5) from an index and a salt (a hash, not a RNG crate).
fn value(i: usize, salt: u64) -> f32 {
    let mut h =
        (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 31;
    h = h.wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^= h >> 29;
    (h % 1_000_003) as f32 / 1_000_003.0 - 0.5
}

/// `T x F` inputs whose tokens have different means and spreads: `offset_t + spread_t v`.
fn inputs(t: usize, f: usize, offset: f32) -> Vec<f32> {
    (0..t * f)
        .map(|i| {
            let token = i / f;
            let mean = offset + (token % 5) as f32 - 2.0;
            let spread = 0.5 + (token % 3) as f32;
            mean + 2.0 * spread * value(i, 1)
        })
        .collect()
}

fn params(f: usize) -> (Vec<f32>, Vec<f32>) {
    let gamma = (0..f).map(|i| 1.0 + value(i, 2)).collect();
    let beta = (0..f).map(|i| value(i, 3)).collect();
    (gamma, beta)
}

/// The CPU LayerNorm: `(y, mean, rstd, xhat)`, mean first then the centered variance, in f64.
struct Cpu {
    y: Vec<f64>,
    mean: Vec<f64>,
    rstd: Vec<f64>,
    xhat: Vec<f64>,
}

fn cpu_forward(x: &[f32], gamma: &[f32], beta: &[f32], t: usize, f: usize, eps: f32) -> Cpu {
    let mut out = Cpu {
        y: vec![0.0; t * f],
        mean: vec![0.0; t],
        rstd: vec![0.0; t],
        xhat: vec![0.0; t * f],
    };
    for tok in 0..t {
        let row: Vec<f64> = x[tok * f..(tok + 1) * f]
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        let mean = row.iter().sum::<f64>() / f as f64;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / f as f64;
        let rstd = 1.0 / (var + f64::from(eps)).sqrt();
        for (j, v) in row.iter().enumerate() {
            let xhat = (v - mean) * rstd;
            out.xhat[tok * f + j] = xhat;
            out.y[tok * f + j] = xhat * f64::from(gamma[j]) + f64::from(beta[j]);
        }
        out.mean[tok] = mean;
        out.rstd[tok] = rstd;
    }
    out
}

/// `(dx, dgamma, dbeta)` from the formulas of the module doc, in f64.
fn cpu_backward(
    dy: &[f32],
    xhat: &[f64],
    rstd: &[f64],
    gamma: &[f32],
    t: usize,
    f: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut dx = vec![0.0; t * f];
    let (mut dgamma, mut dbeta) = (vec![0.0; f], vec![0.0; f]);
    for (tok, &rstd) in rstd.iter().enumerate().take(t) {
        let at = |j: usize| tok * f + j;
        let g: Vec<f64> = (0..f)
            .map(|j| f64::from(dy[at(j)]) * f64::from(gamma[j]))
            .collect();
        let mean_g = g.iter().sum::<f64>() / f as f64;
        let mean_gx = (0..f).map(|j| g[j] * xhat[at(j)]).sum::<f64>() / f as f64;
        for j in 0..f {
            dx[at(j)] = rstd * (g[j] - mean_g - xhat[at(j)] * mean_gx);
            dgamma[j] += f64::from(dy[at(j)]) * xhat[at(j)];
            dbeta[j] += f64::from(dy[at(j)]);
        }
    }
    (dx, dgamma, dbeta)
}

/// What a backward over `t x f` reads: `X`, `dY` (the values of `salt`), `gamma`, and the
/// forward's `mean` and `rstd` as the CPU computes them, rounded to f32.
struct BackwardInputs {
    t: usize,
    f: usize,
    x: Vec<f32>,
    dy: Vec<f32>,
    gamma: Vec<f32>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
    cpu: Cpu,
}

impl BackwardInputs {
    fn new(t: usize, f: usize, salt: u64) -> BackwardInputs {
        let x = inputs(t, f, 0.0);
        let (gamma, beta) = params(f);
        let cpu = cpu_forward(&x, &gamma, &beta, t, f, EPS);
        let rounded = |v: &[f64]| v.iter().map(|&v| v as f32).collect();
        BackwardInputs {
            t,
            f,
            dy: (0..t * f).map(|i| value(i, salt)).collect(),
            mean: rounded(&cpu.mean),
            rstd: rounded(&cpu.rstd),
            x,
            gamma,
            cpu,
        }
    }

    /// The kernel on `cols x rows` PEs at the origin.
    fn kernel(&self, cols: u32, rows: u32, parameter_gradients: bool) -> LayerNormBackward<'_> {
        LayerNormBackward {
            region: Region::at_origin(cols, rows),
            tokens: self.t,
            features: self.f,
            dy: &self.dy,
            x: &self.x,
            gamma: &self.gamma,
            mean: &self.mean,
            rstd: &self.rstd,
            parameter_gradients,
        }
    }

    /// `(dx, dgamma, dbeta)` by the CPU in f64.
    fn cpu_backward(&self) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let c = &self.cpu;
        cpu_backward(&self.dy, &c.xhat, &c.rstd, &self.gamma, self.t, self.f)
    }
}

fn max_rel_error(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .map(|(g, w)| (f64::from(*g) - w).abs() / scale)
        .fold(0.0, f64::max)
}

fn assert_close(what: &str, got: &[f32], want: &[f64], context: &str) {
    let err = max_rel_error(got, want);
    eprintln!("{context}: {what} error {err:.2e}");
    assert!(err < TOLERANCE, "{context}: {what} error {err:.2e}");
}

/// (T, F, region columns, region rows): 1 x 1, non-dividing 2 x 3 and 3 x 2 (T = 10 over 3 rows
/// is 4, 3, 3; F = 14 over 3 columns is 5, 5, 4), a taller and a wider region.
const SHAPES: [(usize, usize, u32, u32); 9] = [
    (64, 8, 1, 64),
    (40, 12, 2, 40),
    (1, 256, 1, 1),
    (4, 6, 1, 1),
    (10, 14, 2, 3),
    (10, 14, 3, 2),
    (37, 20, 1, 5),
    (6, 64, 6, 1),
    (23, 50, 4, 4),
];

fn config(cols: u32, rows: u32) -> FabricConfig {
    FabricConfig::rectangle(cols, rows).unwrap()
}

fn forward(
    t: usize,
    f: usize,
    cols: u32,
    rows: u32,
    x: &[f32],
    fabric: &FabricConfig,
) -> (LayerNormRun, Cpu, u64) {
    let (gamma, beta) = params(f);
    let kernel = LayerNorm {
        region: Region::at_origin(cols, rows),
        tokens: t,
        features: f,
        x,
        gamma: &gamma,
        beta: &beta,
        eps: EPS,
    };
    let run = kernel.run(fabric, RunOptions::default()).unwrap();
    let estimate = kernel.estimate_cycles(fabric);
    (run, cpu_forward(x, &gamma, &beta, t, f, EPS), estimate)
}

#[test]
fn forward_matches_the_cpu_on_many_layouts() {
    for (t, f, cols, rows) in SHAPES {
        let x = inputs(t, f, 0.0);
        let (run, want, estimate) = forward(t, f, cols, rows, &x, &config(cols, rows));
        let context = format!("T {t} F {f} on {cols} x {rows}");
        assert_close("y", &run.y, &want.y, &context);
        assert_close("mean", &run.mean, &want.mean, &context);
        assert_close("rstd", &run.rstd, &want.rstd, &context);
        assert_eq!(
            run.stats.total.fmacs, 0,
            "{context}: non-matmul work uses no FMAC"
        );
        let exact = run.stats.cycles;
        let ratio = estimate as f64 / exact as f64;
        eprintln!("layernorm forward {context}: exact {exact} estimate {estimate} ({ratio:.3})");
        // Measured 1.000 on these shapes.
        assert!(
            (0.98..=1.02).contains(&ratio),
            "{context}: estimate {estimate} vs {exact}"
        );
    }
}

#[test]
fn backward_matches_the_cpu_on_many_layouts() {
    for (t, f, cols, rows) in SHAPES {
        // Two rows of idle PEs below the region: the gradients cross them to the south edge.
        let fabric = config(cols, rows + 2);
        let case = BackwardInputs::new(t, f, 4);
        let kernel = case.kernel(cols, rows, true);
        let run = kernel.run(&fabric, RunOptions::default()).unwrap();
        let (dx, dgamma, dbeta) = case.cpu_backward();
        let context = format!("T {t} F {f} on {cols} x {rows}");
        assert_close("dx", &run.dx, &dx, &context);
        let grads = run.parameter_gradients.as_ref().unwrap();
        assert_close("dgamma", &grads.dgamma, &dgamma, &context);
        assert_close("dbeta", &grads.dbeta, &dbeta, &context);
        assert_eq!(
            run.stats.total.fmacs, 0,
            "{context}: non-matmul work uses no FMAC"
        );
        let (exact, estimate) = (run.stats.cycles, kernel.estimate_cycles(&fabric));
        let ratio = estimate as f64 / exact as f64;
        eprintln!("layernorm backward {context}: exact {exact} estimate {estimate} ({ratio:.3})");
        // Measured 0.986 to 1.000 on these shapes.
        assert!(
            (0.98..=1.02).contains(&ratio),
            "{context}: estimate {estimate} vs {exact}"
        );
    }
}

/// A frozen model's backward: the same `dx` to the bit (the same instructions in the same order),
/// no parameter gradient computed or sent, and fewer cycles. On one PE, T = 4, F = 6 (the
/// machine of `one_pe_forward_cycles_by_hand`; `M(4) = 1 + 2`, `V(8) = 1 + 4`), from the module
/// doc: TS = 3 + 1 + 2 * 6 * 3 = 40 (the parameters arrive at P(6) = 1 + 2 + 5 = 8),
/// TG = 3 + 1 + 2 * 3 + 3 + 5 (1 + 4 * 3) = 78, A = 3 (one column), TF = 3 + 5 + 4 * 6 * 3 = 80:
/// 40 + 78 + 3 + 80 = 201. On a region the formula stays within the tolerance of the kernel
/// with gradients.
#[test]
fn without_parameter_gradients_dx_is_unchanged_and_nothing_leaves() {
    for (t, f, cols, rows) in [(4, 6, 1, 1), (10, 14, 3, 2)] {
        let fabric = config(cols, rows + 2);
        let case = BackwardInputs::new(t, f, 5);
        let (with, without) = (
            case.kernel(cols, rows, true),
            case.kernel(cols, rows, false),
        );
        let full = with.run(&fabric, RunOptions::default()).unwrap();
        let frozen = without.run(&fabric, RunOptions::default()).unwrap();
        let context = format!("T {t} F {f} on {cols} x {rows}");
        assert_eq!(frozen.dx, full.dx, "{context}");
        assert!(frozen.parameter_gradients.is_none());
        let (_, _, bufs) = without.build(&fabric).unwrap();
        assert!(bufs.sinks.is_empty(), "{context}: nothing leaves the wafer");
        // Two scratch vectors of `f` fewer on the fullest PE.
        let f_max = f.div_ceil(cols as usize) as u64;
        assert_eq!(
            full.plan.sram_bytes - frozen.plan.sram_bytes,
            4 * 2 * f_max,
            "{context}"
        );
        let (exact, estimate) = (frozen.stats.cycles, without.estimate_cycles(&fabric));
        eprintln!(
            "layernorm backward without parameters {context}: exact {exact} estimate {estimate}, \
             with them exact {}",
            full.stats.cycles
        );
        assert!(exact < full.stats.cycles, "{context}");
        if cols * rows == 1 {
            assert_eq!((estimate, exact), (201, 201), "{context}");
        }
        assert!(
            exact.abs_diff(estimate) * 20 <= exact,
            "{context}: within 5 %: {estimate} vs {exact}"
        );
    }
}

/// One token `[1, 2, 3, 4]`: mean 2.5, biased variance (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25,
/// so `xhat = (x - 2.5) / sqrt(1.25 + eps)`; with `gamma = 2`, `beta = 1`: `y = 2 xhat + 1`.
/// With eps = 0.75 the square root is exactly sqrt(2): y = 1 -+ 1.5 sqrt(2), 1 -+ 0.5 sqrt(2).
#[test]
fn one_token_by_hand() {
    for cols in [1u32, 2, 4] {
        let kernel = LayerNorm {
            region: Region::at_origin(cols, 1),
            tokens: 1,
            features: 4,
            x: &[1.0, 2.0, 3.0, 4.0],
            gamma: &[2.0; 4],
            beta: &[1.0; 4],
            eps: 0.75,
        };
        let run = kernel.run(&config(cols, 1), RunOptions::default()).unwrap();
        let r2 = std::f64::consts::SQRT_2;
        let want = [
            1.0 - 1.5 * r2,
            1.0 - 0.5 * r2,
            1.0 + 0.5 * r2,
            1.0 + 1.5 * r2,
        ];
        assert_close("y", &run.y, &want, &format!("{cols} columns"));
        assert_eq!(run.mean, vec![2.5]);
        assert_close("rstd", &run.rstd, &[1.0 / r2], &format!("{cols} columns"));
    }
}

/// `dx` is orthogonal to `1` and to `xhat` per token (the two directions LayerNorm removes):
/// `sum_j dx_j = rstd (F mean(g) - F mean(g) - mean(g xhat) sum_j xhat_j) = 0`, since `sum_j
/// xhat_j = 0`; likewise `sum_j dx_j xhat_j = rstd (F mean(g xhat) - F mean(g xhat)) = 0` since
/// `sum_j xhat_j^2 = F var rstd^2 ~= F`, up to eps.
#[test]
fn backward_input_gradient_is_orthogonal_to_ones() {
    let (t, f, cols, rows) = (10, 14, 3, 2);
    let run = BackwardInputs::new(t, f, 9)
        .kernel(cols, rows, true)
        .run(&config(cols, rows), RunOptions::default())
        .unwrap();
    for tok in 0..t {
        let row = &run.dx[tok * f..(tok + 1) * f];
        let sum: f64 = row.iter().map(|&v| f64::from(v)).sum();
        let size: f64 = row.iter().map(|&v| f64::from(v).abs()).sum();
        assert!(
            sum.abs() < 1e-5 * size,
            "token {tok}: sum {sum} of |dx| {size}"
        );
    }
}

/// Tokens with mean ~100 and standard deviations 0.5 to 2.5: the two-pass variance stays within
/// tolerance (a one-pass `E[x^2] - mean^2` in f32 would lose the variance entirely: ulp(10^4) is
/// 1e-3 against variances of 0.08 to 2).
#[test]
fn large_means_stay_accurate() {
    let (t, f, cols, rows) = (10, 14, 3, 2);
    let x = inputs(t, f, 20.0);
    let (run, want, _) = forward(t, f, cols, rows, &x, &config(cols, rows));
    let context = "mean 20";
    assert_close("y", &run.y, &want.y, context);
    assert_close("rstd", &run.rstd, &want.rstd, context);
    assert_close("mean", &run.mean, &want.mean, context);
}

/// On one PE, with T = 4, F = 6 (t = 4, f = 6, one column so no all-reduce) on the default
/// machine (switch 3, issue 1, f32 width 2, a software `1/sqrt` at exp's 4 cycles), from the
/// module doc: T1 = 3 + 1 + (1 + 2) + 5 (1 + 2) = 22; T3 = 3 + 3 + 6 * 3 + 3 + 2 * 5 * 3 = 57;
/// T5 = 3 + 2 * 3 + 4 (2 + 4) + 6 (3 * 3 + 2) = 99; the two broadcast tasks, empty on one
/// column, cost a task switch each: 22 + 3 + 57 + 3 + 99 = 184.
#[test]
fn one_pe_forward_cycles_by_hand() {
    assert_eq!(config(1, 1).exp_cycles_per_element, 4);
    let x = inputs(4, 6, 0.0);
    let (run, _, estimate) = forward(4, 6, 1, 1, &x, &config(1, 1));
    assert_eq!(estimate, 184);
    assert_eq!(run.stats.cycles, 184);
}

#[test]
fn runs_are_deterministic() {
    let x = inputs(10, 14, 0.0);
    let (a, _, _) = forward(10, 14, 3, 2, &x, &config(3, 2));
    let (b, _, _) = forward(10, 14, 3, 2, &x, &config(3, 2));
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.y), bits(&b.y));
    assert_eq!(a.stats, b.stats);
}

#[test]
fn the_plan_counts_the_sram_the_fullest_pe_uses() {
    let (t, f, cols, rows) = (10, 14, 3, 2);
    let x = inputs(t, f, 0.0);
    let (run, _, _) = forward(t, f, cols, rows, &x, &config(cols, rows));
    // PE (0, 0) holds 5 tokens x 5 features: 4 (2 * 25 + 4 * 5 + 2 * 5 + 4) = 336 bytes.
    assert_eq!(run.plan.sram_bytes, 336);
    let fullest = run.stats.pes.iter().map(|(_, s)| s.sram_bytes).max();
    assert_eq!(fullest, Some(336));
}

#[test]
fn too_many_tokens_for_one_pe_are_refused_with_the_bytes() {
    let (t, f) = (1024, 8);
    let x = vec![0.0; t * f];
    let (gamma, beta) = params(f);
    let kernel = LayerNorm {
        region: Region::at_origin(1, 1),
        tokens: t,
        features: f,
        x: &x,
        gamma: &gamma,
        beta: &beta,
        eps: EPS,
    };
    let err = kernel.plan(&config(1, 1)).unwrap_err().to_string();
    // 4 (2 * 1024 * 8 + 4 * 1024 + 2 * 8 + 4) = 4 * 20,500 = 82,000 bytes.
    assert!(
        err.starts_with("layernorm does not fit: a PE needs 82000 bytes of SRAM"),
        "{err}"
    );
    assert!(err.contains("49152"), "{err}");
}

#[test]
fn bad_shapes_are_refused_with_the_tensor_named() {
    let x = vec![0.0; 12];
    let (gamma, beta) = params(4);
    let base = LayerNorm {
        region: Region::at_origin(1, 1),
        tokens: 3,
        features: 4,
        x: &x,
        gamma: &gamma,
        beta: &beta,
        eps: EPS,
    };
    let fabric = config(2, 2);
    let short = LayerNorm {
        gamma: &gamma[..3],
        ..base
    };
    assert_eq!(
        short.plan(&fabric).unwrap_err().to_string(),
        "layernorm: gamma has 3 values, expected 1 x 4"
    );
    let no_eps = LayerNorm { eps: 0.0, ..base };
    assert!(
        no_eps
            .plan(&fabric)
            .unwrap_err()
            .to_string()
            .contains("eps is 0")
    );
    let wide = LayerNorm {
        region: Region::at_origin(5, 1),
        ..base
    };
    assert!(
        wide.plan(&config(5, 1)).is_err(),
        "5 columns for 4 features"
    );
    let rstd = [1.0; 2];
    let back = LayerNormBackward {
        region: Region::at_origin(1, 1),
        tokens: 3,
        features: 4,
        dy: &x,
        x: &x,
        gamma: &gamma,
        mean: &[0.0; 3],
        rstd: &rstd,
        parameter_gradients: true,
    };
    assert_eq!(
        back.plan(&fabric).unwrap_err().to_string(),
        "layernorm_backward: rstd has 2 values, expected 1 x 3"
    );
}

/// The region at (1, 2) of a 5 x 7 fabric: `gamma`/`beta` cross two rows of PEs above it, the
/// parameter gradients two rows below it; values and estimates are as at the corner.
#[test]
fn a_region_away_from_the_corner() {
    let (t, f, cols, rows) = (10, 14, 3, 3);
    let region = Region {
        origin: wafersim_sim::Coord::new(1, 2),
        cols,
        rows,
    };
    let fabric = config(5, 7);
    let x = inputs(t, f, 0.0);
    let (gamma, beta) = params(f);
    let forward = LayerNorm {
        region,
        tokens: t,
        features: f,
        x: &x,
        gamma: &gamma,
        beta: &beta,
        eps: EPS,
    };
    let run = forward.run(&fabric, RunOptions::default()).unwrap();
    let cpu = cpu_forward(&x, &gamma, &beta, t, f, EPS);
    assert_close("y", &run.y, &cpu.y, "off corner");
    assert_eq!(forward.estimate_cycles(&fabric), run.stats.cycles);
    let dy: Vec<f32> = (0..t * f).map(|i| value(i, 11)).collect();
    let backward = LayerNormBackward {
        region,
        tokens: t,
        features: f,
        dy: &dy,
        x: &x,
        gamma: &gamma,
        mean: &run.mean,
        rstd: &run.rstd,
        parameter_gradients: true,
    };
    let back = backward.run(&fabric, RunOptions::default()).unwrap();
    let (dx, dgamma, dbeta) = cpu_backward(&dy, &cpu.xhat, &cpu.rstd, &gamma, t, f);
    assert_close("dx", &back.dx, &dx, "off corner");
    let grads = back.parameter_gradients.as_ref().unwrap();
    assert_close("dgamma", &grads.dgamma, &dgamma, "off corner");
    assert_close("dbeta", &grads.dbeta, &dbeta, "off corner");
    let (exact, estimate) = (back.stats.cycles, backward.estimate_cycles(&fabric));
    eprintln!("layernorm backward off corner: exact {exact} estimate {estimate}");
    assert!(
        exact.abs_diff(estimate) * 20 <= exact,
        "within 5 %: {estimate} vs {exact}"
    );
}
