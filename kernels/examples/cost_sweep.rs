//! The weight-streamed kernels' cost formulas against the exact engine on a wide grid of shapes:
//! the agreement statistics of `docs/fidelity.md`.
//!
//! ```text
//! cargo run --release -p wafersim-kernels --example cost_sweep            # regions up to 8 x 8
//! cargo run --release -p wafersim-kernels --example cost_sweep -- wide    # rows of 12 to 32 PEs
//! ```
//!
//! For every combination of shape, sparsity, region, precision, SRAM (the full 48 KiB, and
//! 6000 bytes to force several chunks) and bias, it runs both kernels exactly and compares the
//! estimate; then prints, per kernel, the number of cases with the mean and worst absolute
//! error (overall and per region width), and the five worst cases. It is an example, not a
//! test: about a minute in release (the wide grid about a minute and a half).

use wafersim_kernels::{Precision, Region, StreamMatmul, StreamedMatrix, WeightGrad};
use wafersim_sim::{FabricConfig, RunOptions};

/// A deterministic value in [-0.5, 0.5) from an index and a salt.
fn value(i: usize, salt: u64) -> f32 {
    let mut h =
        (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 31;
    h = h.wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^= h >> 29;
    (h % 1_000_003) as f32 / 1_000_003.0 - 0.5
}

/// A `k x n` matrix keeping about `1 - sparsity` of its entries.
fn matrix(k: usize, n: usize, sparsity: f64) -> StreamedMatrix {
    let data: Vec<f32> = (0..k * n).map(|i| value(i, 2)).collect();
    let keep: Vec<bool> = (0..k * n)
        .map(|i| f64::from(value(i, 9) + 0.5) >= sparsity)
        .collect();
    StreamedMatrix::from_dense(k, n, &data, Some(&keep))
}

/// One configuration of the grid.
#[derive(Clone, Copy)]
struct Case {
    shape: (usize, usize, usize),
    sparsity: f64,
    region: (u32, u32),
    precision: Precision,
    sram: Option<u32>,
    bias: bool,
}

impl Case {
    fn label(&self) -> String {
        let (t, k, n) = self.shape;
        let (c, r) = self.region;
        let fp = if self.precision == Precision::F32 {
            32
        } else {
            16
        };
        let sram = self.sram.map_or("48K".into(), |b| b.to_string());
        format!(
            "T{t} K{k} N{n} s{} {c}x{r} fp{fp} sram {sram} bias {}",
            self.sparsity, self.bias as u8
        )
    }

    fn fabric(&self, extra_rows: u32) -> FabricConfig {
        let (c, r) = self.region;
        let mut fabric = FabricConfig::rectangle(c + 1, r + extra_rows).expect("small fabric");
        if let Some(bytes) = self.sram {
            fabric.sram_bytes = bytes;
        }
        fabric
    }

    /// `(exact, estimate)` of the product, `None` if it does not fit.
    fn matmul(&self) -> Option<(u64, u64)> {
        let (t, k, n) = self.shape;
        let x: Vec<f32> = (0..t * k).map(|i| value(i, 1)).collect();
        let w = matrix(k, n, self.sparsity);
        let b: Vec<f32> = (0..n).map(|i| value(i, 3)).collect();
        let kernel = StreamMatmul {
            region: Region::at_origin(self.region.0, self.region.1),
            tokens: t,
            x: &x,
            w: &w,
            bias: self.bias.then_some(&b[..]),
            precision: self.precision,
        };
        let fabric = self.fabric(1);
        let run = kernel.run(&fabric, RunOptions::default()).ok()?;
        Some((run.stats.cycles, kernel.estimate_cycles(&fabric).ok()?))
    }

    /// `(exact, estimate)` of the weight gradient, `None` if it does not fit.
    fn weight_grad(&self) -> Option<(u64, u64)> {
        let (t, k, n) = self.shape;
        let x: Vec<f32> = (0..t * k).map(|i| value(i, 1)).collect();
        let dy: Vec<f32> = (0..t * n).map(|i| value(i, 4)).collect();
        let pattern = matrix(k, n, self.sparsity);
        let kernel = WeightGrad {
            region: Region::at_origin(self.region.0, self.region.1),
            tokens: t,
            x: &x,
            dy: &dy,
            pattern: &pattern,
            bias: self.bias,
            precision: self.precision,
        };
        let fabric = self.fabric(2);
        let run = kernel.run(&fabric, RunOptions::default()).ok()?;
        Some((run.stats.cycles, kernel.estimate_cycles(&fabric).ok()?))
    }
}

fn grid(wide: bool) -> Vec<Case> {
    let shapes = [
        (16, 32, 32),
        (32, 64, 64),
        (64, 64, 256),
        (64, 256, 64),
        (24, 48, 40),
        (128, 40, 200),
        (8, 64, 96),
        (32, 128, 128),
    ];
    let regions: &[(u32, u32)] = if wide {
        &[(16, 2), (12, 4), (16, 8), (32, 2)]
    } else {
        &[(1, 1), (2, 2), (4, 4), (8, 8), (3, 5), (8, 2)]
    };
    let mut cases = Vec::new();
    for shape in shapes {
        for sparsity in [0.0, 0.5, 0.75, 0.9] {
            for &region in regions {
                let (t, k, n) = shape;
                if region.0 as usize > k.min(n) || region.1 as usize > t {
                    continue;
                }
                for precision in [Precision::F32, Precision::F16] {
                    for sram in [None, Some(6000)] {
                        for bias in [false, true] {
                            cases.push(Case {
                                shape,
                                sparsity,
                                region,
                                precision,
                                sram,
                                bias,
                            });
                        }
                    }
                }
            }
        }
    }
    cases
}

/// One kernel's result on one case.
struct Outcome {
    label: String,
    cols: u32,
    exact: u64,
    estimate: u64,
}

impl Outcome {
    fn error(&self) -> f64 {
        self.estimate as f64 / self.exact as f64 - 1.0
    }
}

/// `count, mean |error|, worst |error|` of `outcomes`.
fn stats<'a>(outcomes: impl Iterator<Item = &'a Outcome>) -> (usize, f64, f64) {
    let errors: Vec<f64> = outcomes.map(|o| o.error().abs()).collect();
    let mean = errors.iter().sum::<f64>() / errors.len().max(1) as f64;
    (
        errors.len(),
        mean,
        errors.iter().copied().fold(0.0, f64::max),
    )
}

