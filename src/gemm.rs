//! One linear layer on the fabric, sparse against dense: the `wafersim gemm` experiment.
//!
//! `Y[T x N] = X[T x K] W[K x N]` with `W` pruned to exactly `round(s K N)` zeros (the model's
//! mask rule), run phase by phase on one region: forward `X W`, input gradient `dY W^T`, masked
//! weight gradient `X^T dY`. Each phase runs twice, once streaming only the kept weights and once
//! streaming every weight (the dense baseline on the same fabric and region); with nothing
//! pruned the two are the same program, simulated once. Every run is checked: the values against
//! the plain CPU products of [`crate::reference::products`], and the executed FMACs against the
//! analytic count of [`crate::flops::linear_flops`], exactly.
//!
//! Data are seeded (ChaCha, one stream per matrix), so a run is reproducible.
//!
//! At [`Fidelity::Fast`] nothing is simulated and no operand exists: each phase is costed by its
//! kernel's formula from the mask's kept entries ([`ColumnCounts`]), executed FLOPs are the
//! analytic count, and there is no value to check (`max_rel_error` is `None`), nor a busiest PE
//! to break down.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use wafersim_kernels::{
    ColumnCounts, KernelError, LAYER_COLORS, MatmulShape, Precision, Region, StreamLoad,
    StreamMatmul, StreamedMatrix, WeightGrad, WeightGradShape,
};
use wafersim_sim::{FabricConfig, RunOptions, Stats};

use crate::flops::{self, FlopError, Phase};
use crate::reference::products;
use crate::runtime::Fidelity;
use crate::sparsity::{Mask, SparsityError};

/// The experiment.
#[derive(Clone, Debug, PartialEq)]
pub struct GemmSpec {
    /// Tokens `T` (rows of `X`).
    pub tokens: usize,
    /// Input features `K`.
    pub k: usize,
    /// Output features `N`.
    pub n: usize,
    /// Fraction of `W` pruned, in `[0, 1)`.
    pub sparsity: f64,
    /// Phases to run, in order.
    pub phases: Vec<Phase>,
    pub precision: Precision,
    pub seed: u64,
    /// The region to run on; `None` picks [`default_region`].
    pub region: Option<Region>,
    /// Stop a run still working at this cycle ([`RunOptions::cycle_limit`]); `None`: no limit.
    pub cycle_limit: Option<u64>,
    pub fidelity: Fidelity,
    /// Check the values against the CPU (exact fidelity only: the fast one computes none).
    pub numerics: bool,
}

/// What one phase measured.
#[derive(Clone, Debug, PartialEq)]
pub struct PhaseResult {
    pub phase: Phase,
    /// Cycles of the sparse run.
    pub cycles: u64,
    /// Cycles of the same phase with every weight streamed.
    pub dense_cycles: u64,
    /// FLOPs the sparse run executed (2 per FMAC).
    pub flops_executed: u64,
    /// FLOPs the dense run executed.
    pub flops_dense: u64,
    /// Largest absolute error against the CPU, over the largest CPU magnitude (`None`: not
    /// checked, or the fast fidelity computed no value).
    pub max_rel_error: Option<f64>,
    /// Busy cycles over (cycles x PEs of the region), sparse run (exact fidelity only).
    pub utilisation: Option<f64>,
    /// Where the sparse run's cycles went on its busiest PE (exact fidelity only).
    pub breakdown: Option<Breakdown>,
    /// The same for the dense run.
    pub dense_breakdown: Option<Breakdown>,
}

impl PhaseResult {
    /// Dense cycles over sparse cycles.
    pub fn cycle_reduction(&self) -> f64 {
        self.dense_cycles as f64 / self.cycles as f64
    }

    /// Dense FLOPs over sparse FLOPs.
    pub fn flop_reduction(&self) -> f64 {
        self.flops_dense as f64 / self.flops_executed.max(1) as f64
    }

