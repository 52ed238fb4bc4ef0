//! `wafersim init`: writes a freshly initialised Hugging Face GPT-2 checkpoint folder.
//!
//! The shape comes from a preset (`--model`) or from a GPT-2 `config.json` (`--config`); the
//! values from [`crate::model::init_params`] with `--seed`. No sparsity is applied here: masks
//! are applied by the commands that train.

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::{bad_input, guard};
use crate::model::GptConfig;
use crate::model::checkpoint::{read_config, save_checkpoint};

/// Arguments of `wafersim init`.
#[derive(clap::Args)]
pub struct Args {
    /// Model preset (see `wafersim presets`).
    #[arg(long, value_name = "PRESET", conflicts_with = "config")]
    model: Option<String>,
    /// Take the shape from this Hugging Face GPT-2 config.json instead of a preset.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Seed of the random initialisation (same seed, same bytes).
    #[arg(long, value_name = "N", default_value_t = 0)]
    seed: u64,
    /// Checkpoint folder to write (created if missing; its parent must exist).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (config, source) = resolve_config(&args)?;
    check_out_folder(&args.out)?;
    let params = guard::seeded_params(&config, args.seed)?;
    save_checkpoint(&args.out, &config, &params)
        .with_context(|| format!("cannot write checkpoint {}", args.out.display()))?;
    outln!(
        "wrote {}: {source}, {} layers x {} (heads {}, d_ffn {}, seq {}, vocab {}), {} parameters, seed {}",
        args.out.display(),
        config.n_layer,
        config.n_embd,
        config.n_head,
        config.n_inner,
        config.n_positions,
        config.vocab_size,
        config.total_params(),
        args.seed
    )?;
    Ok(())
}

/// The model shape and a short description of where it came from.
fn resolve_config(args: &Args) -> anyhow::Result<(GptConfig, String)> {
    match (&args.model, &args.config) {
        (Some(name), _) => {
            let config = GptConfig::preset(name).map_err(|e| bad_input("--model", e))?;
            Ok((config, format!("preset {name}")))
        }
        (None, Some(path)) => {
            let config = read_config(path).map_err(|e| bad_input("--config", e))?;
            Ok((config, format!("config {}", path.display())))
        }
        (None, None) => Err(bad_input(
            "--model",
            anyhow::anyhow!("give a preset with --model or a config.json with --config"),
        )),
    }
}

/// `--out` must be a folder or a new name in an existing folder.
fn check_out_folder(out: &Path) -> anyhow::Result<()> {
    if out.exists() && !out.is_dir() {
        let reason = anyhow::anyhow!("{} exists and is not a folder", out.display());
        return Err(bad_input("--out", reason));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !out.exists() && !parent.is_dir() {
        let reason = anyhow::anyhow!("folder {} does not exist", parent.display());
        return Err(bad_input("--out", reason));
    }
    Ok(())
}
