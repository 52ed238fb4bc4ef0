//! The masked weight gradient and the bias gradient on the fabric against the CPU.

use wafersim_kernels::*;
use wafersim_sim::{FabricConfig, RunOptions};

fn value(i: usize, salt: u64) -> f32 {
    let mut h =
        (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 31;
    h = h.wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^= h >> 29;
    (h % 1_000_003) as f32 / 1_000_003.0 - 0.5
}

fn pattern(k: usize, n: usize, sparsity: f64) -> StreamedMatrix {
    let keep: Vec<bool> = (0..k * n)
        .map(|i| f64::from(value(i, 11) + 0.5) >= sparsity)
        .collect();
    StreamedMatrix::from_dense(k, n, &vec![1.0; k * n], Some(&keep))
}

#[allow(clippy::too_many_arguments)]
fn check(
    t: usize,
    k: usize,
    n: usize,
    sparsity: f64,
    cols: u32,
    rows: u32,
    precision: Precision,
) -> WeightGradRun {
    let x: Vec<f32> = (0..t * k).map(|i| value(i, 1)).collect();
    let dy: Vec<f32> = (0..t * n).map(|i| value(i, 2)).collect();
    let pat = pattern(k, n, sparsity);
    let kernel = WeightGrad {
        region: Region::at_origin(cols, rows),
        tokens: t,
        x: &x,
        dy: &dy,
        pattern: &pat,
        bias: true,
        precision,
    };
    // Two spare rows below the region: the gradients pass through them to the south edge.
    let config = FabricConfig::rectangle(cols, rows + 2).unwrap();
    let run = kernel.run(&config, RunOptions::default()).unwrap();
    // G[k, n] = sum_t X[t, k] dY[t, n] at kept entries only.
    let round = |v: f32| match precision {
        Precision::F32 => f64::from(v),
        Precision::F16 => f64::from(half::f16::from_f32(v).to_f32()),
    };
    let mut worst: f64 = 0.0;
    let scale = (t as f64).sqrt() * 0.25;
    let got = run.grad.to_dense();
    for kk in 0..k {
        for nn in 0..n {
            let kept = pat.column(nn).any(|(row, _)| row == kk);
            let want: f64 = if kept {
                (0..t)
                    .map(|tt| round(x[tt * k + kk]) * round(dy[tt * n + nn]))
                    .sum()
            } else {
                0.0
            };
            worst = worst.max((f64::from(got[kk * n + nn]) - want).abs() / scale);
        }
    }
    let tolerance = if precision == Precision::F32 {
        1e-6
    } else {
        1e-3
    };
    assert!(
        worst < tolerance,
        "t {t} k {k} n {n} {cols}x{rows} {precision:?}: error {worst}"
    );
    assert_eq!(run.grad.nnz(), pat.nnz());
    let db = run.bias_grad.as_ref().unwrap();
    for nn in 0..n {
        let want: f64 = (0..t).map(|tt| round(dy[tt * n + nn])).sum();
        assert!(
            (f64::from(db[nn]) - want).abs() < 1e-5 * scale.max(1.0),
            "bias {nn}: {} vs {want}, {precision:?} {cols}x{rows}",
            db[nn]
        );
    }
    // One FMAC per kept entry per token.
    assert_eq!(run.stats.total.fmacs, (t * pat.nnz()) as u64);
    run
}

#[test]
fn gradients_match_the_cpu_on_many_layouts() {
    for (t, k, n, s, cols, rows) in [
        (4, 4, 4, 0.0, 1, 1),
        (8, 16, 12, 0.5, 2, 2),
        (16, 24, 40, 0.75, 4, 3),
        (10, 7, 9, 0.3, 3, 5),
        (32, 64, 48, 0.9, 8, 4),
    ] {
        check(t, k, n, s, cols, rows, Precision::F32);
        check(t, k, n, s, cols, rows, Precision::F16);
    }
}

#[test]
fn many_chunks() {
    let run = check(64, 40, 300, 0.5, 2, 2, Precision::F32);
    assert!(run.plan.chunks.len() > 1, "{:?}", run.plan.chunks);
}

/// Estimate against the exact engine on a grid of shapes: printed as a table, each within 5 %.
#[test]
fn the_cost_formula_agrees_with_the_exact_engine() {
    let shapes = [
        (16, 32, 32),
        (24, 48, 40),
        (64, 64, 256),
        (64, 256, 64),
        (128, 40, 200),
    ];
    let regions = [(1, 1), (2, 2), (3, 5), (4, 4), (8, 2), (8, 8)];
    let mut worst: f64 = 0.0;
    let (mut case, mut skipped) = (0, 0);
    eprintln!(
        "{:>4} {:>4} {:>4} {:>5} {:>6} {:>4} {:>7} {:>9} {:>9} {:>7}",
        "T", "K", "N", "s", "region", "fp", "chunks", "exact", "estimate", "error"
    );
    for (t, k, n) in shapes {
        for s in [0.0, 0.5, 0.9] {
            for (cols, rows) in regions {
                case += 1;
                // Alternate the precision, and shrink the SRAM every other case to force chunks.
                let precision = if case % 2 == 0 {
                    Precision::F32
                } else {
                    Precision::F16
                };
                let mut config = FabricConfig::rectangle(cols, rows + 2).unwrap();
                if case % 4 < 2 {
                    config.sram_bytes = 6000;
                }
                let x: Vec<f32> = (0..t * k).map(|i| value(i, 1)).collect();
                let dy: Vec<f32> = (0..t * n).map(|i| value(i, 2)).collect();
                let pat = pattern(k, n, s);
                let kernel = WeightGrad {
                    region: Region::at_origin(cols, rows),
                    tokens: t,
                    x: &x,
                    dy: &dy,
                    pattern: &pat,
                    bias: case % 3 == 0,
                    precision,
                };
                let plan = match kernel.plan(&config) {
                    Ok(plan) => plan,
                    // 6000 bytes cannot hold this tile, or the region has more columns or rows
                    // than features or tokens: nothing to compare.
                    Err(KernelError::DoesNotFit { .. } | KernelError::Shape { .. }) => {
                        skipped += 1;
                        continue;
                    }
                    Err(e) => panic!("case {case}: {e}"),
                };
                let exact = kernel
                    .run(&config, RunOptions::default())
                    .unwrap()
                    .stats
                    .cycles;
                let estimate = kernel.estimate_cycles(&config).unwrap();
                let error = estimate as f64 / exact as f64 - 1.0;
                worst = worst.max(error.abs());
                eprintln!(
                    "{t:>4} {k:>4} {n:>4} {s:>5} {:>6} {:>4} {:>7} {exact:>9} {estimate:>9} {:>+6.2}%",
                    format!("{cols}x{rows}"),
                    if precision == Precision::F32 { 32 } else { 16 },
                    plan.chunks.len(),
                    100.0 * error
                );
                assert!(
                    error.abs() < 0.05,
                    "T {t} K {k} N {n} s {s} {cols}x{rows} {precision:?}: estimate {estimate} vs exact {exact}"
                );
            }
        }
    }
    eprintln!(
        "worst {:.2} %, {} of {case} configurations run",
        100.0 * worst,
        case - skipped
    );
    assert_eq!((case, case - skipped), (90, 78), "configurations run");
}