    /// Why the cycle reduction falls short of the FLOP reduction: for each part of the busiest
    /// PE's time, the cycles the sparse run spent beyond the dense run's scaled by the density
    /// (what perfect scaling would leave), largest first; empty without a breakdown.
    pub fn shortfall(&self) -> Vec<(&'static str, i64)> {
        let (Some(sparse), Some(dense)) = (&self.breakdown, &self.dense_breakdown) else {
            return Vec::new();
        };
        let density = 1.0 / self.flop_reduction();
        let (s, d) = (sparse.parts(), dense.parts());
        let mut excess: Vec<(&'static str, i64)> = s
            .iter()
            .zip(d)
            .map(|(&(name, sv), (_, dv))| (name, sv as i64 - (density * dv as f64).round() as i64))
            .collect();
        excess.sort_by_key(|&(_, e)| std::cmp::Reverse(e));
        excess
    }
}

/// Where a run's cycles went, seen from its busiest PE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Breakdown {
    /// Task-switch and issue cycles: the fixed cost of every task, paid per streamed weight.
    pub task_overhead: u64,
    /// Everything else the busiest core did (vector work, scalar work).
    pub vector_work: u64,
    /// Cycles the busiest core was not busy: waiting for weights, reductions and other traffic.
    pub communication: u64,
}

impl Breakdown {
    /// The three parts with their names.
    pub fn parts(&self) -> [(&'static str, u64); 3] {
        [
            ("per-weight task overhead", self.task_overhead),
            ("vector work", self.vector_work),
            (
                "communication (weight stream, reductions)",
                self.communication,
            ),
        ]
    }
}

/// The whole experiment's result.
#[derive(Clone, Debug, PartialEq)]
pub struct GemmReport {
    pub spec: GemmSpec,
    pub region: Region,
    /// Kept weights.
    pub nnz: usize,
    pub phases: Vec<PhaseResult>,
}

impl GemmReport {
    /// Sum of the sparse runs' cycles.
    pub fn cycles(&self) -> u64 {
        self.phases.iter().map(|p| p.cycles).sum()
    }

    /// Sum of the dense runs' cycles.
    pub fn dense_cycles(&self) -> u64 {
        self.phases.iter().map(|p| p.dense_cycles).sum()
    }
}

/// What can stop a gemm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GemmError {
    #[error(transparent)]
    Sparsity(#[from] SparsityError),
    #[error(transparent)]
    Flops(#[from] FlopError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("{what} must be at least 1")]
    Empty { what: &'static str },
    #[error(
        "the fabric has {available} colors but a layer's kernels route on {needed} (the weight gradient's row and column chains); use a fabric with at least {needed}"
    )]
    TooFewColors { needed: u8, available: u8 },
    #[error(
        "sparsity {sparsity} prunes all {weights} weights of W: at least one must be kept for the reductions to be defined"
    )]
    AllPruned { sparsity: f64, weights: usize },
    #[error("the region {cols} x {rows} is empty or outside the {width} x {height} fabric")]
    RegionOutside {
        cols: u32,
        rows: u32,
        width: u32,
        height: u32,
    },
    #[error(
        "the layer does not fit the region: a PE must hold at least {needed} bytes of X, Y and dY tiles but has {available}; use a bigger fabric or region, or fewer tokens"
    )]
    DoesNotFit { needed: u64, available: u64 },
    #[error("{phase}: the fabric's output has a non-finite value ({value}) at flat index {index}")]
    NonFinite {
        phase: &'static str,
        index: usize,
        value: f32,
    },
    #[error(
        "executed FLOPs {executed} differ from the analytic {analytic} in {phase}: a simulator bug"
    )]
    FlopMismatch {
        phase: &'static str,
        executed: u64,
        analytic: u64,
    },
}

/// The largest region of the fabric with no more rows than tokens and no more columns than the
/// smaller feature count.
pub fn default_region(fabric: &FabricConfig, tokens: usize, k: usize, n: usize) -> Region {
    let rows = (fabric.height as usize).min(tokens) as u32;
    let cols = (fabric.width as usize).min(k.min(n)) as u32;
    Region::at_origin(cols, rows)
}

/// The layer's operands.
struct Operands {
    x: Vec<f32>,
    dy: Vec<f32>,
    w: Vec<f32>,
    mask: Mask,
}

