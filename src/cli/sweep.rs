//! `wafersim sweep`: training steps of one model at several sparsities on the fabric, with the
//! FLOP and cycle reductions against the dense step. With no arguments it runs the quick start:
//! the tiny model at 0, 0.5, 0.75 and 0.9 on a 16 x 16 fabric.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use wafersim_kernels::Precision;
use wafersim_sim::FabricConfig;

use super::exact_cost::{self, ExactRun};
use super::fit::AttentionFit;
use super::progress::Progress;
use super::{bad_input, checked, guard, load_fabric};
use crate::breakdown::Causes;
use crate::compile::{StepPlan, plan_step};
use crate::model::checkpoint::stage_bytes;
use crate::model::{GptConfig, load_checkpoint};
use crate::plot::{PLOT_FILES, sweep_plots};
use crate::reference::Batch;
use crate::runtime::{CostInputs, Fidelity, GradientSet, LossScale, ReferenceCheck, cost_step};
use crate::sparsity::ModelMasks;
use crate::sweep::{
    Sweep, SweepPoint, SweepSetup, run_sweep_with, slowest_layer_heatmap, step_count,
};

/// Arguments of `wafersim sweep`.
#[derive(clap::Args)]
pub struct Args {
    /// A built-in model preset, initialised from --seed.
    #[arg(
        long,
        value_name = "PRESET",
        default_value = "tiny",
        conflicts_with = "checkpoint"
    )]
    model: String,
    /// A Hugging Face GPT-2 checkpoint folder instead of a preset.
    #[arg(long, value_name = "DIR")]
    checkpoint: Option<PathBuf>,
    /// Comma-separated sparsities, each in [0, 1).
    #[arg(
        long,
        value_name = "LIST",
        default_value = "0,0.5,0.75,0.9",
        allow_hyphen_values = true
    )]
    sparsity: String,
    /// The machine: wse2, wse3, WxH, or a .toml/.json file.
    #[arg(long, value_name = "FABRIC", default_value = "16x16")]
    fabric: String,
    /// Sequences of random tokens (from --seed).
    #[arg(long, value_name = "B", default_value_t = 2)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, value_name = "S", default_value_t = 32)]
    seq: usize,
    /// Storage precision of activations and streamed weights in the matmuls.
    #[arg(long, value_enum, default_value = "fp32")]
    dtype: super::gemm::DtypeArg,
    /// Loss scaling of the exact steps' backward pass (as `wafersim step --loss-scale`).
    #[arg(long, value_name = "auto|L", default_value = "auto", value_parser = super::step::parse_loss_scale)]
    loss_scale: LossScale,
    /// Seed of the weights, masks and tokens.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// How cycles are obtained: simulate every wavelet, or the kernels' cost formulas (then the
    /// losses come from the CPU reference).
    #[arg(long, value_enum, default_value = "exact")]
    fidelity: super::gemm::FidelityArg,
    /// Cycles and FLOPs only: no losses.
    #[arg(long)]
    no_numerics: bool,
    /// With --fidelity fast: also compute each step's loss on the CPU reference (slow and
    /// memory-hungry for big models, so off by default; without it a preset's weights are never
    /// drawn). Refused at the exact fidelity, which computes every loss (unless --no-numerics).
    #[arg(long, conflicts_with = "no_numerics")]
    losses: bool,
    /// Also write sweep.csv, sweep.json (schema wafersim.sweep/v2) and the SVG plots
    /// (reduction, cycles_by_op, gap_by_cause, utilisation) into this folder.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Everything about the inputs is checked before anything large is allocated or simulated.
    let fabric = load_fabric(&args.fabric)?;
    let fidelity = args.fidelity.fidelity();
    if args.losses && fidelity == Fidelity::Exact {
        return Err(bad_input(
            "--losses",
            anyhow::anyhow!(
                "only with --fidelity fast (the exact fidelity computes every loss; --no-numerics turns them off)"
            ),
        ));
    }
    let sparsities = parse_list(&args.sparsity)?;
    let (config, checkpoint_params) = match &args.checkpoint {
        Some(dir) => {
            let (config, params) =
                load_checkpoint(dir).map_err(|e| bad_input("--checkpoint", e))?;
            guard::note_new_masks_over_zeros(&params, "");
            (config, Some(params))
        }
        None => {
            let config = GptConfig::preset(&args.model).map_err(|e| bad_input("--model", e))?;
            (config, None)
        }
    };
    for &s in &sparsities {
        crate::sparsity::check_keeps_weights(&config, s).map_err(|e| bad_input("--sparsity", e))?;
    }
    let what = "--batch/--seq";
    guard::check_batch_shape(what, &config, args.batch, args.seq)?;
    let precision = args.dtype.precision();
    let plan =
        plan_step(&config, args.batch, args.seq, &fabric, precision).map_err(guard::plan_error)?;
    if let Some(warning) = super::unvalidated_timing_warning(&fabric, fidelity) {
        eprintln!("{warning}");
    }
    let attention = AttentionFit::of(&config, &plan, &fabric);
    attention.refuse_if_exact(fidelity)?;
    if fidelity == Fidelity::Exact {
        // Every sweep runs the dense step (its baseline), which keeps every weight.
        ExactRun {
            config: &config,
            kept_weights: exact_cost::kept_weights(&config, 0.0),
            pes: plan.region.pes(),
            checked: !args.no_numerics,
            optimizer: false,
        }
        .check_memory()?;
    }
    if let Some(dir) = &args.out {
        let names: Vec<&str> = OUTPUT_FILES.iter().chain(&PLOT_FILES).copied().collect();
        guard::check_output_folder("--out", dir, &names)?;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    rng.set_stream(u64::MAX);
    let tokens = (0..args.batch * args.seq)
        .map(|_| rng.random_range(0..config.vocab_size as u32))
        .collect();
    let batch =
        Batch::new(&config, args.batch, args.seq, tokens).map_err(|e| bad_input(what, e))?;
    let numerics = match fidelity {
        Fidelity::Exact => !args.no_numerics,
        Fidelity::Fast => args.losses,
    };
    let costing_only = fidelity == Fidelity::Fast && !numerics;
    if fidelity == Fidelity::Exact {
        announce_long_exact_sweep(&config, &batch, &fabric, &plan, step_count(&sparsities));
    }
    let params = match checkpoint_params {
        Some(params) => Some(params),
        None if costing_only => None,
        None => Some(guard::seeded_params(&config, args.seed)?),
    };
    let setup = SweepSetup {
        config: &config,
        params: params.as_ref(),
        batch: &batch,
        fabric: &fabric,
        precision,
        seed: args.seed,
        fidelity,
        numerics,
        loss_scale: args.loss_scale,
    };
    let started = Instant::now();
    let progress = Progress::new(Some(step_count(&sparsities) as u64), "steps");
    let on_step = |p: &SweepPoint| {
        progress.inc();
        progress.set_message(format!("s = {} done", p.sparsity));
    };
    let sweep = run_sweep_with(&setup, &sparsities, &on_step);
    drop(progress);
    let sweep = sweep.map_err(|e| match e {
        crate::sweep::SweepError::Compile(e) => guard::plan_error(e),
        e => anyhow::Error::new(e),
    })?;
    check_results(&sweep)?;
    let simulated = started.elapsed().as_secs_f64();
    // The files first: a terminal or pipe that goes away while the table prints loses nothing.
    if let Some(dir) = &args.out {
        let heatmap = match sweep
            .points
            .iter()
            .max_by(|a, b| a.sparsity.total_cmp(&b.sparsity))
        {
            Some(point) => slowest_layer_heatmap(&setup, &sweep, point)?,
            None => None,
        };
        let plots = sweep_plots(&sweep, heatmap.as_ref())?;
        write_outputs(dir, &setup, &sweep, &plots, attention.json())?;
    }
    print_table(&sweep, &config, &fabric, simulated)?;
    if let Some(warning) = attention.warning() {
        eprintln!("{warning}");
    }
    Ok(())
}

