//! `wafersim flops`: the analytic FLOPs of one training step, dense against sparse, for a list of
//! sparsities: a terminal table, a per-operation breakdown, and optionally JSON
//! (`wafersim.flops/v1`).
//!
//! This command only counts (see [`crate::flops`] for the convention); it simulates nothing.
//! Key decision: every figure is the exact integer from the library, printed rounded to 5
//! significant digits in the terminal and written exactly in the JSON; the JSON is built here
//! with `serde_json::json!` (no `Serialize` derives on library types) and written atomically.

use std::fs;
use std::path::PathBuf;

use clap::ArgGroup;
use serde_json::{Value, json};

use super::bad_input;
use crate::flops::{self, FlopOptions, FlopReport, NnzSource, OpTotals, Phase, StepShape};
use crate::model::GptConfig;

/// Arguments of `wafersim flops`.
#[derive(clap::Args)]
#[command(group(ArgGroup::new("source").required(true).args(["model", "config"])))]
pub struct Args {
    /// A built-in model preset (see `wafersim presets`).
    #[arg(long, value_name = "PRESET")]
    model: Option<String>,
    /// A Hugging Face GPT-2 config.json instead of a preset.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Comma-separated sparsities, each in [0, 1): the fraction of zero weights in each of the
    /// six sparsified matrices of every block.
    #[arg(
        long,
        value_name = "LIST",
        default_value = "0,0.5,0.75,0.9",
        allow_hyphen_values = true
    )]
    sparsity: String,
    /// Sequences per training step.
    #[arg(long, value_name = "N", default_value_t = 1)]
    batch: usize,
    /// Tokens per sequence [default: the model's n_positions].
    #[arg(long, value_name = "N")]
    seq: Option<usize>,
    /// Halve the attention matmuls (Q K^T and A V) for the causal mask.
    #[arg(long)]
    causal_halving: bool,
    /// Also write the figures as JSON (schema wafersim.flops/v1) to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
}

