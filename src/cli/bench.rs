//! `wafersim bench`: how fast the exact simulator runs, on fixed workloads, for several thread
//! counts: simulated cycles, engine events, simulated MACs per host second, host seconds (median
//! of repeated runs) and peak memory, with a check that every thread count gives the same results.
//!
//! Each measurement is one run in a fresh child process (`wafersim bench --child CASE`), so the
//! peak memory (`VmHWM`) is that run's own and `RAYON_NUM_THREADS` sets the thread count of code
//! that runs with the default options (the training step). The child times only the simulated
//! work (building the programs, running them, reading results back); it checks the numbers
//! outside the timed part (the gemm against an f64 CPU product, the step's loss for being finite)
//! and prints one JSON line, with a digest of everything the run produced.
//!
//! Not a test: nothing here asserts a speed. See `docs/performance.md` for measurements.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde_json::{Value, json};
use wafersim_kernels::{MatmulShape, Precision, Region, StreamMatmul, StreamedMatrix};
use wafersim_sim::{FabricConfig, RunOptions};

use super::{bad_input, check_threads, guard, write_json};
use crate::compile::plan_step;
use crate::model::{GptConfig, init_params};
use crate::reference::{Batch, products};
use crate::runtime::{GradientSet, LossScale, StepInputs, run_step};
use crate::sparsity::ModelMasks;

/// Arguments of `wafersim bench`.
#[derive(clap::Args)]
pub struct Args {
    /// Workloads, comma-separated [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    cases: Vec<Case>,
    /// Thread counts to measure, comma-separated. Given before `bench` it means the same:
    /// `wafersim --threads 4 bench` measures 4 threads alone; given in both places it is refused.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Runs per case and thread count (the median host time is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// The region (COLSxROWS) of the `gemm256` case on its 32 x 32 fabric.
    #[arg(long, default_value = "4x4", value_name = "COLSxROWS")]
    region: String,
    /// Also write the measurements as JSON (schema wafersim.bench/v1).
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Internal: measure one run of this case in this process and print it as JSON.
    #[arg(long, value_enum, hide = true)]
    child: Option<Case>,
}

/// A workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Case {
    /// Dense Y = X W, 256 x 256 x 256, fp16, forward, on a 32 x 32 fabric, region `--region`.
    Gemm256,
    /// The same product on the whole 32 x 32 fabric.
    Gemm256Full,
    /// The tiny model's training step (batch 2 x 32 tokens, fp32) on 16 x 16, sparsity 0.
    StepS0,
    /// The same step at sparsity 0.75.
    StepS75,
    /// Dense 256 x 256 x 256, fp16, forward, on the whole of a 64 x 64 fabric.
    Gemm64,
}

impl Case {
    const ALL: [Case; 5] = [
        Case::Gemm256,
        Case::Gemm256Full,
        Case::StepS0,
        Case::StepS75,
        Case::Gemm64,
    ];

    fn name(self) -> &'static str {
        match self {
            Case::Gemm256 => "gemm256",
            Case::Gemm256Full => "gemm256-full",
            Case::StepS0 => "step-s0",
            Case::StepS75 => "step-s75",
            Case::Gemm64 => "gemm64",
        }
    }
}

/// One run's measurement.
#[derive(Clone, Debug)]
struct Sample {
    setup: String,
    cycles: u64,
    events: u64,
    macs: u64,
    seconds: f64,
    peak_bytes: u64,
    digest: u64,
    check: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let region = super::gemm::parse_region(&args.region)?;
    if let Some(case) = args.child {
        let threads = args.threads.first().copied().unwrap_or(1);
        let sample = measure(case, threads, region)?;
        outln!("{}", sample_json(&sample))?;
        return Ok(());
    }
    if threads_given_twice(std::env::args_os().skip(1)) {
        return Err(bad_input(
            "--threads",
            anyhow::anyhow!(
                "given both before and after `bench`: give the thread counts to measure once (`wafersim bench --threads 1,2`)"
            ),
        ));
    }
    if args.repeat == 0 {
        return Err(bad_input(
            "--repeat",
            anyhow::anyhow!("need at least one run"),
        ));
    }
    for &n in &args.threads {
        check_threads(n)?;
    }
    let cases = if args.cases.is_empty() {
        Case::ALL.to_vec()
    } else {
        args.cases.clone()
    };
    if cases.contains(&Case::Gemm256) {
        check_gemm256_region(&args.region, region)?;
    }
    if let Some(path) = &args.json {
        guard::check_output_file("--json", path)?;
    }
    print_machine()?;
    let mut rows = Vec::new();
    for case in cases {
        rows.push(bench_case(case, &args)?);
    }
    if let Some(path) = &args.json {
        write_json(
            path,
            &json!({ "schema": "wafersim.bench/v1", "cases": rows }),
        )?;
    }
    Ok(())
}

