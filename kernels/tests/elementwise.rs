//! GELU forward and backward and the residual add on the fabric against plain f64 CPU code.
//!
//! Tolerance: outputs are compared as `max |got - want| / max |want|` over the tensor and must
//! stay below 1e-5. The kernels compute in f32 (unit roundoff 6e-8) with at most 16 roundings
//! per element plus an f32 `tanh` (an ulp or two), each relative to values no larger than the
//! tensor's largest (|x| <= 4 here), so about 1e-6 is the worst expected. Cancellation (as in
//! `1 + tanh` for very negative x) costs accuracy relative to that element, not to the tensor, so
//! the tensor-wide scale is the right yardstick. A wrong coefficient shows up as 1e-3 or more.

use wafersim_kernels::*;
use wafersim_sim::{FabricConfig, RunOptions};

const TOLERANCE: f64 = 1e-5;

/// A deterministic value in [-0.5, 0.5) from an index and a salt (a hash, not a RNG crate).
fn value(i: usize, salt: u64) -> f32 {
    let mut h =
        (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 31;
    h = h.wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^= h >> 29;
    (h % 1_000_003) as f32 / 1_000_003.0 - 0.5
}

/// `sqrt(2 / pi)`.
fn k() -> f64 {
    (2.0 / std::f64::consts::PI).sqrt()
}

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + (k() * (x + 0.044715 * x.powi(3))).tanh())
}

/// The derivative of the tanh form, written from the chain rule.
fn gelu_grad(x: f64) -> f64 {
    let th = (k() * (x + 0.044715 * x.powi(3))).tanh();
    0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * k() * (1.0 + 3.0 * 0.044715 * x * x)
}

fn max_rel_error(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .map(|(g, w)| (f64::from(*g) - w).abs() / scale)
        .fold(0.0, f64::max)
}

/// (T, F, region columns, region rows): 1 x 1, non-dividing 2 x 3 and 3 x 2 (T = 10 over 3 rows
/// is 4, 3, 3; F = 14 over 3 columns is 5, 5, 4), and a larger region with uneven splits.
const SHAPES: [(usize, usize, u32, u32); 5] = [
    (4, 6, 1, 1),
    (10, 14, 2, 3),
    (10, 14, 3, 2),
    (37, 50, 4, 5),
    (64, 96, 8, 8),
];

fn config(cols: u32, rows: u32) -> FabricConfig {
    FabricConfig::rectangle(cols, rows).unwrap()
}

/// Values in [-4, 4): GELU's curved part and both tails.
fn inputs(n: usize, salt: u64) -> Vec<f32> {
    (0..n).map(|i| 8.0 * value(i, salt)).collect()
}

fn check_estimate(name: &str, context: &str, estimate: u64, run: &ElementwiseRun) {
    let exact = run.stats.cycles;
    let ratio = estimate as f64 / exact as f64;
    eprintln!("{name} {context}: exact {exact} estimate {estimate} ({ratio:.3})");
    // The module doc's formula is exact: nothing to overlap or wait for.
    assert_eq!(estimate, exact, "{name} {context}");
    assert_eq!(
        run.stats.total.fmacs, 0,
        "{name} {context}: non-matmul work uses no FMAC"
    );
}

#[test]
fn gelu_forward_matches_the_cpu_on_many_layouts() {
    for (t, f, cols, rows) in SHAPES {
        let x = inputs(t * f, 1);
        let kernel = Gelu {
            region: Region::at_origin(cols, rows),
            tokens: t,
            features: f,
            x: &x,
        };
        let fabric = config(cols, rows);
        let run = kernel.run(&fabric, RunOptions::default()).unwrap();
        let want: Vec<f64> = x.iter().map(|&v| gelu(f64::from(v))).collect();
        let context = format!("T {t} F {f} on {cols} x {rows}");
        let err = max_rel_error(&run.out, &want);
        eprintln!("{context}: error {err:.2e}");
        assert!(err < TOLERANCE, "{context}: error {err:.2e}");
        check_estimate("gelu", &context, kernel.estimate_cycles(&fabric), &run);
    }
}

