//! `wafersim gemm`: one linear layer on the fabric, sparse against dense, every number checked
//! (values against the CPU, executed FLOPs against the analytic count).

use std::path::PathBuf;

use serde_json::{Value, json};
use wafersim_kernels::{Precision, Region};

use super::{bad_input, guard, load_fabric, write_json};
use crate::flops::Phase;
use crate::gemm::{
    GemmError, GemmReport, GemmSpec, PhaseResult, exact_host_bytes, host_bytes, plan_gemm, run_gemm,
};
use crate::runtime::Fidelity;

/// Arguments of `wafersim gemm`.
#[derive(clap::Args)]
pub struct Args {
    /// Tokens T (rows of X).
    #[arg(long, value_name = "T")]
    m: usize,
    /// Input features K.
    #[arg(long, value_name = "K")]
    k: usize,
    /// Output features N.
    #[arg(long, value_name = "N")]
    n: usize,
    /// Fraction of W pruned, in [0, 1).
    #[arg(
        long,
        default_value_t = 0.0,
        value_name = "S",
        allow_hyphen_values = true
    )]
    sparsity: f64,
    /// The machine: wse2, wse3, WxH (wse2 parameters on a W x H rectangle), or a .toml/.json file.
    #[arg(long, value_name = "FABRIC")]
    fabric: String,
    /// Which pass of the layer to run.
    #[arg(long, value_enum, default_value = "all")]
    phase: PhaseArg,
    /// Storage precision of activations and streamed weights.
    #[arg(long, value_enum, default_value = "fp32")]
    dtype: DtypeArg,
    /// Seed of the data and the mask.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Run on a COLSxROWS region at the fabric's corner [default: the largest that has work].
    #[arg(long, value_name = "COLSxROWS")]
    region: Option<String>,
    /// How cycles are obtained: simulate every wavelet, or the kernels' cost formulas.
    #[arg(long, value_enum, default_value = "exact")]
    fidelity: FidelityArg,
    /// Do not check the values against the CPU (cycles and FLOPs only).
    #[arg(long)]
    no_numerics: bool,
    /// Also write the results as JSON (schema wafersim.gemm/v1).
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Stop (exit code 1, naming where work remains) if a run is still working at this cycle.
    #[arg(long, value_name = "CYCLES")]
    cycle_limit: Option<u64>,
}

/// `--fidelity`.
#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum FidelityArg {
    /// The event-driven engine: every wavelet simulated (small fabrics and models).
    Exact,
    /// The kernels' analytic cost formulas: nothing simulated (any size).
    Fast,
}