/// Whether the command line `args` (without the program name) gives `--threads` both before the
/// `bench` subcommand (the global flag) and after it (bench's list). The global flag and bench's
/// list share their name, so clap hands bench one of them and drops the other without a word;
/// only the command line as typed tells them apart.
fn threads_given_twice(args: impl IntoIterator<Item = OsString>) -> bool {
    let is_threads =
        |a: &OsStr| a == "--threads" || a.to_str().is_some_and(|a| a.starts_with("--threads="));
    let mut args = args.into_iter();
    let mut before = false;
    while let Some(arg) = args.next() {
        if arg == "bench" {
            break;
        }
        if is_threads(&arg) {
            before = true;
            if arg == "--threads" {
                args.next();
            }
        }
    }
    before && args.any(|a| is_threads(&a))
}

fn print_machine() -> anyhow::Result<()> {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    outln!("host: {cpus} CPUs, {model}")?;
    Ok(())
}

/// Runs `case` `repeat` times per thread count in child processes; prints and returns a summary.
fn bench_case(case: Case, args: &Args) -> anyhow::Result<Value> {
    let mut per_threads = Vec::new();
    for &threads in &args.threads {
        let samples = (0..args.repeat)
            .map(|_| run_child(case, threads, &args.region))
            .collect::<anyhow::Result<Vec<_>>>()?;
        per_threads.push((threads, samples));
    }
    let first = &per_threads[0].1[0];
    let identical = per_threads
        .iter()
        .flat_map(|(_, s)| s)
        .all(|s| s.digest == first.digest);
    outln!("\n{}: {} ({})", case.name(), first.setup, first.check)?;
    outln!(
        "  {:>7} {:>10} {:>12} {:>13} {:>10} {:>11} {:>12} {:>8}",
        "threads",
        "cycles",
        "events",
        "MACs",
        "host s",
        "M MAC/s",
        "M events/s",
        "peak MB"
    )?;
    let mut rows = Vec::new();
    let base = median(&per_threads[0].1);
    for (threads, samples) in &per_threads {
        let seconds = median(samples);
        let peak = samples.iter().map(|s| s.peak_bytes).max().unwrap_or(0);
        let s = &samples[0];
        outln!(
            "  {:>7} {:>10} {:>12} {:>13} {:>10.3} {:>11.1} {:>12.2} {:>8.1}",
            threads,
            s.cycles,
            s.events,
            s.macs,
            seconds,
            s.macs as f64 / seconds / 1e6,
            s.events as f64 / seconds / 1e6,
            peak as f64 / 1e6
        )?;
        rows.push(json!({
            "threads": threads, "cycles": s.cycles, "events": s.events, "macs": s.macs,
            "host_seconds_median": seconds,
            "host_seconds": samples.iter().map(|s| s.seconds).collect::<Vec<_>>(),
            "macs_per_second": s.macs as f64 / seconds, "peak_bytes": peak,
            "speedup": base / seconds,
        }));
    }
    for (threads, samples) in per_threads.iter().skip(1) {
        outln!(
            "  {threads} threads vs {}: {:.2}x",
            per_threads[0].0,
            base / median(samples)
        )?;
    }
    outln!(
        "  results identical across thread counts and runs: {}",
        if identical { "yes" } else { "NO" }
    )?;
    if !identical {
        bail!("{}: runs gave different results", case.name());
    }
    Ok(json!({
        "case": case.name(), "setup": first.setup, "check": first.check,
        "identical": identical, "runs": rows,
    }))
}

fn median(samples: &[Sample]) -> f64 {
    let mut s: Vec<f64> = samples.iter().map(|s| s.seconds).collect();
    s.sort_by(f64::total_cmp);
    let mid = s.len() / 2;
    if s.len() % 2 == 1 {
        s[mid]
    } else {
        (s[mid - 1] + s[mid]) / 2.0
    }
}

/// The `gemm256` case's product placed on `region` of its 32 x 32 fabric, checked before any
/// run (the region inside the fabric, every PE's tiles within its SRAM).
fn check_gemm256_region(spec: &str, region: Region) -> anyhow::Result<()> {
    let n = GEMM_N;
    let shape = MatmulShape {
        region,
        tokens: n,
        k: n,
        n,
        bias: false,
        precision: GEMM_PRECISION,
    };
    let fabric = FabricConfig::rectangle(GEMM256_SIDE, GEMM256_SIDE)?;
    match shape.plan(&fabric) {
        Ok(_) => Ok(()),
        Err(e) => Err(bad_input(format!("--region {spec}"), e)),
    }
}