/// The files `--out` receives.
const OUTPUT_FILES: [&str; 2] = ["sweep.csv", "sweep.json"];

/// A NaN or infinite loss or gradient is an error, never a reported number.
/// Says on stderr when the exact sweep will take long: `steps` steps of at most the dense
/// step's cycles each (the fast count; a sparse step takes fewer). Says nothing if the step
/// cannot be costed: the sweep reports why.
fn announce_long_exact_sweep(
    config: &GptConfig,
    batch: &Batch,
    fabric: &FabricConfig,
    plan: &StepPlan,
    steps: usize,
) {
    let dense = ModelMasks::dense(config);
    let Ok(cost) = cost_step(CostInputs {
        config,
        masks: &dense,
        batch,
        fabric,
        plan,
        dense_baseline: false,
        prompt_len: 0,
        gradients: GradientSet::All,
    }) else {
        return;
    };
    let what = format!("the exact sweep ({steps} steps, at most the dense step's cycles each)");
    let cycles = cost.cycles() * steps as u64;
    if let Some(note) = exact_cost::long_run_note(&what, cycles, plan.region.pes()) {
        eprintln!("{note}");
    }
}

fn check_results(sweep: &Sweep) -> anyhow::Result<()> {
    for point in std::iter::once(&sweep.dense).chain(&sweep.points) {
        let sparsity = point.sparsity;
        if let Some(loss) = point.loss.filter(|l| !l.is_finite()) {
            anyhow::bail!(
                "the loss at sparsity {sparsity} is {loss} (non-finite): nothing was written; with --dtype fp16, activations may overflow"
            );
        }
        if let Some(check) = (point.check.as_ref()).filter(|c| !c.gradient_error.is_finite()) {
            anyhow::bail!(
                "the gradient of `{}` at sparsity {sparsity} is not finite (on the fabric or in the CPU reference): nothing was written; with --dtype fp16, a smaller --loss-scale may help",
                check.worst_gradient
            );
        }
    }
    Ok(())
}