impl FidelityArg {
    pub(crate) fn fidelity(self) -> Fidelity {
        match self {
            FidelityArg::Exact => Fidelity::Exact,
            FidelityArg::Fast => Fidelity::Fast,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PhaseArg {
    Fwd,
    BwdData,
    BwdWeight,
    All,
}

/// `--dtype`.
#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum DtypeArg {
    Fp32,
    Fp16,
}

impl DtypeArg {
    pub(crate) fn precision(self) -> Precision {
        match self {
            DtypeArg::Fp32 => Precision::F32,
            DtypeArg::Fp16 => Precision::F16,
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let fabric = load_fabric(&args.fabric)?;
    let sparsity =
        crate::sparsity::validate(args.sparsity).map_err(|e| bad_input("--sparsity", e))?;
    let region = args.region.as_deref().map(parse_region).transpose()?;
    let spec = GemmSpec {
        tokens: args.m,
        k: args.k,
        n: args.n,
        sparsity,
        phases: match args.phase {
            PhaseArg::Fwd => vec![Phase::Forward],
            PhaseArg::BwdData => vec![Phase::InputGrad],
            PhaseArg::BwdWeight => vec![Phase::WeightGrad],
            PhaseArg::All => Phase::ALL.to_vec(),
        },
        precision: args.dtype.precision(),
        seed: args.seed,
        region,
        cycle_limit: args.cycle_limit,
        fidelity: args.fidelity.fidelity(),
        numerics: !args.no_numerics,
    };
    let plan_error = |e| match e {
        e @ (GemmError::Empty { .. } | GemmError::Sparsity(_)) => bad_input("gemm", e),
        e @ GemmError::AllPruned { .. } => bad_input("--sparsity", e),
        e @ GemmError::TooFewColors { .. } => bad_input("--fabric", e),
        e @ (GemmError::RegionOutside { .. }
        | GemmError::Kernel(wafersim_kernels::KernelError::Shape { .. })) => {
            bad_input("--region", e)
        }
        other => anyhow::Error::new(other),
    };
    if spec.cycle_limit == Some(0) {
        return Err(bad_input(
            "--cycle-limit",
            anyhow::anyhow!("0 stops before the first cycle; give at least 1"),
        ));
    }
    if spec.cycle_limit.is_some() && spec.fidelity == Fidelity::Fast {
        return Err(bad_input(
            "--cycle-limit",
            anyhow::anyhow!(
                "limits the exact fidelity's simulation; the fast one simulates nothing"
            ),
        ));
    }
    let chosen = plan_gemm(&spec, &fabric).map_err(plan_error)?;
    if let Some(warning) = super::unvalidated_timing_warning(&fabric, spec.fidelity) {
        eprintln!("{warning}");
    }
    if let Some(path) = &args.json {
        guard::check_output_file("--json", path)?;
    }
    match spec.fidelity {
        Fidelity::Exact => guard::check_host_memory(
            "the layer's operands and the simulated region",
            exact_host_bytes(&spec, &fabric, chosen),
        )?,
        Fidelity::Fast => guard::check_host_memory("the layer's operands", host_bytes(&spec))?,
    }
    let report = run_gemm(&spec, &fabric).map_err(plan_error)?;
    // The file first: a terminal or pipe that goes away while the table prints loses nothing.
    if let Some(path) = &args.json {
        write_json(path, &report_json(&report, &fabric))?;
    }
    print_report(&report, &fabric)?;
    Ok(())
}

/// `COLSxROWS` (`--region`) as a region at the origin.
pub(crate) fn parse_region(text: &str) -> anyhow::Result<Region> {
    let parsed = text
        .split_once(['x', 'X'])
        .and_then(|(c, r)| Some((c.trim().parse::<u32>().ok()?, r.trim().parse::<u32>().ok()?)));
    match parsed {
        Some((cols, rows)) if cols > 0 && rows > 0 => Ok(Region::at_origin(cols, rows)),
        _ => Err(bad_input(
            "--region",
            anyhow::anyhow!("\"{text}\" is not COLSxROWS such as 16x8"),
        )),
    }
}

fn print_report(r: &GemmReport, fabric: &wafersim_sim::FabricConfig) -> anyhow::Result<()> {
    let s = &r.spec;
    outln!(
        "gemm Y[{} x {}] = X[{} x {}] W[{} x {}], sparsity {} ({} of {} weights kept), {}",
        s.tokens,
        s.n,
        s.tokens,
        s.k,
        s.k,
        s.n,
        s.sparsity,
        r.nnz,
        s.k * s.n,
        s.precision.name()
    )?;
    outln!(
        "fabric {} ({} x {} PEs, {} MHz), region {} x {} PEs, {} fidelity",
        fabric.name,
        fabric.width,
        fabric.height,
        fabric.clock_mhz,
        r.region.cols,
        r.region.rows,
        s.fidelity.name()
    )?;
    outln!()?;
    outln!(
        "{:<16} {:>12} {:>12} {:>9} {:>9} {:>14} {:>11} {:>6}  main cause of the gap to 1/density",
        "phase",
        "cycles",
        "dense cycles",
        "cycle red",
        "FLOP red",
        match s.fidelity {
            Fidelity::Exact => "FLOPs executed",
            Fidelity::Fast => "FLOPs counted",
        },
        "max rel err",
        "util"
    )?;
    for p in &r.phases {
        print_row(p)?;
    }
    if r.phases.len() > 1 {
        let (c, d) = (r.cycles(), r.dense_cycles());
        let f: u64 = r.phases.iter().map(|p| p.flops_executed).sum();
        let fd: u64 = r.phases.iter().map(|p| p.flops_dense).sum();
        outln!(
            "{:<16} {:>12} {:>12} {:>8.3}x {:>8.3}x {:>14}",
            "all",
            c,
            d,
            d as f64 / c as f64,
            fd as f64 / f.max(1) as f64,
            f
        )?;
    }
    let us = r.cycles() as f64 / f64::from(fabric.clock_mhz);
    outln!(
        "\nsparse step: {us:.1} us at {} MHz; ideal cycle reduction 1/density = {:.3}x",
        fabric.clock_mhz,
        (s.k * s.n) as f64 / r.nnz.max(1) as f64
    )?;
    Ok(())
}

fn print_row(p: &PhaseResult) -> anyhow::Result<()> {
    let error = p
        .max_rel_error
        .map_or_else(|| "-".into(), |e| format!("{e:.2e}"));
    let util = p
        .utilisation
        .map_or_else(|| "-".into(), |u| format!("{:.1}%", 100.0 * u));
    outln!(
        "{:<16} {:>12} {:>12} {:>8.3}x {:>8.3}x {:>14} {:>11} {:>6}  {}",
        p.phase.name(),
        p.cycles,
        p.dense_cycles,
        p.cycle_reduction(),
        p.flop_reduction(),
        p.flops_executed,
        error,
        util,
        gap_cause(p)
    )?;
    Ok(())
}

/// The part of the busiest PE's time that scaled worst, with its excess cycles.
fn gap_cause(p: &PhaseResult) -> String {
    if p.breakdown.is_none() {
        return "- (no busiest PE without simulation)".into();
    }
    match p.shortfall().first() {
        Some(&(name, excess)) if excess > 0 => format!("{name} (+{excess} cycles)"),
        _ => "none: scales with the density".into(),
    }
}

fn breakdown_json(b: &Option<crate::gemm::Breakdown>) -> Value {
    match b {
        Some(b) => json!({
            "task_overhead_cycles": b.task_overhead,
            "vector_work_cycles": b.vector_work,
            "communication_cycles": b.communication,
        }),
        None => Value::Null,
    }
}

fn phase_json(p: &PhaseResult) -> Value {
    json!({
        "phase": p.phase.name(),
        "cycles": p.cycles,
        "dense_cycles": p.dense_cycles,
        "cycle_reduction": p.cycle_reduction(),
        "flops_executed": p.flops_executed,
        "flops_dense": p.flops_dense,
        "flop_reduction": p.flop_reduction(),
        "max_rel_error": p.max_rel_error,
        "pe_utilisation": p.utilisation,
        "busiest_pe": breakdown_json(&p.breakdown),
        "busiest_pe_dense": breakdown_json(&p.dense_breakdown),
        "gap_to_ideal": p
            .shortfall()
            .iter()
            .map(|(name, excess)| json!({"cause": name, "excess_cycles": excess}))
            .collect::<Vec<_>>(),
    })
}

fn report_json(r: &GemmReport, fabric: &wafersim_sim::FabricConfig) -> Value {
    let s = &r.spec;
    let (c, d) = (r.cycles(), r.dense_cycles());
    let f: u64 = r.phases.iter().map(|p| p.flops_executed).sum();
    let fd: u64 = r.phases.iter().map(|p| p.flops_dense).sum();
    let pes = r.region.pes() as f64;
    let busy: Option<f64> = r
        .phases
        .iter()
        .map(|p| p.utilisation.map(|u| u * p.cycles as f64 * pes))
        .sum();
    let max_error = r
        .phases
        .iter()
        .map(|p| p.max_rel_error)
        .try_fold(0.0, |m: f64, e| e.map(|e| m.max(e)));
    json!({
        "schema": "wafersim.gemm/v1",
        "units": {
            "cycles": "fabric clock cycles", "flops": "floating-point operations (1 FMAC = 2)",
            "max_rel_error": "max |fabric - cpu| / max |cpu| (null: not checked)", "pe_utilisation": "busy core cycles / (cycles x region PEs) (null: not simulated)",
            "flops_executed": "executed by the fabric (exact fidelity) or the analytic count (fast: nothing runs)",
        },
        "fidelity": s.fidelity.name(),
        "m": s.tokens, "k": s.k, "n": s.n, "sparsity": s.sparsity, "nnz": r.nnz,
        "dtype": s.precision.name(),
        "seed": s.seed,
        "fabric": super::fabric_json(fabric),
        "region": { "cols": r.region.cols, "rows": r.region.rows },
        "cycles": c,
        "dense_cycles": d,
        "cycle_reduction": d as f64 / c as f64,
        "flops_executed": f,
        "flops_dense": fd,
        "flop_reduction": fd as f64 / f.max(1) as f64,
        "max_rel_error": max_error,
        "pe_utilisation": busy.map(|b| b / (c as f64 * pes)),
        "phases": r.phases.iter().map(phase_json).collect::<Vec<_>>(),
    })
}