fn run_child(case: Case, threads: usize, region: &str) -> anyhow::Result<Sample> {
    let exe = std::env::current_exe().context("finding the wafersim executable")?;
    let out = Command::new(exe)
        .args(["bench", "--child", case.name(), "--region", region])
        .args(["--threads", &threads.to_string()])
        .env("RAYON_NUM_THREADS", threads.to_string())
        .output()
        .context("starting a benchmark run")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{} ({threads} threads) failed: {}",
            case.name(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let line = stdout.lines().last().unwrap_or_default();
    parse_sample(line).with_context(|| format!("reading the run's report \"{line}\""))
}

fn sample_json(s: &Sample) -> Value {
    json!({
        "setup": s.setup, "cycles": s.cycles, "events": s.events, "macs": s.macs,
        "seconds": s.seconds, "peak_bytes": s.peak_bytes, "digest": s.digest.to_string(),
        "check": s.check,
    })
}

fn parse_sample(line: &str) -> anyhow::Result<Sample> {
    let v: Value = serde_json::from_str(line)?;
    let int = |k: &str| v[k].as_u64().with_context(|| format!("field {k}"));
    let text = |k: &str| v[k].as_str().map(str::to_string).context(k.to_string());
    Ok(Sample {
        setup: text("setup")?,
        cycles: int("cycles")?,
        events: int("events")?,
        macs: int("macs")?,
        seconds: v["seconds"].as_f64().context("field seconds")?,
        peak_bytes: int("peak_bytes")?,
        digest: text("digest")?.parse()?,
        check: text("check")?,
    })
}

/// The gemm cases' product: `Y = X W`, `GEMM_N` cubed, fp16, forward.
const GEMM_N: usize = 256;
const GEMM_PRECISION: Precision = Precision::F16;
/// The fabric side of `gemm256` and `gemm256-full`.
const GEMM256_SIDE: u32 = 32;

/// One run of `case` in this process.
fn measure(case: Case, threads: usize, region: Region) -> anyhow::Result<Sample> {
    match case {
        Case::Gemm256 => gemm(GEMM256_SIDE, region, threads),
        Case::Gemm256Full => {
            let whole = Region::at_origin(GEMM256_SIDE, GEMM256_SIDE);
            gemm(GEMM256_SIDE, whole, threads)
        }
        Case::Gemm64 => gemm(64, Region::at_origin(64, 64), threads),
        Case::StepS0 => step(0.0),
        Case::StepS75 => step(0.75),
    }
}

fn normal_values(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 1.0).expect("unit normal");
    (0..len).map(|_| normal.sample(&mut rng)).collect()
}

/// The dense `GEMM_N` cubed forward product on `region` of a `side x side` fabric.
fn gemm(side: u32, region: Region, threads: usize) -> anyhow::Result<Sample> {
    let n = GEMM_N;
    let fabric = FabricConfig::rectangle(side, side)?;
    let (x, w) = (normal_values(1, n * n), normal_values(2, n * n));
    let w_stream = StreamedMatrix::from_dense(n, n, &w, None);
    let product = StreamMatmul {
        region,
        tokens: n,
        x: &x,
        w: &w_stream,
        bias: None,
        precision: GEMM_PRECISION,
    };
    let options = RunOptions {
        threads,
        ..RunOptions::default()
    };
    let started = Instant::now();
    let run = product.run(&fabric, options).context("gemm")?;
    let seconds = started.elapsed().as_secs_f64();
    let want = products::matmul(&x, &w, n, n, n);
    let scale = want.iter().fold(f64::MIN_POSITIVE, |m, v| m.max(v.abs()));
    let error = run
        .y
        .iter()
        .zip(&want)
        .map(|(g, w)| (f64::from(*g) - w).abs() / scale)
        .fold(0.0, f64::max);
    // fp16 inputs (relative 2^-11 each), fp32 accumulation of 256 terms.
    if error > 5e-3 {
        bail!("gemm: max relative error {error:.2e} against the CPU");
    }
    let mut digest = Fnv::new();
    digest.bytes(serde_json::to_string(&run.stats)?.as_bytes());
    for v in &run.y {
        digest.bytes(&v.to_bits().to_le_bytes());
    }
    Ok(Sample {
        setup: format!(
            "Y = X W, {n} x {n} x {n}, fp16, forward, {side} x {side} fabric, region {} x {}",
            region.cols, region.rows
        ),
        cycles: run.stats.cycles,
        events: run.stats.events,
        macs: run.stats.total.fmacs,
        seconds,
        peak_bytes: peak_memory(),
        digest: digest.0,
        check: format!("max relative error {error:.1e} against an f64 CPU product"),
    })
}