/// The sparsities of `--sparsity`, in ascending order (the table, CSV and plots read as a curve);
/// one listed twice is refused.
fn parse_list(text: &str) -> anyhow::Result<Vec<f64>> {
    let mut list = text
        .split(',')
        .map(|item| crate::sparsity::parse_sparsity(item).map_err(|e| bad_input("--sparsity", e)))
        .collect::<anyhow::Result<Vec<f64>>>()?;
    list.sort_by(f64::total_cmp);
    if let Some(pair) = list.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(bad_input(
            "--sparsity",
            anyhow::anyhow!("{} is listed twice", pair[0]),
        ));
    }
    Ok(list)
}

fn print_table(
    sweep: &Sweep,
    config: &GptConfig,
    fabric: &wafersim_sim::FabricConfig,
    wall: f64,
) -> anyhow::Result<()> {
    let p = &sweep.plan;
    let dtype = checked::dtype_label(p.precision, sweep.loss_scale);
    outln!(
        "training step of a {} x {} GPT, batch {} x {} tokens, {dtype} on {} ({} x {} PEs at {} MHz), region {} x {}, {} fidelity",
        config.n_layer,
        config.n_embd,
        p.batch,
        p.seq,
        fabric.name,
        fabric.width,
        fabric.height,
        fabric.clock_mhz,
        p.region.cols,
        p.region.rows,
        sweep.fidelity.name()
    )?;
    // Wide enough for the largest count (a 1.3 B model's step has 16-digit FLOPs).
    let digits = |n: u64| n.to_string().len();
    let flops_width = sweep
        .points
        .iter()
        .map(|p| digits(p.flops))
        .fold(14, usize::max);
    let cycles_width = (sweep.points.iter())
        .map(|p| digits(p.cost.cycles()))
        .fold(12, usize::max);
    outln!(
        "\n{:>8} {:>10} {:>flops_width$} {:>9} {:>cycles_width$} {:>9} {:>10} {:>9}  largest cause of the gap (FLOP red - cycle red)",
        "sparsity",
        "loss",
        "matmul FLOPs",
        "FLOP red",
        "cycles",
        "cycle red",
        "time (us)",
        "ideal"
    )?;
    for point in &sweep.points {
        let loss = point.loss.map_or_else(|| "-".into(), |l| format!("{l:.5}"));
        let row = format!(
            "{:>8.3} {:>10} {:>flops_width$} {:>8.3}x {:>cycles_width$} {:>8.3}x {:>10.1} {:>8.3}x  {}",
            point.sparsity,
            loss,
            point.flops,
            sweep.flop_reduction(point),
            point.cost.cycles(),
            sweep.cycle_reduction(point),
            point.cost.cycles() as f64 / f64::from(fabric.clock_mhz),
            1.0 / (1.0 - point.sparsity),
            largest_gap(point)
        );
        // The dense row names no cause: no padding after its last column.
        outln!("{}", row.trim_end())?;
    }
    print_checks(sweep, p.precision)?;
    let verb = match sweep.fidelity {
        crate::runtime::Fidelity::Exact => "simulated",
        crate::runtime::Fidelity::Fast => "costed",
    };
    eprintln!("\n({verb} in {wall:.1} s)");
    Ok(())
}

