//! `wafersim presets`: the built-in model shapes and their parameter counts.

use crate::model::PRESETS;

/// Arguments of `wafersim presets` (none).
#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    outln!(
        "{:<16} {:>6} {:>6} {:>6} {:>6} {:>7} {:>8} {:>14} {:>14}  description",
        "preset",
        "layers",
        "d",
        "heads",
        "d_ffn",
        "seq",
        "vocab",
        "params",
        "non-embedding"
    )?;
    for preset in PRESETS {
        let c = preset.config();
        outln!(
            "{:<16} {:>6} {:>6} {:>6} {:>6} {:>7} {:>8} {:>14} {:>14}  {}",
            preset.name,
            c.n_layer,
            c.n_embd,
            c.n_head,
            c.n_inner,
            c.n_positions,
            c.vocab_size,
            c.total_params(),
            c.non_embedding_params(),
            preset.description
        )?;
    }
    Ok(())
}