/// The tiny model's training step at `sparsity` on a 16 x 16 fabric (the quick start's).
fn step(sparsity: f64) -> anyhow::Result<Sample> {
    let config = GptConfig::preset("tiny")?;
    let fabric = FabricConfig::rectangle(16, 16)?;
    let (batch, seq, seed) = (2, 32, 0);
    let mut params = init_params(&config, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(u64::MAX);
    let tokens = (0..batch * seq)
        .map(|_| rng.random_range(0..config.vocab_size as u32))
        .collect();
    let batch = Batch::new(&config, batch, seq, tokens)?;
    let masks = ModelMasks::random(&config, sparsity, seed)?;
    masks.apply(&mut params)?;
    let plan = plan_step(&config, batch.batch, batch.seq, &fabric, Precision::F32)?;
    let inputs = StepInputs {
        config: &config,
        params: &params,
        masks: &masks,
        batch: &batch,
        fabric: &fabric,
        plan: &plan,
        dense_baseline: false,
        prompt: None,
        gradients: GradientSet::All,
        loss_scale: LossScale::Auto,
    };
    let events_before = wafersim_sim::events_processed();
    let started = Instant::now();
    let step = run_step(inputs)?;
    let seconds = started.elapsed().as_secs_f64();
    let events = wafersim_sim::events_processed() - events_before;
    if !step.loss.is_finite() {
        bail!("step: the loss is {}", step.loss);
    }
    let mut digest = Fnv::new();
    digest.bytes(&step.loss.to_bits().to_le_bytes());
    for r in &step.cost.records {
        digest.bytes(&r.cycles.to_le_bytes());
        digest.bytes(&r.fmacs.to_le_bytes());
    }
    digest.bytes(&events.to_le_bytes());
    Ok(Sample {
        setup: format!(
            "tiny model training step, batch {} x {} tokens, fp32, sparsity {sparsity}, 16 x 16 fabric, region {} x {}",
            batch.batch, batch.seq, plan.region.cols, plan.region.rows
        ),
        cycles: step.cost.cycles(),
        events,
        macs: step.cost.records.iter().map(|r| r.fmacs).sum(),
        seconds,
        peak_bytes: peak_memory(),
        digest: digest.0,
        check: format!("loss {:.5}", step.loss),
    })
}

/// The process's peak resident memory (`VmHWM`), in bytes (0 where `/proc` is missing).
fn peak_memory() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// FNV-1a, 64 bits: a digest of a run's results to compare runs by.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_before_and_after_bench_are_told_apart() {
        let given = |line: &str| threads_given_twice(line.split(' ').map(OsString::from));
        assert!(given("--threads 2 bench --threads 1,4"));
        assert!(given("--threads=2 bench --threads=1"));
        assert!(!given("--threads 2 bench"));
        assert!(!given("bench --threads 1,2"));
        // A value that reads "bench" is the global flag's, not the subcommand.
        assert!(!given("--threads bench bench --cases gemm256"));
        assert!(!given("bench --cases gemm256"));
    }

    #[test]
    fn fnv_matches_the_published_test_vectors() {
        // FNV-1a 64-bit: "" -> cbf29ce484222325, "a" -> af63dc4c8601ec8c.
        let mut h = Fnv::new();
        assert_eq!(h.0, 0xcbf2_9ce4_8422_2325);
        h.bytes(b"a");
        assert_eq!(h.0, 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn samples_survive_the_trip_through_json() {
        let s = Sample {
            setup: "x".into(),
            cycles: 12,
            events: 34,
            macs: 56,
            seconds: 0.25,
            peak_bytes: 1 << 20,
            digest: u64::MAX,
            check: "ok".into(),
        };
        let back = parse_sample(&sample_json(&s).to_string()).unwrap();
        assert_eq!(
            (
                back.cycles,
                back.events,
                back.macs,
                back.peak_bytes,
                back.digest
            ),
            (12, 34, 56, 1 << 20, u64::MAX)
        );
        assert_eq!(back.seconds, 0.25);
    }

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        let at = |seconds| Sample {
            setup: String::new(),
            cycles: 0,
            events: 0,
            macs: 0,
            seconds,
            peak_bytes: 0,
            digest: 0,
            check: String::new(),
        };
        assert_eq!(median(&[at(3.0), at(1.0), at(2.0)]), 2.0);
        assert_eq!(median(&[at(4.0), at(1.0), at(3.0), at(2.0)]), 2.5);
    }
}