/// The exact fidelity's numerics against the CPU reference's: the largest distances over the
/// sparsities in one line, and a warning for each sparsity beyond the tests' tolerance.
fn print_checks(sweep: &Sweep, precision: Precision) -> anyhow::Result<()> {
    let checked: Vec<(f64, &ReferenceCheck)> = (sweep.points.iter())
        .filter_map(|p| p.check.as_ref().map(|c| (p.sparsity, c)))
        .collect();
    let Some(&(_, first)) = checked.first() else {
        return Ok(());
    };
    let loss = checked
        .iter()
        .map(|(_, c)| c.loss_error)
        .fold(0.0, f64::max);
    let (at, worst) = checked
        .iter()
        .fold((checked[0].0, first), |(at, worst), &(s, c)| {
            if c.gradient_error > worst.gradient_error {
                (s, c)
            } else {
                (at, worst)
            }
        });
    outln!(
        "\nchecked against the CPU reference: losses within {loss:.1e}, gradients within {:.1e} (relative L2 per tensor, floored at {:.0e} of the gradient's norm; worst {} at sparsity {at})",
        worst.gradient_error,
        worst.tolerance.floor,
        worst.worst_gradient
    )?;
    for (s, c) in &checked {
        if let Some(warning) = checked::warning(c, precision) {
            eprintln!("{warning} (sparsity {s})");
        }
    }
    Ok(())
}

/// The largest cause of the gap between the FLOP and the cycle reduction, with its share of it.
fn largest_gap(point: &crate::sweep::SweepPoint) -> String {
    let gap = &point.gap;
    if point.sparsity == 0.0 || gap.gap_cycles <= 0.0 {
        return String::new();
    }
    let values = gap.causes.values();
    let largest = (0..values.len()).max_by(|&a, &b| values[a].total_cmp(&values[b]));
    match largest {
        Some(i) => format!(
            "{} ({:.0}% of {:.3}x)",
            Causes::LABELS[i],
            100.0 * values[i] / gap.gap_cycles,
            gap.gap_reduction()
        ),
        None => String::new(),
    }
}

/// The CSV header: the figures of a point, then the gap by cause in reduction units (`gap_*`)
/// and in cycles (`gap_cycles_*`).
fn csv_header() -> String {
    let mut header = String::from(
        "sparsity,loss,matmul_flops,flop_reduction,cycles,dense_cycles,cycle_reduction,ideal_cycles,gap_reduction,gap_cycles",
    );
    for name in Causes::NAMES {
        header.push_str(&format!(",gap_{name}"));
    }
    for name in Causes::NAMES {
        header.push_str(&format!(",gap_cycles_{name}"));
    }
    header.push('\n');
    header
}

fn csv_row(sweep: &Sweep, point: &SweepPoint) -> String {
    let gap = &point.gap;
    let loss = point.loss.map_or_else(String::new, |l| l.to_string());
    let mut row = format!(
        "{},{},{},{},{},{},{},{},{},{}",
        point.sparsity,
        loss,
        point.flops,
        sweep.flop_reduction(point),
        point.cost.cycles(),
        sweep.dense.cost.cycles(),
        sweep.cycle_reduction(point),
        gap.ideal_cycles(),
        gap.gap_reduction(),
        gap.gap_cycles
    );
    let values = gap
        .causes_in_reduction()
        .values()
        .into_iter()
        .chain(gap.causes.values());
    for v in values {
        row.push_str(&format!(",{v}"));
    }
    row.push('\n');
    row
}

