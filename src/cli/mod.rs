//! The command line: argument parsing, dispatch to one module per subcommand, and error display.
//!
//! Errors reach the user as one line on stderr, `error: ` followed by the whole context chain.
//! Exit codes: 0 success, 2 bad input or usage (anything wrapped in [`BadInput`], and clap's own
//! usage errors), 1 a failure while running (does not fit, deadlock, I/O while writing).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// `println!` that returns a [`StdoutError`] instead of panicking when standard output cannot be
/// written (a full disk, a closed file). A broken pipe never gets here: `main` restores SIGPIPE's
/// default action, which ends the process quietly.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err($crate::cli::StdoutError)
    }};
}

mod bench;
mod checked;
mod exact_cost;
mod fit;
mod flops;
mod gemm;
mod guard;
mod init;
mod inspect;
mod presets;
mod progress;
mod prompt;
mod recipe;
mod step;
mod sweep;
mod trace;
mod train;

/// Simulate sparse training on a wafer-scale dataflow accelerator.
#[derive(Parser)]
#[command(name = "wafersim", version, about, propagate_version = true)]
struct Cli {
    /// Host threads for the simulation and sweeps [default: RAYON_NUM_THREADS, else one per
    /// core]. Results are the same bytes for any count. For `bench`: the one thread count to
    /// measure (`bench --threads` takes a list).
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the built-in model presets with their shapes and parameter counts.
    Presets(presets::Args),
    /// Analytic FLOPs of one training step, dense against sparse, per sparsity.
    Flops(flops::Args),
    /// Run one sparse linear layer on the simulated fabric against its dense baseline.
    Gemm(gemm::Args),
    /// Run one training step of a GPT on the simulated fabric.
    Step(step::Args),
    /// Training steps at several sparsities: FLOP and cycle reductions (the quick start).
    Sweep(sweep::Args),
    /// Write a freshly initialised Hugging Face GPT-2 checkpoint folder.
    Init(init::Args),
    /// Show a checkpoint's shape, parameter counts and the sparsity of its matrices.
    Inspect(inspect::Args),
    /// Measure the simulator's speed and memory on fixed workloads, per thread count.
    Bench(bench::Args),
    /// Train one phase of the MediSwift recipe (sparse pre-training, dense fine-tuning, prompt
    /// tuning) on the simulated fabric.
    Train(train::Args),
    /// What the whole recipe (sparse pre-training, dense fine-tuning, prompt tuning) costs,
    /// against the same recipe pre-trained dense.
    Recipe(recipe::Args),
}

/// Marks an error as the user's input being wrong (exit code 2), as opposed to a failure while
/// running (exit code 1). Attach it with `.context(BadInput(...))` or [`bad_input`].
#[derive(Debug)]
pub struct BadInput(pub String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Wraps `err` as bad input, prefixed by `what` (the flag or file it came from).
pub fn bad_input(what: impl Into<String>, err: impl Into<anyhow::Error>) -> anyhow::Error {
    err.into().context(BadInput(what.into()))
}

/// The fabric named by `--fabric`: a preset (`wse2`, `wse3`), `WxH`, or a `.toml`/`.json` file
/// overriding a preset.
pub fn load_fabric(spec: &str) -> anyhow::Result<wafersim_sim::FabricConfig> {
    let is_file = spec.ends_with(".toml") || spec.ends_with(".json");
    let config = if is_file {
        let text =
            std::fs::read_to_string(spec).map_err(|e| bad_input(format!("--fabric {spec}"), e))?;
        wafersim_sim::FabricConfig::from_file_text(spec, &text, spec.ends_with(".json"))
    } else {
        wafersim_sim::FabricConfig::from_spec(spec)
    };
    let what = if is_file {
        format!("--fabric {spec}")
    } else {
        "--fabric".into()
    };
    config.map_err(|e| bad_input(what, e))
}

/// A warning line for the fast fidelity on a fabric whose queue depth or latencies differ from
/// the presets': its formulas were validated on the presets' values and drift with others
/// (`docs/fidelity.md`, "Machine parameters").
pub fn unvalidated_timing_warning(
    fabric: &wafersim_sim::FabricConfig,
    fidelity: crate::runtime::Fidelity,
) -> Option<String> {
    let preset = wafersim_sim::FabricConfig::wse2();
    let changed: Vec<String> = [
        ("queue_depth", fabric.queue_depth, preset.queue_depth),
        ("hop_latency", fabric.hop_latency, preset.hop_latency),
        ("ramp_latency", fabric.ramp_latency, preset.ramp_latency),
    ]
    .into_iter()
    .filter(|&(_, value, validated)| value != validated)
    .map(|(name, value, validated)| format!("{name} {value} (validated: {validated})"))
    .collect();
    (fidelity == crate::runtime::Fidelity::Fast && !changed.is_empty()).then(|| {
        format!(
            "warning: the fast fidelity's formulas were checked against the exact engine with the presets' queue depth and latencies; this fabric has {}: expect larger errors (docs/fidelity.md)",
            changed.join(", ")
        )
    })
}

/// Writes `value` as pretty JSON to `path`, atomically (a failure leaves no partial file); a
/// device or FIFO (`/dev/stdout`) is written in place, since a rename would replace it.
pub fn write_json(path: &std::path::Path, value: &serde_json::Value) -> anyhow::Result<()> {
    let text = json_text(value)?;
    let written = guard::stage_output(path, text.as_bytes()).and_then(|staged| match staged {
        Some(staged) => Ok(staged.commit()?),
        None => Ok(()),
    });
    anyhow::Context::with_context(written, || format!("writing {}", path.display()))
}

/// The reports' `model` object: the shape of the GPT.
pub fn model_json(c: &crate::model::GptConfig) -> serde_json::Value {
    serde_json::json!({ "n_layer": c.n_layer, "n_embd": c.n_embd, "n_head": c.n_head, "n_inner": c.n_inner, "vocab_size": c.vocab_size, "n_positions": c.n_positions })
}

/// The reports' `fabric` object: its name, size and clock.
pub fn fabric_json(f: &wafersim_sim::FabricConfig) -> serde_json::Value {
    serde_json::json!({ "name": f.name, "width": f.width, "height": f.height, "clock_mhz": f.clock_mhz })
}

/// `value` as pretty JSON with a final newline.
pub fn json_text(value: &serde_json::Value) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(value)? + "\n")
}