fn normal_values(seed: u64, stream: u64, len: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    let normal = Normal::new(0.0f32, 1.0).expect("unit normal");
    (0..len).map(|_| normal.sample(&mut rng)).collect()
}

/// The layer's mask: exactly `round(s K N)` zeros, from the seed.
fn mask(spec: &GemmSpec) -> Result<Mask, GemmError> {
    Ok(Mask::random(spec.k, spec.n, spec.sparsity, spec.seed, 3)?)
}

fn operands(spec: &GemmSpec, mask: Mask) -> Operands {
    let (t, k, n) = (spec.tokens, spec.k, spec.n);
    let mut w = normal_values(spec.seed, 1, k * n);
    mask.zero_pruned(&mut w);
    Operands {
        x: normal_values(spec.seed, 0, t * k),
        dy: normal_values(spec.seed, 2, t * n),
        w,
        mask,
    }
}

/// Checks the experiment before anything is allocated: every size at least 1, a sparsity that
/// keeps at least one weight, a region inside the fabric, and tiles that can fit a PE (a lower
/// bound of what every phase's kernel holds: a `T x K` and a `T x N` tile). Returns the region.
pub fn plan_gemm(spec: &GemmSpec, fabric: &FabricConfig) -> Result<Region, GemmError> {
    for (what, v) in [
        ("--m (tokens)", spec.tokens),
        ("--k", spec.k),
        ("--n", spec.n),
    ] {
        if v == 0 {
            return Err(GemmError::Empty { what });
        }
    }
    if fabric.colors < LAYER_COLORS {
        return Err(GemmError::TooFewColors {
            needed: LAYER_COLORS,
            available: fabric.colors,
        });
    }
    let sparsity = crate::sparsity::validate(spec.sparsity)?;
    let weights = spec.k.saturating_mul(spec.n);
    if crate::sparsity::pruned_count(weights, sparsity) == weights {
        return Err(GemmError::AllPruned { sparsity, weights });
    }
    let region = spec
        .region
        .unwrap_or_else(|| default_region(fabric, spec.tokens, spec.k, spec.n));
    let empty = region.cols == 0 || region.rows == 0;
    if empty || region.cols > fabric.width || region.rows > fabric.height {
        return Err(GemmError::RegionOutside {
            cols: region.cols,
            rows: region.rows,
            width: fabric.width,
            height: fabric.height,
        });
    }
    let (rows, cols) = (region.rows as usize, region.cols as usize);
    let t_max = spec.tokens.div_ceil(rows) as u64;
    let features = (spec.k.div_ceil(cols) as u64).saturating_add(spec.n.div_ceil(cols) as u64);
    let needed = t_max
        .saturating_mul(features)
        .saturating_mul(spec.precision.bytes());
    let available = u64::from(fabric.sram_bytes);
    if needed > available {
        return Err(GemmError::DoesNotFit { needed, available });
    }
    Ok(region)
}

/// Bytes of host memory the experiment's operands take (`X`, `dY`, `W` and its copies), `None`
/// if that overflows.
pub fn host_bytes(spec: &GemmSpec) -> Option<u64> {
    let (t, k, n) = (spec.tokens as u64, spec.k as u64, spec.n as u64);
    let values = t
        .checked_mul(k)?
        .checked_add(t.checked_mul(n)?)?
        .checked_add(k.checked_mul(n)?.checked_mul(4)?)?;
    values.checked_mul(4)
}

/// The simulator's own state for one PE of a run beyond its SRAM (router buffers, tasks, held
/// operations, wakes): about 5 KB, measured on the full-wafer gemm (8 KB per PE in all, 3 KB of
/// it simulated SRAM; `docs/performance.md`, "Memory").
pub(crate) const ENGINE_BYTES_PER_PE: u64 = 5 * 1024;