#[test]
fn gelu_backward_matches_the_cpu_on_many_layouts() {
    for (t, f, cols, rows) in SHAPES {
        let (x, dy) = (inputs(t * f, 2), inputs(t * f, 3));
        let kernel = GeluBackward {
            region: Region::at_origin(cols, rows),
            tokens: t,
            features: f,
            x: &x,
            dy: &dy,
        };
        let fabric = config(cols, rows);
        let run = kernel.run(&fabric, RunOptions::default()).unwrap();
        let want: Vec<f64> = x
            .iter()
            .zip(&dy)
            .map(|(&x, &dy)| f64::from(dy) * gelu_grad(f64::from(x)))
            .collect();
        let context = format!("T {t} F {f} on {cols} x {rows}");
        let err = max_rel_error(&run.out, &want);
        eprintln!("{context}: error {err:.2e}");
        assert!(err < TOLERANCE, "{context}: error {err:.2e}");
        check_estimate(
            "gelu backward",
            &context,
            kernel.estimate_cycles(&fabric),
            &run,
        );
    }
}

/// Values from PyTorch 2.15, `torch.nn.functional.gelu(x, approximate='tanh')` in float64 and
/// its autograd gradient, for x = -3, -1, 0, 0.5, 1, 2 (2 tokens x 3 features, on 1 x 2 and
/// 3 x 1 PEs).
#[test]
fn gelu_matches_pytorch_pinned_values() {
    let x = [-3.0f32, -1.0, 0.0, 0.5, 1.0, 2.0];
    let y = [
        -0.00363739208177299,
        -0.158808009391723,
        0.0,
        0.345714009825144,
        0.841191990608277,
        1.95459769408777,
    ];
    let grad = [
        -0.0115841666309696,
        -0.0829640838457825,
        0.5,
        0.867369903534642,
        1.08296408384578,
        1.08609925662362,
    ];
    for (cols, rows) in [(1u32, 2u32), (3, 1)] {
        let region = Region::at_origin(cols, rows);
        let fabric = config(cols, rows);
        let forward = Gelu {
            region,
            tokens: 2,
            features: 3,
            x: &x,
        };
        let out = forward.run(&fabric, RunOptions::default()).unwrap().out;
        assert!(max_rel_error(&out, &y) < TOLERANCE, "{out:?}");
        let backward = GeluBackward {
            region,
            tokens: 2,
            features: 3,
            x: &x,
            dy: &[1.0; 6],
        };
        let out = backward.run(&fabric, RunOptions::default()).unwrap().out;
        assert!(max_rel_error(&out, &grad) < TOLERANCE, "{out:?}");
    }
}

/// `tanh` is odd, so `gelu(x) - gelu(-x) = 0.5 x (1 + th) + 0.5 x (1 - th) = x`, and
/// differentiating, `gelu'(x) + gelu'(-x) = 1`: checks of the kernels that need no GELU formula.
#[test]
fn gelu_odd_part_is_the_identity() {
    let (t, f) = (8, 12);
    let x = inputs(t * f, 5);
    let both: Vec<f32> = x.iter().copied().chain(x.iter().map(|v| -v)).collect();
    let region = Region::at_origin(3, 4);
    let fabric = config(3, 4);
    let y = Gelu {
        region,
        tokens: 2 * t,
        features: f,
        x: &both,
    }
    .run(&fabric, RunOptions::default())
    .unwrap()
    .out;
    let ones = vec![1.0; 2 * t * f];
    let d = GeluBackward {
        region,
        tokens: 2 * t,
        features: f,
        x: &both,
        dy: &ones,
    }
    .run(&fabric, RunOptions::default())
    .unwrap()
    .out;
    let n = t * f;
    for i in 0..n {
        let odd = f64::from(y[i]) - f64::from(y[n + i]);
        // Within the tolerance relative to the largest |y|, about 4.
        assert!(
            (odd - f64::from(x[i])).abs() < TOLERANCE * 4.0,
            "x {}: {odd}",
            x[i]
        );
        let sum = f64::from(d[i]) + f64::from(d[n + i]);
        assert!((sum - 1.0).abs() < 1e-5, "x {}: {sum}", x[i]);
    }
}