/// Prints the summary of one kernel's outcomes.
fn summary(kernel: &str, outcomes: &mut [Outcome]) {
    let (count, mean, worst) = stats(outcomes.iter());
    println!(
        "{kernel}: {count} cases, mean |error| {:.2} %, worst {:.2} %",
        100.0 * mean,
        100.0 * worst
    );
    let mut widths: Vec<u32> = outcomes.iter().map(|o| o.cols).collect();
    widths.sort_unstable();
    widths.dedup();
    for cols in widths {
        let (count, mean, worst) = stats(outcomes.iter().filter(|o| o.cols == cols));
        println!(
            "  {cols:>2} columns: {count:>4} cases, mean {:.2} %, worst {:.2} %",
            100.0 * mean,
            100.0 * worst
        );
    }
    outcomes.sort_by(|a, b| b.error().abs().total_cmp(&a.error().abs()));
    for o in outcomes.iter().take(5) {
        println!(
            "  {:<52} exact {:>8} estimate {:>8} {:+.2} %",
            o.label,
            o.exact,
            o.estimate,
            100.0 * o.error()
        );
    }
}

fn main() {
    let wide = std::env::args().any(|a| a == "wide");
    let (mut matmul, mut weight_grad) = (Vec::new(), Vec::new());
    for case in grid(wide) {
        let outcome = |(exact, estimate)| Outcome {
            label: case.label(),
            cols: case.region.0,
            exact,
            estimate,
        };
        matmul.extend(case.matmul().map(outcome));
        weight_grad.extend(case.weight_grad().map(outcome));
    }
    summary("stream_matmul", &mut matmul);
    summary("weight_grad", &mut weight_grad);
}