/// Bytes of host memory an exact run takes at its peak, `None` if that overflows: the operands
/// ([`host_bytes`]) and, for each PE of `region`, the SRAM of the fullest PE of the largest
/// phase's plan (a PE's arenas hold exactly what its program allocates) and the engine's state.
/// One phase's program lives at a time.
pub fn exact_host_bytes(spec: &GemmSpec, fabric: &FabricConfig, region: Region) -> Option<u64> {
    let (k, n) = (spec.k, spec.n);
    let sram = spec
        .phases
        .iter()
        .map(|phase| {
            let product = |kn| {
                product_shape(spec, region, kn)
                    .plan(fabric)
                    .map(|p| p.sram_bytes)
            };
            let planned = match phase {
                Phase::Forward => product((k, n)),
                Phase::InputGrad => product((n, k)),
                Phase::WeightGrad => weight_grad_shape(spec, region)
                    .plan(fabric)
                    .map(|p| p.sram_bytes),
            };
            planned.unwrap_or(u64::from(fabric.sram_bytes))
        })
        .max()
        .unwrap_or(0);
    let pes = u64::from(region.cols) * u64::from(region.rows);
    host_bytes(spec)?.checked_add(pes.checked_mul(sram + ENGINE_BYTES_PER_PE)?)
}

/// Runs the experiment on `fabric`.
pub fn run_gemm(spec: &GemmSpec, fabric: &FabricConfig) -> Result<GemmReport, GemmError> {
    let region = plan_gemm(spec, fabric)?;
    let mask = mask(spec)?;
    if spec.fidelity == Fidelity::Fast {
        return fast_gemm(spec, fabric, region, &mask);
    }
    let ops = operands(spec, mask);
    let sparse = StreamedMatrix::from_dense(spec.k, spec.n, &ops.w, Some(&ops.mask.keep()));
    let dense = StreamedMatrix::from_dense(spec.k, spec.n, &ops.w, None);
    let ctx = Ctx {
        spec,
        fabric,
        region,
        ops: &ops,
    };
    let phases = spec
        .phases
        .iter()
        .map(|&phase| ctx.phase(phase, &sparse, &dense))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(GemmReport {
        spec: spec.clone(),
        region,
        nnz: sparse.nnz(),
        phases,
    })
}

struct Ctx<'a> {
    spec: &'a GemmSpec,
    fabric: &'a FabricConfig,
    region: Region,
    ops: &'a Operands,
}