/// The most host threads `--threads` accepts: far more than any host this runs on has cores,
/// and few enough that starting them is instant.
const MAX_THREADS: usize = 256;

/// A thread count given with `--threads`: 1 to [`MAX_THREADS`].
pub(crate) fn check_threads(n: usize) -> anyhow::Result<()> {
    if n == 0 || n > MAX_THREADS {
        return Err(bad_input(
            "--threads",
            anyhow::anyhow!("{n} is not between 1 and {MAX_THREADS}"),
        ));
    }
    Ok(())
}

/// Sizes rayon's global pool, which the engine's default thread count and the sweeps use.
fn set_threads(threads: Option<usize>) -> anyhow::Result<()> {
    let Some(n) = threads else {
        return Ok(());
    };
    check_threads(n)?;
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| bad_input("--threads", e))
}

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() || help_on_missing_args(&e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
        Err(e) => {
            eprintln!("{}", clap_one_line(&e));
            return ExitCode::from(2);
        }
    };
    if let Err(err) = set_threads(cli.threads) {
        eprintln!("error: {err:#}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Presets(args) => presets::run(args),
        Command::Flops(args) => flops::run(args),
        Command::Gemm(args) => gemm::run(args),
        Command::Step(args) => step::run(args),
        Command::Sweep(args) => sweep::run(args),
        Command::Init(args) => init::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Train(args) => train::run(args),
        Command::Recipe(args) => recipe::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", one_line(&err));
            ExitCode::from(exit_code(&err))
        }
    }
}

/// `wafersim` or `wafersim <command>` with nothing else: clap shows the help (exit code 2).
fn help_on_missing_args(e: &clap::Error) -> bool {
    e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
}

/// A usage error on one line: clap's message and tip, without the usage block.
fn clap_one_line(e: &clap::Error) -> String {
    e.render()
        .to_string()
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The whole context chain on one line. A cause whose text its parent's already ends with (a
/// library error that prints its source and also reports it as its source) is not repeated.
fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}

/// Standard output could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write to standard output: {0}")]
pub struct StdoutError(pub std::io::Error);

fn exit_code(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<BadInput>().is_some() {
        2
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("layer 1: {source}")]
    struct Wrapping {
        source: std::io::Error,
    }

    #[test]
    fn one_line_names_each_cause_once() {
        let inner = || std::io::Error::other("no room");
        // A cause printed by its parent is not repeated.
        let wrapped = anyhow::Error::new(Wrapping { source: inner() }).context("step");
        assert_eq!(one_line(&wrapped), "step: layer 1: no room");
        // A cause its parent does not print is appended; newlines become spaces.
        let plain = anyhow::Error::new(inner()).context("reading\nDIR");
        assert_eq!(one_line(&plain), "reading DIR: no room");
    }
}