/// One sparsity's report.
struct Run {
    sparsity: f64,
    report: FlopReport,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (source, config) = load_model(&args)?;
    let sparsities = parse_sparsities(&args.sparsity)?;
    let shape = step_shape(&args, &config)?;
    if let Some(path) = &args.json {
        super::guard::check_output_file("--json", path)?;
    }
    let opts = FlopOptions {
        causal_halving: args.causal_halving,
    };
    let runs = sparsities
        .into_iter()
        .map(|sparsity| {
            let nnz =
                NnzSource::uniform(&config, sparsity).map_err(|e| bad_input("--sparsity", e))?;
            crate::sparsity::check_keeps_weights(&config, sparsity)
                .map_err(|e| bad_input("--sparsity", e))?;
            let report = flops::step_flops(&config, shape, &nnz, opts)
                .map_err(|e| bad_input(format!("--batch {}", shape.batch), e))?;
            Ok(Run { sparsity, report })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // The file first: a terminal or pipe that goes away while the table prints loses nothing.
    if let Some(path) = &args.json {
        let doc = json_document(&source, &config, shape, opts, &runs);
        super::write_json(path, &doc)?;
    }
    print_header(&source, &config, shape, opts)?;
    print_summary(&runs)?;
    if let Some(last) = runs.last() {
        print_breakdown(last, config.n_layer)?;
    }
    Ok(())
}

/// The model from `--model` or `--config`, with a label for the report.
fn load_model(args: &Args) -> anyhow::Result<(String, GptConfig)> {
    if let Some(name) = &args.model {
        let config = GptConfig::preset(name).map_err(|e| bad_input("--model", e))?;
        return Ok((name.clone(), config));
    }
    let Some(path) = &args.config else {
        return Err(bad_input(
            "--model or --config",
            anyhow::anyhow!("one is required"),
        ));
    };
    let what = || format!("--config {}", path.display());
    let text = fs::read_to_string(path).map_err(|e| bad_input(what(), e))?;
    let config = GptConfig::from_hf_json(&text).map_err(|e| bad_input(what(), e))?;
    Ok((path.display().to_string(), config))
}

/// `"0, 0.5,0.75"` -> `[0.0, 0.5, 0.75]`, each checked to be in `[0, 1)`.
fn parse_sparsities(list: &str) -> anyhow::Result<Vec<f64>> {
    list.split(',')
        .map(|item| {
            let item = item.trim();
            let value: f64 = item.parse().map_err(|_| {
                bad_input(
                    "--sparsity",
                    anyhow::anyhow!("\"{item}\" is not a number (expected e.g. 0,0.5,0.75)"),
                )
            })?;
            flops::check_sparsity(value).map_err(|e| bad_input("--sparsity", e))
        })
        .collect()
}

fn step_shape(args: &Args, config: &GptConfig) -> anyhow::Result<StepShape> {
    let shape = StepShape {
        batch: args.batch,
        seq: args.seq.unwrap_or(config.n_positions),
    };
    if shape.seq == 1 {
        // As `step` and `train`: one token predicts nothing.
        return Err(bad_input(
            "--seq",
            crate::reference::BatchError::SeqTooShort { seq: 1 },
        ));
    }
    shape.check(config).map_err(|e| {
        let flag = match &e {
            flops::FlopError::Shape { field, .. } => format!("--{field}"),
            _ => "--batch/--seq".to_string(),
        };
        bad_input(flag, e)
    })?;
    Ok(shape)
}

/// `1.8582e13`: five significant digits (`0` for zero).
fn sci(flops: u64) -> String {
    if flops == 0 {
        "0".to_string()
    } else {
        format!("{:.4e}", flops as f64)
    }
}

fn print_header(
    source: &str,
    config: &GptConfig,
    shape: StepShape,
    opts: FlopOptions,
) -> anyhow::Result<()> {
    outln!(
        "model {source}: {} layers, d {}, {} heads, d_ffn {}, vocab {}, n_positions {}",
        config.n_layer,
        config.n_embd,
        config.n_head,
        config.n_inner,
        config.vocab_size,
        config.n_positions
    )?;
    let attention = if opts.causal_halving {
        "attention matmuls halved for the causal mask"
    } else {
        "attention matmuls in full (--causal-halving halves them)"
    };
    outln!(
        "step: batch {} x seq {} = {} tokens; {attention}",
        shape.batch,
        shape.seq,
        shape.batch * shape.seq
    )?;
    outln!(
        "FLOPs of one training step (forward + input-gradient + weight-gradient), \
         1 multiply-add = 2 FLOPs"
    )?;
    outln!()?;
    Ok(())
}

fn print_summary(runs: &[Run]) -> anyhow::Result<()> {
    outln!(
        "{:>8}  {:>18}  {:>19}  {:>9}  {:>16}",
        "sparsity",
        "matmul dense FLOPs",
        "matmul sparse FLOPs",
        "reduction",
        "non-matmul FLOPs"
    )?;
    for run in runs {
        let r = &run.report;
        outln!(
            "{:>8}  {:>18}  {:>19}  {:>8.3}x  {:>16}",
            run.sparsity,
            sci(r.matmul_dense()),
            sci(r.matmul_sparse()),
            r.reduction(),
            sci(r.non_matmul())
        )?;
    }
    outln!()?;
    Ok(())
}

fn print_breakdown(run: &Run, n_layer: usize) -> anyhow::Result<()> {
    let by_op = run.report.by_op();
    let (matmul, other): (Vec<OpTotals>, Vec<OpTotals>) =
        by_op.into_iter().partition(|t| t.op.is_matmul());
    outln!(
        "matmul FLOPs by operation at sparsity {} (block operations summed over {n_layer} layers)",
        run.sparsity
    )?;
    outln!(
        "{:<14}  {:>11} {:>11}  {:>11} {:>11}  {:>11} {:>11}",
        "op",
        "fwd dense",
        "fwd sparse",
        "igrad dense",
        "igrad sparse",
        "wgrad dense",
        "wgrad sparse"
    )?;
    for t in &matmul {
        print_matmul_row(t.op.name(), &t.dense, &t.sparse)?;
    }
    let (dense, sparse) = (
        phase_sums(&matmul, |t| t.dense),
        phase_sums(&matmul, |t| t.sparse),
    );
    print_matmul_row("total", &dense, &sparse)?;
    outln!()?;
    outln!("non-matmul FLOPs by operation (unchanged by sparsity; convention in docs/flops.md)")?;
    outln!(
        "{:<14}  {:>11}  {:>11}  {:>11}  {:>11}",
        "op",
        "forward",
        "input-grad",
        "weight-grad",
        "total"
    )?;
    for t in &other {
        print_phase_row(t.op.name(), &t.dense)?;
    }
    print_phase_row("total", &phase_sums(&other, |t| t.dense))?;
    Ok(())
}

fn print_matmul_row(name: &str, dense: &[u64; 3], sparse: &[u64; 3]) -> anyhow::Result<()> {
    let cells: Vec<String> = Phase::ALL
        .iter()
        .map(|p| {
            format!(
                "{:>11} {:>11}",
                sci(dense[p.index()]),
                sci(sparse[p.index()])
            )
        })
        .collect();
    outln!("{name:<14}  {}", cells.join("  "))?;
    Ok(())
}

fn print_phase_row(name: &str, flops: &[u64; 3]) -> anyhow::Result<()> {
    let total: u64 = flops.iter().sum();
    outln!(
        "{name:<14}  {:>11}  {:>11}  {:>11}  {:>11}",
        sci(flops[0]),
        sci(flops[1]),
        sci(flops[2]),
        sci(total)
    )?;
    Ok(())
}

/// Per-phase sums over operations (bounded by the report's checked totals, so no overflow).
fn phase_sums(totals: &[OpTotals], pick: impl Fn(&OpTotals) -> [u64; 3]) -> [u64; 3] {
    totals.iter().map(pick).fold([0; 3], |mut acc, flops| {
        for (a, f) in acc.iter_mut().zip(flops) {
            *a += f;
        }
        acc
    })
}

fn json_document(
    source: &str,
    config: &GptConfig,
    shape: StepShape,
    opts: FlopOptions,
    runs: &[Run],
) -> Value {
    json!({
        "schema": "wafersim.flops/v1",
        "units": {
            "*_flops*": "floating-point operations in one training step (one multiply-add = 2); \
                         forward + input-gradient + weight-gradient unless the key names a phase",
            "flop_reduction": "matmul_flops_dense / matmul_flops_sparse (ratio)",
            "sparsity": "fraction of zero weights in each of the six sparsified matrices of every \
                         block (ratio in [0, 1))",
            "batch": "sequences per step",
            "seq": "tokens per sequence",
            "tokens": "tokens per step (batch x seq)",
            "ops": "per operation, block operations summed over all layers",
        },
        "model": {
            "source": source,
            "n_layer": config.n_layer,
            "n_embd": config.n_embd,
            "n_head": config.n_head,
            "n_inner": config.n_inner,
            "n_positions": config.n_positions,
            "vocab_size": config.vocab_size,
        },
        "batch": shape.batch,
        "seq": shape.seq,
        "tokens": shape.batch * shape.seq,
        "causal_halving": opts.causal_halving,
        "runs": runs.iter().map(json_run).collect::<Vec<_>>(),
    })
}

fn json_run(run: &Run) -> Value {
    let r = &run.report;
    json!({
        "sparsity": run.sparsity,
        "matmul_flops_dense": r.matmul_dense(),
        "matmul_flops_sparse": r.matmul_sparse(),
        "flop_reduction": r.reduction(),
        "non_matmul_flops": r.non_matmul(),
        "ops": r.by_op().iter().map(json_op).collect::<Vec<_>>(),
    })
}

fn json_op(t: &OpTotals) -> Value {
    let mut op = serde_json::Map::new();
    op.insert("op".into(), json!(t.op.name()));
    op.insert("is_matmul".into(), json!(t.op.is_matmul()));
    op.insert("is_sparse".into(), json!(t.op.is_sparse()));
    for phase in Phase::ALL {
        let name = phase.name();
        op.insert(format!("{name}_flops_dense"), json!(t.dense[phase.index()]));
        op.insert(
            format!("{name}_flops_sparse"),
            json!(t.sparse[phase.index()]),
        );
    }
    op.insert("total_flops_dense".into(), json!(t.dense_total()));
    op.insert("total_flops_sparse".into(), json!(t.sparse_total()));
    Value::Object(op)
}