impl Ctx<'_> {
    fn phase(
        &self,
        phase: Phase,
        sparse: &StreamedMatrix,
        dense: &StreamedMatrix,
    ) -> Result<PhaseResult, GemmError> {
        let (s_out, s_stats) = self.run(phase, sparse)?;
        if let Some((index, &value)) = s_out.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(GemmError::NonFinite {
                phase: phase.name(),
                index,
                value,
            });
        }
        // With nothing pruned the dense run is the same program: simulated once.
        let d_stats = if sparse.keeps_every_entry() {
            s_stats.clone()
        } else {
            self.run(phase, dense)?.1
        };
        let (t, k, n) = (
            self.spec.tokens as u64,
            self.spec.k as u64,
            self.spec.n as u64,
        );
        let analytic = flops::linear_flops(t, k, n, sparse.nnz() as u64)?[phase.index()];
        let analytic_dense = flops::linear_flops(t, k, n, k * n)?[phase.index()];
        for (executed, expected) in [
            (2 * s_stats.total.fmacs, analytic),
            (2 * d_stats.total.fmacs, analytic_dense),
        ] {
            if executed != expected {
                return Err(GemmError::FlopMismatch {
                    phase: phase.name(),
                    executed,
                    analytic: expected,
                });
            }
        }
        let pes = self.region.pes();
        let busy = s_stats.total.busy_cycles as f64;
        Ok(PhaseResult {
            phase,
            cycles: s_stats.cycles,
            dense_cycles: d_stats.cycles,
            flops_executed: analytic,
            flops_dense: analytic_dense,
            max_rel_error: self.spec.numerics.then(|| self.error(phase, &s_out)),
            utilisation: Some(busy / (s_stats.cycles.max(1) * pes) as f64),
            breakdown: Some(breakdown(&s_stats, self.fabric)),
            dense_breakdown: Some(breakdown(&d_stats, self.fabric)),
        })
    }

    /// One phase streaming `w`'s entries: its output (row-major) and statistics.
    fn run(&self, phase: Phase, w: &StreamedMatrix) -> Result<(Vec<f32>, Stats), GemmError> {
        let (t, ops, precision, region) =
            (self.spec.tokens, self.ops, self.spec.precision, self.region);
        let options = RunOptions {
            cycle_limit: self.spec.cycle_limit,
            ..RunOptions::default()
        };
        Ok(match phase {
            Phase::Forward => {
                let run = StreamMatmul {
                    region,
                    tokens: t,
                    x: &ops.x,
                    w,
                    bias: None,
                    precision,
                }
                .run(self.fabric, options)?;
                (run.y, run.stats)
            }
            Phase::InputGrad => {
                let wt = w.transpose();
                let run = StreamMatmul {
                    region,
                    tokens: t,
                    x: &ops.dy,
                    w: &wt,
                    bias: None,
                    precision,
                }
                .run(self.fabric, options)?;
                (run.y, run.stats)
            }
            Phase::WeightGrad => {
                let run = WeightGrad {
                    region,
                    tokens: t,
                    x: &ops.x,
                    dy: &ops.dy,
                    pattern: w,
                    bias: false,
                    precision,
                }
                .run(self.fabric, options)?;
                (run.grad.to_dense(), run.stats)
            }
        })
    }

    fn error(&self, phase: Phase, got: &[f32]) -> f64 {
        let (t, k, n, o) = (self.spec.tokens, self.spec.k, self.spec.n, self.ops);
        let want = match phase {
            Phase::Forward => products::matmul(&o.x, &o.w, t, k, n),
            Phase::InputGrad => products::matmul(&o.dy, &transpose(&o.w, k, n), t, n, k),
            Phase::WeightGrad => products::masked_weight_grad(&o.x, &o.dy, &o.mask.keep(), t, k, n),
        };
        let scale = want.iter().fold(f64::MIN_POSITIVE, |m, v| m.max(v.abs()));
        got.iter()
            .zip(&want)
            .map(|(g, w)| (f64::from(*g) - w).abs() / scale)
            .fold(0.0, f64::max)
    }
}

/// Every phase costed by its kernel's formula from the mask's kept entries.
fn fast_gemm(
    spec: &GemmSpec,
    fabric: &FabricConfig,
    region: Region,
    mask: &Mask,
) -> Result<GemmReport, GemmError> {
    let (t, k, n) = (spec.tokens, spec.k, spec.n);
    let cols = region.cols as usize;
    let streamed = ColumnCounts::streamed(k, n, &mask.keep(), cols);
    let transposed = ColumnCounts::streamed_transposed(k, n, &mask.keep(), cols);
    let nnz = mask.nnz() as u64;
    let phases = spec
        .phases
        .iter()
        .map(|&phase| {
            let (cycles, dense_cycles) = match phase {
                Phase::Forward => fast_product(spec, fabric, region, (k, n), &streamed)?,
                Phase::InputGrad => fast_product(spec, fabric, region, (n, k), &transposed)?,
                Phase::WeightGrad => fast_weight_grad(spec, fabric, region, &streamed)?,
            };
            let flops = |kept: u64| -> Result<u64, GemmError> {
                Ok(flops::linear_flops(t as u64, k as u64, n as u64, kept)?[phase.index()])
            };
            Ok(PhaseResult {
                phase,
                cycles,
                dense_cycles,
                flops_executed: flops(nnz)?,
                flops_dense: flops((k * n) as u64)?,
                max_rel_error: None,
                utilisation: None,
                breakdown: None,
                dense_breakdown: None,
            })
        })
        .collect::<Result<Vec<_>, GemmError>>()?;
    Ok(GemmReport {
        spec: spec.clone(),
        region,
        nnz: mask.nnz(),
        phases,
    })
}

/// The streamed product `[T x k] [k x n]` of the experiment on `region`, without values.
fn product_shape(spec: &GemmSpec, region: Region, (k, n): (usize, usize)) -> MatmulShape {
    MatmulShape {
        region,
        tokens: spec.tokens,
        k,
        n,
        bias: false,
        precision: spec.precision,
    }
}

