//! `wafersim recipe`: what the whole MediSwift recipe costs on the fabric (fast-fidelity step
//! figures times steps), against the same recipe pre-trained dense: a table and, with `--json`,
//! JSON (schema `wafersim.recipe/v1`).

use std::path::PathBuf;

use serde_json::{Value, json};

use super::fit::AttentionFit;
use super::{bad_input, guard, load_fabric};
use crate::model::GptConfig;
use crate::recipe::{
    PhaseCost, RecipeCost, RecipeError, RecipeSpec, longest_fitting_seq, recipe_cost,
};
use crate::runtime::Fidelity;
use crate::sparsity;

/// Arguments of `wafersim recipe`.
#[derive(clap::Args)]
pub struct Args {
    /// A built-in model preset.
    #[arg(long, value_name = "PRESET")]
    model: String,
    /// Tokens of sparse pre-training (e.g. 104.86e9).
    #[arg(long, value_name = "N", default_value = "0", value_parser = parse_tokens)]
    pretrain_tokens: u64,
    /// Sparsity of pre-training.
    #[arg(
        long,
        value_name = "S",
        default_value_t = 0.75,
        allow_hyphen_values = true
    )]
    sparsity: f64,
    /// Tokens of dense fine-tuning.
    #[arg(long, value_name = "N", default_value = "0", value_parser = parse_tokens)]
    finetune_tokens: u64,
    /// Tokens of prompt tuning.
    #[arg(long, value_name = "N", default_value = "0", value_parser = parse_tokens)]
    prompt_tokens: u64,
    /// Prompt vectors per sequence in prompt tuning.
    #[arg(long, value_name = "P", default_value_t = 8)]
    prompt_len: usize,
    /// Sequences per step.
    #[arg(long, value_name = "B", default_value_t = 1)]
    batch: usize,
    /// Positions per sequence [default: the longest power of two whose step fits the fabric].
    #[arg(long, value_name = "S")]
    seq: Option<usize>,
    /// The machine: wse2, wse3, WxH, or a .toml/.json file.
    #[arg(long, value_name = "FABRIC")]
    fabric: String,
    /// Seed of the pre-training masks.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the figures as JSON.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
}

/// A token count written as an integer or in scientific notation (`104.86e9`).
fn parse_tokens(text: &str) -> Result<u64, String> {
    if let Ok(whole) = text.parse::<u64>() {
        // Exact, however large: f64 would round counts above 2^53.
        return if whole <= 1_000_000_000_000_000_000 {
            Ok(whole)
        } else {
            Err(format!("{text} tokens: expected a number in [0, 1e18]"))
        };
    }
    let value: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number of tokens"))?;
    if !(value.is_finite() && (0.0..=1e18).contains(&value)) {
        return Err(format!("{text} tokens: expected a number in [0, 1e18]"));
    }
    if value.fract() != 0.0 {
        return Err(format!("{text} tokens: expected a whole number"));
    }
    Ok(value as u64)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let fabric = load_fabric(&args.fabric)?;
    let config = GptConfig::preset(&args.model).map_err(|e| bad_input("--model", e))?;
    sparsity::validate(args.sparsity)
        .and_then(|s| sparsity::check_keeps_weights(&config, s))
        .map_err(|e| bad_input("--sparsity", e))?;
    if args.pretrain_tokens + args.finetune_tokens + args.prompt_tokens == 0 {
        return Err(bad_input(
            "--pretrain-tokens/--finetune-tokens/--prompt-tokens",
            anyhow::anyhow!("give at least one phase some tokens"),
        ));
    }
    if let Some(path) = &args.json {
        guard::check_output_file("--json", path)?;
    }
    if args.batch == 0 {
        return Err(bad_input(
            "--batch",
            anyhow::anyhow!("0 sequences: give at least 1"),
        ));
    }
    let seq = match args.seq {
        Some(seq) => {
            guard::check_batch_shape("--batch/--seq", &config, args.batch, seq)?;
            seq
        }
        None => longest_fitting_seq(&config, args.batch, &fabric)
            .map_err(guard::plan_error)?
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no step of {} sequence(s) of {} fits {}: use a bigger fabric",
                    args.batch,
                    args.model,
                    fabric.name
                )
            })?,
    };
    // Two mask sets (dense, sparse) of one bit per sparsifiable weight; the per-column counts
    // are small beside them (MediSwift-XL's 1.2 G weights: 158 MB peak measured, 302 MB here).
    let weights = (12 * config.n_layer) as u64 * (config.n_embd * config.n_embd) as u64;
    guard::check_host_memory(
        "the masks (two bits per sparsifiable weight)",
        weights.checked_mul(2).map(|bits| bits / 8),
    )?;
    let spec = RecipeSpec {
        pretrain_tokens: args.pretrain_tokens,
        sparsity: args.sparsity,
        finetune_tokens: args.finetune_tokens,
        prompt_tokens: args.prompt_tokens,
        prompt_len: args.prompt_len,
        batch: args.batch,
        seq,
    };
    if let Some(warning) = super::unvalidated_timing_warning(&fabric, Fidelity::Fast) {
        eprintln!("{warning}");
    }
    let cost = recipe_cost(&config, &fabric, &spec, args.seed).map_err(|e| match e {
        e @ RecipeError::PromptTooLong { .. } => bad_input("--prompt-len", e),
        RecipeError::Compile(e) => guard::plan_error(e),
        e => anyhow::Error::new(e),
    })?;
    let clock_hz = f64::from(fabric.clock_mhz) * 1e6;
    let attention = AttentionFit::of(&config, &cost.plan, &fabric);
    // The file first: a terminal or pipe that goes away while the table prints loses nothing.
    if let Some(path) = &args.json {
        let attention_json = attention.json();
        let report = report_json(&args, &fabric, &spec, &cost, clock_hz, attention_json);
        super::write_json(path, &report)?;
    }
    print_table(&args, &fabric, &cost, clock_hz)?;
    if let Some(warning) = attention.warning() {
        eprintln!("{warning}");
    }
    Ok(())
}

