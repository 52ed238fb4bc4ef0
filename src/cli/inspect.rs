//! `wafersim inspect`: what a checkpoint folder holds: its shape, parameter counts, and for each
//! sparsifiable matrix ([`SparseKind`]) the fraction of exact zeros, i.e. its sparsity.
//!
//! Zeros are counted with `== 0.0` (so `-0.0` counts) as integers; fractions are printed from
//! those counts. This reads any checkpoint; it does not know or need the masks that made it.

use std::path::PathBuf;

use super::bad_input;
use crate::model::{GptConfig, GptParams, SparseKind, load_checkpoint};

/// Arguments of `wafersim inspect`.
#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint folder (config.json + model.safetensors).
    #[arg(long, value_name = "DIR")]
    checkpoint: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (config, params) =
        load_checkpoint(&args.checkpoint).map_err(|e| bad_input("invalid checkpoint", e))?;
    outln!("checkpoint   {}", args.checkpoint.display())?;
    print_shape(&config)?;
    print_zero_table(&params)?;
    Ok(())
}

fn print_shape(c: &GptConfig) -> anyhow::Result<()> {
    outln!(
        "shape        {} layers, d {}, {} heads, d_ffn {}, seq {}, vocab {}",
        c.n_layer,
        c.n_embd,
        c.n_head,
        c.n_inner,
        c.n_positions,
        c.vocab_size
    )?;
    let sparsifiable: usize = c.n_layer * (4 * c.n_embd * c.n_embd + 2 * c.n_embd * c.n_inner);
    outln!(
        "parameters   {} total, {} non-embedding, {} in sparsifiable matrices",
        c.total_params(),
        c.non_embedding_params(),
        sparsifiable
    )?;
    Ok(())
}

/// Exact zeros and elements of one matrix.
#[derive(Clone, Copy, Default)]
struct ZeroCount {
    zeros: u64,
    numel: u64,
}

impl ZeroCount {
    fn of(values: &[f32]) -> Self {
        Self {
            zeros: values.iter().filter(|&&v| v == 0.0).count() as u64,
            numel: values.len() as u64,
        }
    }

    fn add(self, other: Self) -> Self {
        Self {
            zeros: self.zeros + other.zeros,
            numel: self.numel + other.numel,
        }
    }

    fn fraction(self) -> f64 {
        if self.numel == 0 {
            0.0
        } else {
            self.zeros as f64 / self.numel as f64
        }
    }
}

/// One row per layer, one column per sparsifiable matrix, then the totals.
fn print_zero_table(params: &GptParams) -> anyhow::Result<()> {
    outln!("zero fraction of the sparsifiable matrices (exact zeros / elements):")?;
    let header: Vec<String> = SparseKind::ALL
        .iter()
        .map(|k| format!("{:>10}", k.name()))
        .collect();
    outln!("{:<8}{}", "layer", header.join(""))?;
    let mut per_kind = [ZeroCount::default(); 6];
    for (l, block) in params.blocks.iter().enumerate() {
        let mut row = String::new();
        for (total, kind) in per_kind.iter_mut().zip(SparseKind::ALL) {
            let count = ZeroCount::of(&block.linear(kind).weight.data);
            *total = total.add(count);
            row.push_str(&format!("{:>10.4}", count.fraction()));
        }
        outln!("{l:<8}{row}")?;
    }
    let row: String = per_kind
        .iter()
        .map(|c| format!("{:>10.4}", c.fraction()))
        .collect();
    outln!("{:<8}{row}", "all")?;
    let all = per_kind.iter().fold(ZeroCount::default(), |a, &c| a.add(c));
    outln!(
        "overall      {} of {} sparsifiable weights are zero ({:.4})",
        all.zeros,
        all.numel,
        all.fraction()
    )?;
    Ok(())
}