/// The experiment's masked weight gradient on `region`, without values.
fn weight_grad_shape(spec: &GemmSpec, region: Region) -> WeightGradShape {
    WeightGradShape {
        region,
        tokens: spec.tokens,
        k: spec.k,
        n: spec.n,
        bias: false,
        precision: spec.precision,
    }
}

/// `(sparse, dense)` cycles of the streamed product `[T x k] [k x n]` by its formula.
fn fast_product(
    spec: &GemmSpec,
    fabric: &FabricConfig,
    region: Region,
    (k, n): (usize, usize),
    counts: &ColumnCounts,
) -> Result<(u64, u64), GemmError> {
    let shape = product_shape(spec, region, (k, n));
    let plan = shape.plan(fabric)?;
    let dense = StreamLoad::dense(plan.input.features, &plan.chunks);
    Ok((
        shape.estimate_cycles(fabric, &plan, &counts.load(&plan.chunks)),
        shape.estimate_cycles(fabric, &plan, &dense),
    ))
}

/// `(sparse, dense)` cycles of the masked weight gradient by its formula.
fn fast_weight_grad(
    spec: &GemmSpec,
    fabric: &FabricConfig,
    region: Region,
    counts: &ColumnCounts,
) -> Result<(u64, u64), GemmError> {
    let shape = weight_grad_shape(spec, region);
    let plan = shape.plan(fabric)?;
    let dense = StreamLoad::dense(plan.input.features, &plan.chunks);
    Ok((
        shape.estimate_cycles(fabric, &plan, &counts.load(&plan.chunks)),
        shape.estimate_cycles(fabric, &plan, &dense),
    ))
}

fn transpose(w: &[f32], k: usize, n: usize) -> Vec<f32> {
    (0..n * k).map(|i| w[(i % k) * n + i / k]).collect()
}