#[test]
fn residual_add_is_the_f32_sum_on_many_layouts() {
    for (t, f, cols, rows) in SHAPES {
        let (a, b) = (inputs(t * f, 6), inputs(t * f, 7));
        let kernel = ResidualAdd {
            region: Region::at_origin(cols, rows),
            tokens: t,
            features: f,
            a: &a,
            b: &b,
        };
        let fabric = config(cols, rows);
        let run = kernel.run(&fabric, RunOptions::default()).unwrap();
        let context = format!("T {t} F {f} on {cols} x {rows}");
        // One correctly rounded f32 add per element: bit-exact with the host's f32 add, and
        // within half an ulp of the f64 sum.
        for (i, z) in run.out.iter().enumerate() {
            assert_eq!(
                z.to_bits(),
                (a[i] + b[i]).to_bits(),
                "{context}: element {i}"
            );
        }
        let want: Vec<f64> = a
            .iter()
            .zip(&b)
            .map(|(&a, &b)| f64::from(a) + f64::from(b))
            .collect();
        assert!(max_rel_error(&run.out, &want) < 1e-7, "{context}");
        check_estimate(
            "residual add",
            &context,
            kernel.estimate_cycles(&fabric),
            &run,
        );
    }
}

/// T = 4, F = 6 on one PE is one vector of 24 elements. Default machine: switch 3, issue 1, f32
/// width 2 (a vector instruction is 1 + 12 = 13 cycles), tanh 4 per element (1 + 96 = 97).
/// Add: 3 + 13 = 16. GELU: 3 + 7 * 13 + 97 = 191. GELU backward: 3 + 15 * 13 + 97 = 295.
#[test]
fn one_pe_cycles_by_hand() {
    let (x, dy) = (inputs(24, 8), inputs(24, 9));
    let region = Region::at_origin(1, 1);
    let fabric = config(1, 1);
    let cycles = |run: ElementwiseRun| run.stats.cycles;
    let add = ResidualAdd {
        region,
        tokens: 4,
        features: 6,
        a: &x,
        b: &dy,
    };
    assert_eq!(cycles(add.run(&fabric, RunOptions::default()).unwrap()), 16);
    let forward = Gelu {
        region,
        tokens: 4,
        features: 6,
        x: &x,
    };
    assert_eq!(
        cycles(forward.run(&fabric, RunOptions::default()).unwrap()),
        191
    );
    let backward = GeluBackward {
        region,
        tokens: 4,
        features: 6,
        x: &x,
        dy: &dy,
    };
    assert_eq!(
        cycles(backward.run(&fabric, RunOptions::default()).unwrap()),
        295
    );
    // No wavelet moves in any of them.
    let run = backward.run(&fabric, RunOptions::default()).unwrap();
    assert_eq!(run.stats.total.wavelets_sent, 0);
}

#[test]
fn a_tile_too_big_for_a_pe_is_refused_with_the_bytes() {
    // 64 x 64 on one PE: x, dy, dx and one scratch tile of 4,096 f32 = 65,536 bytes.
    let x = vec![0.0; 64 * 64];
    let kernel = GeluBackward {
        region: Region::at_origin(1, 1),
        tokens: 64,
        features: 64,
        x: &x,
        dy: &x,
    };
    let err = kernel.plan(&config(1, 1)).unwrap_err().to_string();
    assert_eq!(
        err,
        "gelu_backward does not fit: a PE needs 65536 bytes of SRAM (4 f32 tiles of 4096 \
         elements) but has 49152; spread the matrix over more PEs"
    );
    // On 2 x 2 PEs each holds a quarter: 16,384 bytes.
    let spread = GeluBackward {
        region: Region::at_origin(2, 2),
        ..kernel
    };
    assert_eq!(spread.plan(&config(2, 2)).unwrap().sram_bytes, 16_384);
}

#[test]
fn mismatched_operands_are_refused_with_the_tensor_named() {
    let a = vec![0.0; 12];
    let kernel = ResidualAdd {
        region: Region::at_origin(1, 1),
        tokens: 3,
        features: 4,
        a: &a,
        b: &a[..11],
    };
    assert_eq!(
        kernel.plan(&config(1, 1)).unwrap_err().to_string(),
        "residual_add: B has 11 values, expected 3 x 4"
    );
}
