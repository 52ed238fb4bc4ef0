//! The command line: argument parsing, dispatch to one module per subcommand, and error display.
//!
//! Errors reach the user as one line on stderr, `error: ` followed by the whole context chain.
//! Exit codes: 0 success, 2 bad input or usage (anything wrapped in [`BadInput`], and clap's own
//! usage errors), 1 a failure while running (does not fit, deadlock, I/O while writing).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod flops;
mod init;
mod inspect;
mod presets;

/// Simulate sparse training on a wafer-scale dataflow accelerator.
#[derive(Parser)]
#[command(name = "wafersim", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the built-in model presets with their shapes and parameter counts.
    Presets(presets::Args),
    /// Analytic FLOPs of one training step, dense against sparse, per sparsity.
    Flops(flops::Args),
    /// Write a freshly initialised Hugging Face GPT-2 checkpoint folder.
    Init(init::Args),
    /// Show a checkpoint's shape, parameter counts and the sparsity of its matrices.
    Inspect(inspect::Args),
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

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let result = match cli.command {
        Command::Presets(args) => presets::run(args),
        Command::Flops(args) => flops::run(args),
        Command::Init(args) => init::run(args),
        Command::Inspect(args) => inspect::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", one_line(&err));
            ExitCode::from(exit_code(&err))
        }
    }
}

/// The whole context chain on one line.
fn one_line(err: &anyhow::Error) -> String {
    format!("{err:#}").replace('\n', " ")
}

fn exit_code(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<BadInput>().is_some() {
        2
    } else {
        1
    }
}