/// The busiest PE's cycles split into task overhead, other work, and waiting.
fn breakdown(stats: &Stats, fabric: &FabricConfig) -> Breakdown {
    let busiest = stats
        .pes
        .iter()
        .map(|(_, s)| s)
        .max_by_key(|s| s.busy_cycles);
    let Some(b) = busiest else {
        return Breakdown {
            task_overhead: 0,
            vector_work: 0,
            communication: stats.cycles,
        };
    };
    let per_task = u64::from(fabric.task_switch_cycles);
    let task_overhead = (b.tasks_run * per_task).min(b.busy_cycles);
    Breakdown {
        task_overhead,
        vector_work: b.busy_cycles - task_overhead,
        communication: stats.cycles.saturating_sub(b.busy_cycles),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(sparsity: f64, precision: Precision) -> GemmSpec {
        GemmSpec {
            tokens: 16,
            k: 24,
            n: 20,
            sparsity,
            phases: Phase::ALL.to_vec(),
            precision,
            seed: 7,
            region: Some(Region::at_origin(4, 4)),
            cycle_limit: None,
            fidelity: Fidelity::Exact,
            numerics: true,
        }
    }

    #[test]
    fn every_phase_matches_the_cpu_and_the_flop_count() {
        let fabric = FabricConfig::rectangle(4, 6).unwrap();
        for s in [0.0, 0.5, 0.75] {
            let report = run_gemm(&spec(s, Precision::F32), &fabric).unwrap();
            // round(s * 480) zeros.
            assert_eq!(report.nnz, 480 - (s * 480.0f64).round() as usize);
            for p in &report.phases {
                let error = p.max_rel_error.unwrap();
                assert!(error < 1e-6, "{:?} at {s}: {error}", p.phase);
                assert_eq!(p.flops_executed, 2 * 16 * report.nnz as u64);
                assert_eq!(p.flops_dense, 2 * 16 * 480);
            }
        }
    }

    /// Peak RSS measured for exact forward fp16 gemms (`docs/performance.md`, "Memory"): the
    /// full wafer (994 x 750 x 750 at 0.75 on wse2, 5.93 GB; `ENGINE_BYTES_PER_PE` comes from
    /// it) and, independently, 128 x 128 x 128 on 128 x 128 PEs (94 MB, which includes the
    /// process's own few MB). The estimate the CLI checks before an exact run must not refuse
    /// them, nor be far off.
    #[test]
    fn the_exact_memory_estimate_is_near_the_measured_peaks() {
        let forward = |side: usize, k: usize, sparsity: f64| GemmSpec {
            tokens: side,
            k,
            n: k,
            sparsity,
            phases: vec![Phase::Forward],
            precision: Precision::F16,
            region: None,
            ..spec(sparsity, Precision::F16)
        };
        let cases = [
            (
                forward(994, 750, 0.75),
                FabricConfig::wse2(),
                5_926_808.0,
                0.05,
            ),
            (
                forward(128, 128, 0.0),
                FabricConfig::rectangle(128, 128).unwrap(),
                94e3,
                0.1,
            ),
        ];
        for (spec, fabric, measured_kb, tolerance) in cases {
            let region = plan_gemm(&spec, &fabric).unwrap();
            assert_eq!((region.cols, region.rows), (fabric.width, fabric.height));
            let estimate = exact_host_bytes(&spec, &fabric, region).unwrap() as f64;
            let ratio = estimate / (measured_kb * 1024.0);
            assert!((ratio - 1.0).abs() < tolerance, "{}: {ratio}", fabric.name);
        }
    }

    #[test]
    fn fp16_stays_within_fp16_rounding() {
        let fabric = FabricConfig::rectangle(4, 6).unwrap();
        let report = run_gemm(&spec(0.5, Precision::F16), &fabric).unwrap();
        for p in &report.phases {
            // Inputs rounded to fp16 (relative 2^-11 each), fp32 accumulation over <= 24 terms.
            let error = p.max_rel_error.unwrap();
            assert!(error < 5e-3, "{:?}: {error}", p.phase);
        }
    }

    #[test]
    fn impossible_specs_are_refused_before_anything_is_allocated() {
        let fabric = FabricConfig::rectangle(4, 6).unwrap();
        // round(0.99 x 16) = 16: every weight pruned.
        let tiny = GemmSpec {
            k: 4,
            n: 4,
            sparsity: 0.99,
            ..spec(0.0, Precision::F32)
        };
        assert!(matches!(
            run_gemm(&tiny, &fabric),
            Err(GemmError::AllPruned { weights: 16, .. })
        ));
        // 2^62 tokens over 6 rows: far beyond 48 KiB per PE (and beyond host memory: this would
        // abort in the allocator if the operands were drawn first).
        let huge = GemmSpec {
            tokens: 1 << 62,
            region: None,
            ..spec(0.0, Precision::F32)
        };
        assert!(matches!(
            run_gemm(&huge, &fabric),
            Err(GemmError::DoesNotFit {
                available: 49152,
                ..
            })
        ));
        assert_eq!(host_bytes(&huge), None);
        let outside = GemmSpec {
            region: Some(Region::at_origin(5, 6)),
            ..spec(0.0, Precision::F32)
        };
        assert!(matches!(
            run_gemm(&outside, &fabric),
            Err(GemmError::RegionOutside { cols: 5, .. })
        ));
    }

    #[test]
    fn a_cycle_limit_stops_a_phase_and_names_where_work_remains() {
        let fabric = FabricConfig::rectangle(4, 6).unwrap();
        let limited = GemmSpec {
            cycle_limit: Some(20),
            ..spec(0.0, Precision::F32)
        };
        let err = run_gemm(&limited, &fabric).unwrap_err().to_string();
        assert!(err.starts_with("cycle limit 20 reached"), "{err}");
        assert!(err.contains("PE ("), "{err}");
    }

    #[test]
    fn a_dense_spec_costs_the_same_as_its_baseline() {
        let fabric = FabricConfig::rectangle(4, 6).unwrap();
        let report = run_gemm(&spec(0.0, Precision::F32), &fabric).unwrap();
        for p in &report.phases {
            assert_eq!(p.cycles, p.dense_cycles);
        }
    }
}