fn print_table(
    args: &Args,
    fabric: &wafersim_sim::FabricConfig,
    cost: &RecipeCost,
    clock_hz: f64,
) -> anyhow::Result<()> {
    let p = &cost.plan;
    outln!(
        "recipe of {} on {} ({} x {} PEs at {} MHz): steps of {} x {} positions, region {} x {}, fast fidelity, pre-training sparsity {}",
        args.model,
        fabric.name,
        fabric.width,
        fabric.height,
        fabric.clock_mhz,
        p.batch,
        p.seq,
        p.region.cols,
        p.region.rows,
        args.sparsity
    )?;
    outln!(
        "\n{:<16} {:>12} {:>12} {:>14} {:>14} {:>14}",
        "phase",
        "tokens",
        "steps",
        "FLOPs",
        "cycles",
        "seconds"
    )?;
    for (title, phases) in [
        ("sparse recipe", &cost.sparse),
        ("dense recipe", &cost.dense),
    ] {
        outln!("{title}:")?;
        for ph in phases.iter() {
            outln!(
                "{:<16} {:>12.4e} {:>12} {:>14.4e} {:>14.4e} {:>14.4e}",
                ph.name,
                ph.tokens as f64,
                ph.steps,
                ph.flops() as f64,
                ph.cycles() as f64,
                ph.cycles() as f64 / clock_hz
            )?;
        }
        let (f, c) = RecipeCost::total(phases);
        outln!(
            "{:<16} {:>12} {:>12} {:>14.4e} {:>14.4e} {:>14.4e}",
            "total",
            "",
            "",
            f as f64,
            c as f64,
            c as f64 / clock_hz
        )?;
    }
    let (sf, sc) = RecipeCost::total(&cost.sparse);
    let (df, dc) = RecipeCost::total(&cost.dense);
    outln!(
        "\nsparse pre-training saves {:.3}x FLOPs and {:.3}x cycles over the whole recipe ({:.4e} s against {:.4e} s)",
        df as f64 / sf as f64,
        dc as f64 / sc as f64,
        sc as f64 / clock_hz,
        dc as f64 / clock_hz
    )?;
    Ok(())
}

/// One phase; a phase without tokens runs no step, so it has no step figures (null).
fn phase_json(ph: &PhaseCost, clock_hz: f64) -> Value {
    let runs = ph.steps > 0;
    json!({
        "phase": ph.name, "tokens": ph.tokens, "steps": ph.steps,
        "step_flops": runs.then_some(ph.step_flops), "step_cycles": runs.then_some(ph.step_cycles),
        "flops": ph.flops() as f64, "cycles": ph.cycles() as f64,
        "seconds": ph.cycles() as f64 / clock_hz,
    })
}

fn report_json(
    args: &Args,
    fabric: &wafersim_sim::FabricConfig,
    spec: &RecipeSpec,
    cost: &RecipeCost,
    clock_hz: f64,
    attention: Value,
) -> Value {
    let side = |phases: &[PhaseCost]| {
        let (f, c) = RecipeCost::total(phases);
        json!({
            "phases": phases.iter().map(|p| phase_json(p, clock_hz)).collect::<Vec<_>>(),
            "total": { "flops": f as f64, "cycles": c as f64, "seconds": c as f64 / clock_hz },
        })
    };
    let (sf, sc) = RecipeCost::total(&cost.sparse);
    let (df, dc) = RecipeCost::total(&cost.dense);
    json!({
        "schema": "wafersim.recipe/v1",
        "fidelity": "fast",
        "units": {
            "flops": "matmul floating-point operations (1 FMAC = 2); the totals are written as floats, since a recipe's can exceed 2^64",
            "cycles": "fabric clock cycles (totals as floats, like the FLOPs)", "seconds": "at the fabric clock",
            "step_flops": "step_flops and step_cycles: of one step of the phase; null for a phase without tokens (no step runs)",
        },
        "model": args.model,
        "fabric": super::fabric_json(fabric),
        "step": { "batch": spec.batch, "seq": spec.seq, "prompt_len": spec.prompt_len, "region": { "cols": cost.plan.region.cols, "rows": cost.plan.region.rows, "attention": attention } },
        "sparsity": spec.sparsity,
        "sparse": side(&cost.sparse),
        "dense": side(&cost.dense),
        "savings": { "flops": df as f64 / sf as f64, "cycles": dc as f64 / sc as f64 },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_counts_are_whole_and_exact() {
        assert_eq!(parse_tokens("104.86e9"), Ok(104_860_000_000));
        // Above 2^53, an integer is taken as written, not through f64.
        assert_eq!(
            parse_tokens("100000000000000001"),
            Ok(100_000_000_000_000_001)
        );
        assert!(parse_tokens("0.5").unwrap_err().contains("whole number"));
        assert!(parse_tokens("2e18").unwrap_err().contains("[0, 1e18]"));
        assert!(
            parse_tokens("2000000000000000000")
                .unwrap_err()
                .contains("[0, 1e18]")
        );
    }
}