fn causes_json(causes: &Causes) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = Causes::NAMES
        .iter()
        .zip(causes.values())
        .map(|(name, v)| (name.to_string(), json!(v)))
        .collect();
    serde_json::Value::Object(map)
}

fn point_json(sweep: &Sweep, point: &SweepPoint) -> serde_json::Value {
    let gap = &point.gap;
    json!({
        "sparsity": point.sparsity, "loss": point.loss, "reference_check": point.check.as_ref().map(checked::json), "matmul_flops": point.flops,
        "flop_reduction": sweep.flop_reduction(point), "cycles": point.cost.cycles(),
        "dense_cycles": sweep.dense.cost.cycles(), "cycle_reduction": sweep.cycle_reduction(point),
        "gap": {
            "ideal_cycles": gap.ideal_cycles(),
            "cycles": gap.gap_cycles,
            "reduction": gap.gap_reduction(),
            "by_cause_cycles": causes_json(&gap.causes),
            "by_cause_reduction": causes_json(&gap.causes_in_reduction()),
        },
        "step_cycles_by_part": causes_json(&point.cycles_by_part()),
        "by_op": point.cost.by_op().iter().map(|(name, cycles, _)| json!({"op": name, "cycles": cycles})).collect::<Vec<_>>(),
    })
}

fn write_outputs(
    dir: &std::path::Path,
    setup: &SweepSetup<'_>,
    sweep: &Sweep,
    plots: &[(&'static str, String)],
    attention: serde_json::Value,
) -> anyhow::Result<()> {
    let mut csv = csv_header();
    let mut runs = Vec::new();
    for point in &sweep.points {
        csv.push_str(&csv_row(sweep, point));
        runs.push(point_json(sweep, point));
    }
    let p = &sweep.plan;
    let (c, f) = (setup.config, setup.fabric);
    let value = json!({
        "schema": "wafersim.sweep/v2",
        "fidelity": sweep.fidelity.name(),
        "units": {
            "cycles": "fabric clock cycles",
            "matmul_flops": "floating-point operations of one training step (1 FMAC = 2)",
            "flop_reduction": "dense matmul FLOPs / sparse (x)",
            "cycle_reduction": "dense step cycles / sparse (x)",
            "gap.cycles": "cycles - dense_cycles / flop_reduction (cycles)",
            "gap.reduction": "flop_reduction - cycle_reduction (x)",
            "gap.by_cause_cycles": "cycles; the five add up to gap.cycles (docs/sweep.md)",
            "gap.by_cause_reduction": "x; the five add up to gap.reduction",
            "step_cycles_by_part": "cycles of the step in the breakdown's parts (absolute, not a gap); per_nonzero_overhead holds the whole per-entry work",
            "by_op": "cycles per operation name, summed over layers and phases",
            "loss_scale": "the power of two the exact steps multiplied the loss by before their backward pass and divided the gradients by (null: fast fidelity)",
            "runs[].reference_check": "the exact step's loss and gradients against the CPU reference's, as in step's report.json (null: fast fidelity or no numerics)",
        },
        // What ran, with the key names of `step`'s report.json.
        "model": super::model_json(c),
        "fabric": super::fabric_json(f),
        "dtype": p.precision.name(), "loss_scale": sweep.loss_scale, "seed": setup.seed,
        "batch": p.batch, "seq": p.seq, "region": { "cols": p.region.cols, "rows": p.region.rows, "attention": attention },
        "runs": runs,
    });
    let json_text = super::json_text(&value)?;
    let [csv_file, json_file] = OUTPUT_FILES;
    let files = [(csv_file, csv.as_str()), (json_file, json_text.as_str())]
        .into_iter()
        .chain(plots.iter().map(|(name, text)| (*name, text.as_str())));
    guard::write_all(dir, |dir| {
        files
            .map(|(name, text)| {
                stage_bytes(&dir.join(name), text.as_bytes())
                    .with_context(|| format!("writing {name}"))
            })
            .collect()
    })
}
