//! `wafersim step`: one training step of a GPT on the simulated fabric: loss, gradients and
//! updated weights, with FLOPs and cycles against the dense baseline, written to a folder.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::ArgGroup;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};
use wafersim_sim::{FabricConfig, Trace};

use super::exact_cost::{self, ExactRun};
use super::fit::AttentionFit;
use super::progress::Progress;
use super::trace::{self, TraceFlags, TraceRequest};
use super::{bad_input, checked, guard, load_fabric};
use crate::compile::{StepPlan, plan_step};
use crate::flops::{self, FlopOptions, NnzSource, StepShape};
use crate::model::checkpoint::{
    CONFIG_FILE, WEIGHTS_FILE, hf_named_tensors, read_config, read_params, stage_bytes,
    stage_f32_safetensors,
};
use crate::model::{GptConfig, GptParams, Matrix};
use crate::reference::{AdamState, AdamW, Batch};
use crate::runtime::{
    CostInputs, Fidelity, GradientSet, LossScale, Numerics, OpRecord, ReferenceCheck, StepHooks,
    StepInputs, StepMode, StepReport, cost_step, simulate_step_with,
};
use crate::sparsity::{self, ModelMasks};
use crate::tune::{self, RegionChoice, RegionSearch};

/// Arguments of `wafersim step`.
#[derive(clap::Args)]
#[command(group(ArgGroup::new("source").args(["model", "checkpoint"])))]
#[command(group(ArgGroup::new("data").args(["tokens", "batch"])))]
pub struct Args {
    /// A built-in model preset, initialised from --seed [default: tiny].
    #[arg(long, value_name = "PRESET")]
    model: Option<String>,
    /// A Hugging Face GPT-2 checkpoint folder (config.json + model.safetensors).
    #[arg(long, value_name = "DIR")]
    checkpoint: Option<PathBuf>,
    /// A JSON file with the batch: an array of equally long arrays of token ids (its shape sets
    /// the batch and sequence length).
    #[arg(long, value_name = "PATH", conflicts_with = "seq")]
    tokens: Option<PathBuf>,
    /// Sequences of random tokens (from --seed) when no --tokens file is given.
    #[arg(long, value_name = "B", default_value_t = 2)]
    batch: usize,
    /// Tokens per random sequence.
    #[arg(long, value_name = "S", default_value_t = 32)]
    seq: usize,
    /// Fraction of each sparsified matrix pruned, drawn from --seed [default: the checkpoint's
    /// own zeros, or 0 for a preset].
    #[arg(long, value_name = "S", allow_hyphen_values = true)]
    sparsity: Option<f64>,
    /// The machine: wse2, wse3, WxH, or a .toml/.json file.
    #[arg(long, value_name = "FABRIC")]
    fabric: String,
    /// Seed of the initial weights, masks and random tokens.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Storage precision of activations and streamed weights in the matmuls.
    #[arg(long, value_enum, default_value = "fp32")]
    dtype: super::gemm::DtypeArg,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 6e-4, allow_hyphen_values = true)]
    lr: f64,
    /// Loss scaling at the exact fidelity: the loss is multiplied by this power of two on the
    /// fabric and the gradients divided by it on the host, so that fp16 keeps small gradients;
    /// `auto` is the largest power of two not above the positions the smallest pass predicts
    /// for fp16, and 1 for fp32.
    #[arg(long, value_name = "auto|L", default_value = "auto", value_parser = parse_loss_scale)]
    pub(super) loss_scale: LossScale,
    /// Skip timing the dense baseline (one more simulation of each weight shape's products
    /// streaming every weight; a dense model's step is its own baseline and costs none).
    #[arg(long)]
    no_dense_baseline: bool,
    /// How cycles are obtained: simulate every wavelet, or the kernels' cost formulas (then the
    /// loss and gradients come from the CPU reference).
    #[arg(long, value_enum, default_value = "exact")]
    fidelity: super::gemm::FidelityArg,
    /// Cycles and FLOPs only: no loss, gradients or updated weights.
    #[arg(long)]
    no_numerics: bool,
    /// Prompt vectors (a `prompt.safetensors` of `wafersim train --phase prompt-tune`) in front
    /// of every sequence: the step is a prompt-tuning step (model frozen, no weight gradient;
    /// writes prompt_grad.safetensors instead of grads and updated weights).
    #[arg(long, value_name = "PATH")]
    prompt: Option<PathBuf>,
    /// Output folder: report.json, weights, grads and updated safetensors.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Also write a Chrome / Perfetto trace (JSON, 1 cycle = 1 ns) of a window of the step to
    /// this file (exact fidelity only).
    #[arg(long, value_name = "PATH", requires_all = ["trace_region", "trace_cycles"])]
    trace: Option<PathBuf>,
    /// The traced PEs: north-west PE X,Y, then W columns and H rows.
    #[arg(long, value_name = "X,Y,W,H", requires = "trace")]
    trace_region: Option<String>,
    /// The traced cycles, from the step's start: A up to B (excluded).
    #[arg(long, value_name = "A..B", requires = "trace")]
    trace_cycles: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut setup = Setup::check(&args)?;
    let trace_flags = TraceFlags {
        path: args.trace.as_deref(),
        region: args.trace_region.as_deref(),
        cycles: args.trace_cycles.as_deref(),
        out: &args.out,
    };
    let traced = trace::request(&trace_flags, &setup.fabric, args.fidelity.fidelity())?;
    let mode = StepMode {
        fidelity: args.fidelity.fidelity(),
        numerics: !args.no_numerics,
        check: true,
    };
    if let Some(warning) = super::unvalidated_timing_warning(&setup.fabric, mode.fidelity) {
        eprintln!("{warning}");
    }
    // Costing alone (fast, no numerics) reads shapes and masks: a preset's weights are never
    // drawn (1.3 B of them would take 5 GB and most of a minute).
    let costing_only = mode.fidelity == Fidelity::Fast && !mode.numerics;
    if mode.fidelity == Fidelity::Exact {
        exact_memory(&args, &setup, mode.numerics)?;
    }
    let (params, masks) = if costing_only && args.checkpoint.is_none() {
        (None, preset_masks(&args, &setup.config)?)
    } else {
        let (params, masks) = load_weights(&args, &setup.config)?;
        (Some(params), masks)
    };
    let opt = AdamW::new(args.lr);
    let started = Instant::now();
    let gradients = if setup.prompt.is_some() {
        GradientSet::PromptOnly
    } else {
        GradientSet::All
    };
    let search = tune::choose_region(RegionSearch {
        config: &setup.config,
        masks: &masks,
        batch: &setup.batch,
        fabric: &setup.fabric,
        precision: setup.plan.precision,
        prompt_len: setup.prompt.as_ref().map_or(0, |p| p.rows),
        gradients,
    })
    .map_err(guard::plan_error)?;
    setup.plan = search.plan.clone();
    let attention = AttentionFit::of(&setup.config, &setup.plan, &setup.fabric);
    attention.refuse_if_exact(mode.fidelity)?;
    let cost_inputs = CostInputs {
        config: &setup.config,
        masks: &masks,
        batch: &setup.batch,
        fabric: &setup.fabric,
        plan: &setup.plan,
        dense_baseline: !args.no_dense_baseline,
        prompt_len: setup.prompt.as_ref().map_or(0, |p| p.rows),
        gradients,
    };
    if mode.fidelity == Fidelity::Exact {
        announce_long_exact_step(cost_inputs);
    }
    let progress = Progress::new(None, "kernel runs");
    let on_record = |r: &OpRecord| {
        progress.inc();
        progress.set_message(r.op.label());
    };
    let hooks = StepHooks {
        progress: Some(&on_record),
        trace: traced.as_ref().map(|t| t.window),
    };
    let run = match &params {
        Some(params) => {
            let inputs = StepInputs {
                config: &setup.config,
                params,
                masks: &masks,
                batch: &setup.batch,
                fabric: &setup.fabric,
                plan: &setup.plan,
                dense_baseline: !args.no_dense_baseline,
                prompt: setup.prompt.as_ref(),
                gradients,
                loss_scale: args.loss_scale,
            };
            let loss_scale =
                (mode.fidelity == Fidelity::Exact).then(|| inputs.resolved_loss_scale());
            simulate_step_with(inputs, mode, hooks)
                .map(|(report, trace)| (report, trace, loss_scale))
        }
        None => {
            cost_step(cost_inputs).map(|cost| (StepReport::costed(mode.fidelity, cost), None, None))
        }
    };
    drop(progress);
    let (step, recorded, loss_scale) = run?;
    let wall = started.elapsed().as_secs_f64();
    // A prompt step computes no weight gradient.
    let flops = analytic_flops(&setup, &masks)?.of_step(setup.prompt.is_none());
    if step.cost.executed_matmul_flops() != flops.matmul_sparse {
        anyhow::bail!(
            "executed matmul FLOPs {} differ from the analytic {}: a simulator bug",
            step.cost.executed_matmul_flops(),
            flops.matmul_sparse
        );
    }
    // The weights the step ran with, and (not for a prompt step: the model is frozen) the
    // updated ones.
    let written = match (&step.numerics, &params) {
        (Some(numerics), Some(params)) if setup.prompt.is_some() => {
            check_prompt_results(numerics)?;
            Some((params, None))
        }
        (Some(numerics), Some(params)) => {
            let mut updated = params.clone();
            opt.step(
                &mut updated,
                &numerics.grads,
                &masks,
                &mut AdamState::new(params),
            )?;
            check_results(numerics, &updated)?;
            Some((params, Some(updated)))
        }
        _ => None,
    };
    let summary = Summary {
        search: &search,
        config: &setup.config,
        plan: &setup.plan,
        fabric: &setup.fabric,
        masks: &masks,
        step: &step,
        flops,
        dense_timed: !args.no_dense_baseline,
        prompt_len: setup.prompt.as_ref().map_or(0, |p| p.rows),
        attention,
        check: step.check.as_ref(),
        loss_scale,
    };
    // The files first: a terminal or pipe that goes away while the summary prints loses nothing.
    let written = written.as_ref().map(|(w, u)| (*w, u.as_ref()));
    let trace = traced.as_ref().zip(recorded.as_ref());
    let files = write_outputs(&args.out, &summary, written, trace, (args.seed, wall))?;
    note_stale_outputs(&args.out, &files);
    if let Some((request, trace)) = trace
        && trace.events.is_empty()
    {
        eprintln!(
            "warning: the trace {} holds no event: nothing happened on the traced PEs in cycles {}..{} (the step took {} cycles)",
            request.path.display(),
            request.window.start,
            request.window.end,
            step.cost.cycles()
        );
    }
    print_summary(&summary)?;
    Ok(())
}

/// Everything about a step that can be checked before any weight is drawn or read, so that bad
/// input and a model too large for the fabric are refused at once (not after initialising a
/// billion weights), and before the output folder is created.
struct Setup {
    fabric: FabricConfig,
    config: GptConfig,
    batch: Batch,
    plan: StepPlan,
    /// `--prompt`: vectors in front of every sequence.
    prompt: Option<Matrix>,
}

impl Setup {
    fn check(args: &Args) -> anyhow::Result<Self> {
        let fabric = load_fabric(&args.fabric)?;
        let config = load_config(args)?;
        if let Some(s) = args.sparsity {
            sparsity::validate(s).map_err(|e| bad_input("--sparsity", e))?;
        }
        AdamW::new(args.lr)
            .validate()
            .map_err(|e| bad_input("--lr", e))?;
        let batch = load_batch(args, &config)?;
        let prompt = match &args.prompt {
            Some(path) => Some(super::prompt::read_prompt(path, config.n_embd)?),
            None => None,
        };
        let positions = batch.seq + prompt.as_ref().map_or(0, |p| p.rows);
        guard::check_batch_shape("--prompt", &config, batch.batch, positions)?;
        let precision = args.dtype.precision();
        let plan = plan_step(&config, batch.batch, positions, &fabric, precision)
            .map_err(guard::plan_error)?;
        guard::check_output_folder("--out", &args.out, &OUTPUT_FILES)?;
        guard::check_output_folder("--out", &args.out, &[PROMPT_GRAD_FILE])?;
        if let Some(trace) = &args.trace {
            check_trace_path(trace, &args.out)?;
        }
        Ok(Setup {
            prompt,
            fabric,
            config,
            batch,
            plan,
        })
    }
}

fn load_config(args: &Args) -> anyhow::Result<GptConfig> {
    if let Some(dir) = &args.checkpoint {
        return read_config(&dir.join(CONFIG_FILE)).map_err(|e| bad_input("--checkpoint", e));
    }
    let name = args.model.as_deref().unwrap_or("tiny");
    GptConfig::preset(name).map_err(|e| bad_input("--model", e))
}

/// Refuses an exact step whose host memory floor exceeds what is available, before any weight
/// is drawn or read ([`exact_cost`]): masks drawn from a checkpoint's zeros are not known yet
/// and count no kept weight.
fn exact_memory(args: &Args, setup: &Setup, checked: bool) -> anyhow::Result<()> {
    let kept_weights = match (args.sparsity, &args.checkpoint) {
        (Some(s), _) => exact_cost::kept_weights(&setup.config, s),
        (None, Some(_)) => 0,
        (None, None) => exact_cost::kept_weights(&setup.config, 0.0),
    };
    ExactRun {
        config: &setup.config,
        kept_weights,
        pes: setup.plan.region.pes(),
        checked,
        optimizer: false,
    }
    .check_memory()
}

/// Says on stderr when the exact step will take long: its fast count of cycles, the dense
/// baseline's included when the exact engine times one. Says nothing if the step cannot be
/// costed: the exact run reports why.
fn announce_long_exact_step(inputs: CostInputs<'_>) {
    let Ok(cost) = cost_step(inputs) else {
        return;
    };
    let sparse = inputs.masks.nnz() < inputs.masks.numel();
    let baseline = if inputs.dense_baseline && sparse {
        cost.dense_cycles()
    } else {
        0
    };
    let pes = inputs.plan.region.pes();
    if let Some(note) = exact_cost::long_run_note("the exact step", cost.cycles() + baseline, pes) {
        eprintln!("{note}");
    }
}

/// The weights (pruned entries zeroed) and the masks.
fn load_weights(args: &Args, config: &GptConfig) -> anyhow::Result<(GptParams, ModelMasks)> {
    let mut params = match &args.checkpoint {
        Some(dir) => read_params(&dir.join(WEIGHTS_FILE), config)
            .map_err(|e| bad_input("--checkpoint", e))?,
        None => guard::seeded_params(config, args.seed)?,
    };
    let masks = masks(args, config, &params)?;
    if args.checkpoint.is_some() && args.sparsity.is_some() {
        guard::note_new_masks_over_zeros(&params, " (omit --sparsity to keep them)");
    }
    masks
        .apply(&mut params)
        .map_err(|e| bad_input("--sparsity", e))?;
    Ok((params, masks))
}

/// The step's FLOPs by the convention, every operation with its dense and its sparse count.
fn analytic_flops(setup: &Setup, masks: &ModelMasks) -> anyhow::Result<flops::FlopReport> {
    let config = &setup.config;
    let shape = StepShape {
        batch: setup.plan.batch,
        seq: setup.plan.seq,
    };
    let nnz = NnzSource::from_fn(config, |l, k| masks.get(l, k).map_or(0, |m| m.nnz() as u64))?;
    Ok(flops::step_flops(
        config,
        shape,
        &nnz,
        FlopOptions::default(),
    )?)
}

fn masks(args: &Args, config: &GptConfig, params: &GptParams) -> anyhow::Result<ModelMasks> {
    match args.sparsity {
        None if args.checkpoint.is_some() => Ok(ModelMasks::from_params_zeros(params)),
        _ => preset_masks(args, config),
    }
}

/// The masks `--sparsity` draws from `--seed` (dense without it), no weights needed.
fn preset_masks(args: &Args, config: &GptConfig) -> anyhow::Result<ModelMasks> {
    match args.sparsity {
        Some(s) => ModelMasks::random(config, s, args.seed).map_err(|e| bad_input("--sparsity", e)),
        None => Ok(ModelMasks::dense(config)),
    }
}

fn load_batch(args: &Args, config: &GptConfig) -> anyhow::Result<Batch> {
    if let Some(path) = &args.tokens {
        return read_tokens(path, config);
    }
    let what = "--batch/--seq";
    guard::check_batch_shape(what, config, args.batch, args.seq)?;
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    rng.set_stream(u64::MAX);
    let tokens = (0..args.batch * args.seq)
        .map(|_| rng.random_range(0..config.vocab_size as u32))
        .collect();
    Batch::new(config, args.batch, args.seq, tokens).map_err(|e| bad_input(what, e))
}

/// A token file: a JSON array of equally long arrays of token ids.
pub(crate) fn read_tokens(path: &Path, config: &GptConfig) -> anyhow::Result<Batch> {
    let what = || format!("--tokens {}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| bad_input(what(), e))?;
    Batch::from_json(config, &text).map_err(|e| bad_input(what(), e))
}

/// The trace must not be one of the files `--out` receives (it would silently replace it).
fn check_trace_path(trace: &Path, out: &Path) -> anyhow::Result<()> {
    let name = trace.file_name().and_then(|n| n.to_str());
    let written = name.is_some_and(|n| OUTPUT_FILES.contains(&n) || n == PROMPT_GRAD_FILE);
    let folder = trace
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if written && guard::same_folder(folder, out) {
        return Err(bad_input(
            format!("--trace {}", trace.display()),
            anyhow::anyhow!("--out writes a file of that name there"),
        ));
    }
    Ok(())
}

/// Written instead of grads and updated weights by a step with `--prompt`: tensor `prompt`.
const PROMPT_GRAD_FILE: &str = "prompt_grad.safetensors";

/// The files `--out` receives (the last three only with numerics: without a loss and gradients,
/// the weights they would go with are not worth 4 bytes per parameter on disk).
const OUTPUT_FILES: [&str; 4] = [
    "report.json",
    "weights.safetensors",
    "grads.safetensors",
    "updated.safetensors",
];

/// A NaN or infinite loss, gradient or updated weight is an error, never a reported number.
fn check_results(numerics: &Numerics, updated: &GptParams) -> anyhow::Result<()> {
    check_loss(numerics)?;
    guard::check_finite(
        "the gradients (with --dtype fp16, a smaller --loss-scale may help)",
        &numerics.grads,
    )?;
    guard::check_finite("the updated weights (is --lr too large?)", updated)
}

/// [`check_results`] for a prompt step: the loss and the prompt's gradient (nothing is updated).
fn check_prompt_results(numerics: &Numerics) -> anyhow::Result<()> {
    check_loss(numerics)?;
    let values = numerics.prompt_grad.iter().flat_map(|g| &g.data);
    if let Some((index, value)) = values.enumerate().find(|(_, v)| !v.is_finite()) {
        anyhow::bail!(
            "the prompt's gradient has a non-finite value ({value}) at flat index {index}; nothing was written"
        );
    }
    Ok(())
}

fn check_loss(numerics: &Numerics) -> anyhow::Result<()> {
    if !numerics.loss.is_finite() {
        anyhow::bail!(
            "the loss is {} (non-finite): nothing was written; with --dtype fp16, activations may overflow",
            numerics.loss
        );
    }
    Ok(())
}

struct Summary<'a> {
    /// The region shapes costed and the one chosen.
    search: &'a RegionChoice,
    config: &'a GptConfig,
    plan: &'a StepPlan,
    fabric: &'a FabricConfig,
    masks: &'a ModelMasks,
    step: &'a StepReport,
    /// The matmul FLOPs of the gradients this step computes.
    /// The FLOPs of the operations this step runs (a prompt step: no weight gradient).
    flops: flops::StepFlops,
    /// Whether the dense baseline was timed (`--no-dense-baseline` not given). Without it, the
    /// records' dense cycles merely repeat the sparse ones and are not reported.
    dense_timed: bool,
    /// Prompt vectors in front of each sequence (`seq` counts them).
    prompt_len: usize,
    /// The attention kernels' SRAM and whether it fits.
    attention: AttentionFit,
    /// The exact fidelity's loss and gradients against the CPU reference's.
    check: Option<&'a ReferenceCheck>,
    /// The power of two the exact fidelity scaled the loss by (`--loss-scale`).
    loss_scale: Option<f32>,
}

/// What one block (or the embedding and head, `layer: None`) cost and saved.
struct LayerFigures {
    layer: Option<usize>,
    cycles: u64,
    dense_cycles: Option<u64>,
    flops: u64,
    dense_flops: Option<u64>,
}

impl LayerFigures {
    /// Dense matmul FLOPs over executed ones: the speedup sparsity promises.
    fn ideal(&self) -> Option<f64> {
        Some(self.dense_flops? as f64 / self.flops as f64).filter(|v| v.is_finite())
    }

    /// Dense cycles over cycles: the speedup realised.
    fn realised(&self) -> Option<f64> {
        Some(self.dense_cycles? as f64 / self.cycles as f64).filter(|v| v.is_finite())
    }

    fn efficiency(&self) -> Option<f64> {
        Some(self.realised()? / self.ideal()?)
    }
}

impl Summary<'_> {
    /// Per block, then the rest (embedding and head): cycles and matmul FLOPs, sparse and
    /// dense. A sparse matrix's dense FMACs are its executed ones times `numel / nnz` (each
    /// kept entry meets every token once).
    fn layers(&self) -> Vec<LayerFigures> {
        let mut out: Vec<LayerFigures> = (0..self.config.n_layer)
            .map(Some)
            .chain([None])
            .map(|layer| LayerFigures {
                layer,
                cycles: 0,
                dense_cycles: self.dense_timed.then_some(0),
                flops: 0,
                dense_flops: Some(0),
            })
            .collect();
        for r in &self.step.cost.records {
            let index = r.op.layer.unwrap_or(self.config.n_layer);
            let Some(entry) = out.get_mut(index) else {
                continue;
            };
            entry.cycles += r.cycles;
            entry.dense_cycles = entry.dense_cycles.map(|d| d + r.dense_cycles);
            if r.op.matmuls.is_empty() {
                continue;
            }
            entry.flops += 2 * r.fmacs;
            let dense = if r.op.sparse {
                r.op.matmuls.iter().find_map(|m| match (m, r.op.layer) {
                    (crate::flops::OpKind::Linear(kind), Some(l)) => {
                        let mask = self.masks.get(l, *kind)?;
                        let nnz = mask.nnz() as u64;
                        (nnz > 0).then(|| 2 * r.fmacs / nnz * mask.numel() as u64)
                    }
                    _ => None,
                })
            } else {
                Some(2 * r.fmacs)
            };
            entry.dense_flops = entry.dense_flops.zip(dense).map(|(a, b)| a + b);
        }
        out
    }

    /// Seconds of the step at the fabric clock.
    fn seconds(&self) -> f64 {
        self.step.cost.cycles() as f64 / (f64::from(self.fabric.clock_mhz) * 1e6)
    }

    /// Tokens of the step over its seconds at the fabric clock.
    fn tokens_per_second(&self) -> f64 {
        self.plan.tokens() as f64 / self.seconds()
    }

    /// FLOPs of the attention recomputed in the backward passes (the blocked backward's scores
    /// `Q K^T` again: `2 B S^2 d` per layer, beyond the FLOP convention's); 0 when nothing is.
    fn recompute_flops(&self) -> u64 {
        if !self.plan.recompute_attention() {
            return 0;
        }
        let (c, p) = (self.config, self.plan);
        2 * (c.n_layer * p.batch * p.seq * p.seq * c.n_embd) as u64
    }

    /// `cycles` as a JSON number when the dense baseline was timed, `null` when it was not.
    fn dense_json(&self, cycles: u64) -> Value {
        if self.dense_timed {
            json!(cycles)
        } else {
            Value::Null
        }
    }
}

fn print_summary(s: &Summary<'_>) -> anyhow::Result<()> {
    let (c, p, cost) = (s.config, s.plan, &s.step.cost);
    let positions = if s.prompt_len > 0 {
        let tokens = p.seq - s.prompt_len;
        format!(
            "{} positions ({} prompt vectors + {tokens} tokens)",
            p.seq, s.prompt_len
        )
    } else {
        format!("{} tokens", p.seq)
    };
    let dtype = checked::dtype_label(p.precision, s.loss_scale);
    outln!(
        "step: {} layers x {}, batch {} x {positions}, sparsity {:.4}, {dtype} on {} ({} x {} PEs), region {} x {}, {} fidelity",
        c.n_layer,
        c.n_embd,
        p.batch,
        s.masks.sparsity(),
        s.fabric.name,
        s.fabric.width,
        s.fabric.height,
        p.region.cols,
        p.region.rows,
        s.step.fidelity.name()
    )?;
    let plural = if p.micro_batch == 1 { "" } else { "s" };
    // A prompt step's rows are positions: its prompt vectors and its tokens.
    let rows = if s.prompt_len > 0 {
        "positions"
    } else {
        "tokens"
    };
    outln!(
        "passes: {}, each of up to {} sequence{plural} ({} {rows}), attention probabilities {}; {:.0} {rows}/s at {} MHz",
        p.pass_count(),
        p.micro_batch,
        p.micro_batch * p.seq,
        if p.recompute_attention() {
            format!(
                "recomputed in the backward pass (softmax statistics kept; blocked kernels, key blocks of {})",
                rows_text(p.attention_block_rows)
            )
        } else {
            "kept for the backward pass".to_string()
        },
        s.tokens_per_second(),
        s.fabric.clock_mhz
    )?;
    if let Some(warning) = s.attention.warning() {
        eprintln!("{warning}");
    }
    print_search(s)?;
    match &s.step.numerics {
        Some(n) => outln!("loss {:.6}", n.loss)?,
        None => outln!("loss not computed (--no-numerics)")?,
    }
    if let Some(check) = s.check {
        outln!("{}", checked::summary(check))?;
        if let Some(warning) = checked::warning(check, s.plan.precision) {
            eprintln!("{warning}");
        }
    }
    let sparse = s.flops.matmul_sparse;
    let counted = match s.step.fidelity {
        Fidelity::Exact => format!(
            "{} executed = {sparse} analytic",
            cost.executed_matmul_flops()
        ),
        Fidelity::Fast => format!("{sparse} analytic (fast fidelity: none executed)"),
    };
    let which = if s.prompt_len > 0 {
        " (the prompt's gradient: no weight gradient)"
    } else {
        ""
    };
    let recompute = match s.recompute_flops() {
        0 => String::new(),
        flops => format!("; the blocked attention's backward recomputed Q K^T, {flops} more"),
    };
    outln!(
        "matmul FLOPs: {counted}, dense {} ({:.3}x fewer){which}{recompute}",
        s.flops.matmul_dense,
        s.flops.reduction()
    )?;
    if s.dense_timed {
        outln!(
            "cycles: {} against {} dense ({:.3}x fewer); {:.1} us at {} MHz",
            cost.cycles(),
            cost.dense_cycles(),
            cost.dense_cycles() as f64 / cost.cycles() as f64,
            cost.cycles() as f64 / f64::from(s.fabric.clock_mhz),
            s.fabric.clock_mhz
        )?;
    } else {
        outln!(
            "cycles: {} ({:.1} us at {} MHz)",
            cost.cycles(),
            cost.cycles() as f64 / f64::from(s.fabric.clock_mhz),
            s.fabric.clock_mhz
        )?;
    }
    outln!(
        "\n{:<16} {:>12} {:>12} {:>8}",
        "operation",
        "cycles",
        "dense",
        "share"
    )?;
    for (name, cycles, dense) in cost.by_op() {
        let dense = if s.dense_timed {
            dense.to_string()
        } else {
            "-".into()
        };
        outln!(
            "{name:<16} {cycles:>12} {dense:>12} {:>7.1}%",
            100.0 * cycles as f64 / cost.cycles() as f64
        )?;
    }
    Ok(())
}

/// One line on the region search, one on the layers' efficiency.
fn print_search(s: &Summary<'_>) -> anyhow::Result<()> {
    let mut costed: Vec<String> = Vec::new();
    for t in &s.search.trials {
        let (Ok(plan), Some(cycles)) = (&t.plan, t.estimated_cycles) else {
            continue;
        };
        // Limits larger than the model give the same region more than once.
        let shape = format!("{}x{}: {cycles}", plan.region.cols, plan.region.rows);
        if !costed.contains(&shape) {
            costed.push(shape);
        }
    }
    outln!(
        "region search (estimated cycles, one-block proxy): {}",
        costed.join(", ")
    )?;
    if let (Some(bound), Some(chosen)) = (s.search.per_operation_bound(), s.search.chosen_cycles())
    {
        outln!(
            "  each operation on its own best shape (free re-layout): {bound}, {:.2} % fewer",
            100.0 * (1.0 - bound as f64 / chosen as f64)
        )?;
    }
    let layers = s.layers();
    let efficiency = layers
        .iter()
        .filter(|l| l.layer.is_some())
        .filter_map(|l| l.efficiency());
    let (lo, hi) = efficiency.fold((f64::INFINITY, 0f64), |(lo, hi), e| (lo.min(e), hi.max(e)));
    if lo <= hi {
        outln!(
            "blocks: realised / ideal speedup {:.3} to {:.3} (per layer in report.json)",
            lo,
            hi
        )?;
    }
    Ok(())
}

/// One stderr line per output file in `dir` that this run did not write (a `--no-numerics` or
/// prompt step after a full one): it is left as it was, from an earlier run, and `report.json`'s
/// `files` says which ones are this run's.
fn note_stale_outputs(dir: &Path, written: &[&str]) {
    for name in OUTPUT_FILES.iter().chain([&PROMPT_GRAD_FILE]) {
        if !written.contains(name) && dir.join(name).exists() {
            guard::note_stale(&dir.join(name));
        }
    }
}

/// Writes the output files and the trace, if any: all are staged beside their targets before any
/// is moved into place (see [`guard::write_all`]), so an error leaves the folder and the trace as
/// they were. Returns the names of the files in `dir`.
fn write_outputs(
    dir: &Path,
    s: &Summary<'_>,
    weights_and_updated: Option<(&GptParams, Option<&GptParams>)>,
    trace: Option<(&TraceRequest, &Trace)>,
    (seed, wall): (u64, f64),
) -> anyhow::Result<Vec<&'static str>> {
    let [report_file, weights_file, grads_file, updated_file] = OUTPUT_FILES;
    let mut names = vec![report_file];
    guard::write_all(dir, |dir| {
        let mut files = Vec::new();
        if let (Some(numerics), Some((weights, updated))) = (&s.step.numerics, weights_and_updated)
        {
            files.push((weights_file, weights));
            if let Some(updated) = updated {
                files.push((grads_file, &numerics.grads));
                files.push((updated_file, updated));
            }
        }
        let mut staged = Vec::new();
        if let Some((request, trace)) = trace {
            staged.extend(trace::stage(request, trace)?);
        }
        if let Some(grad) = s
            .step
            .numerics
            .as_ref()
            .and_then(|n| n.prompt_grad.as_ref())
        {
            let tensors = [(
                "prompt".to_string(),
                vec![grad.rows, grad.cols],
                &grad.data[..],
            )];
            staged.push(
                stage_f32_safetensors(&dir.join(PROMPT_GRAD_FILE), &tensors)
                    .with_context(|| format!("writing {PROMPT_GRAD_FILE}"))?,
            );
            names.push(PROMPT_GRAD_FILE);
        }
        names.extend(files.iter().map(|(name, _)| *name));
        for (name, params) in files {
            let named = hf_named_tensors(params);
            let views: Vec<_> = named
                .iter()
                .map(|(n, shape, data)| (n.clone(), shape.clone(), &data[..]))
                .collect();
            staged.push(
                stage_f32_safetensors(&dir.join(name), &views)
                    .with_context(|| format!("writing {name}"))?,
            );
        }
        let mut report = report_json(s, seed, wall);
        report["files"] = json!(names);
        let report = super::json_text(&report)?;
        staged.push(
            stage_bytes(&dir.join(report_file), report.as_bytes())
                .with_context(|| format!("writing {report_file}"))?,
        );
        Ok(staged)
    })?;
    Ok(names)
}

fn search_json(search: &RegionChoice) -> Value {
    let trials: Vec<Value> = search
        .trials
        .iter()
        .map(|t| {
            let (region, error) = match &t.plan {
                Ok(p) => (
                    json!({"cols": p.region.cols, "rows": p.region.rows, "micro_batch": p.micro_batch,
                        "attention_recomputed": p.recompute_attention(), "attention_fits": p.attention_fits}),
                    Value::Null,
                ),
                Err(e) => (Value::Null, json!(e)),
            };
            json!({
                "max_cols": t.limit.cols, "max_rows": t.limit.rows, "plan": region,
                "refused": error, "estimated_cycles": t.estimated_cycles,
            })
        })
        .collect();
    let operations: Vec<Value> = search
        .per_operation()
        .iter()
        .map(|o| {
            json!({
                "name": o.key.name, "phase": o.key.phase.name(), "in_blocks": o.key.in_blocks,
                "chosen_cycles": o.chosen_cycles, "best_cycles": o.best_cycles,
                "best_region": {"cols": o.best_cols, "rows": o.best_rows},
            })
        })
        .collect();
    json!({
        "method": "fast-fidelity cost of the embedding, block 0 and the head, block 0 counted n_layer times; the cheapest plan whose attention fits, else the cheapest",
        "chosen": {"cols": search.plan.region.cols, "rows": search.plan.region.rows},
        "trials": trials,
        "per_operation_bound_cycles": search.per_operation_bound(),
        "per_operation": operations,
    })
}

fn layers_json(s: &Summary<'_>) -> Vec<Value> {
    s.layers()
        .iter()
        .map(|l| {
            json!({
                "layer": l.layer, "cycles": l.cycles, "dense_cycles": l.dense_cycles,
                "matmul_flops": l.flops, "dense_matmul_flops": l.dense_flops,
                "ideal_speedup": l.ideal(), "realised_speedup": l.realised(),
                "efficiency": l.efficiency(),
            })
        })
        .collect()
}

fn report_json(s: &Summary<'_>, seed: u64, wall: f64) -> Value {
    let cost = &s.step.cost;
    let (c, p) = (s.config, s.plan);
    let by_phase: serde_json::Map<String, Value> = cost
        .by_phase()
        .into_iter()
        .map(|(phase, cycles, dense)| {
            (
                phase.name().to_string(),
                json!({"cycles": cycles, "dense_cycles": s.dense_json(dense)}),
            )
        })
        .collect();
    let by_op: Vec<Value> = cost
        .by_op()
        .into_iter()
        .map(|(op, cycles, dense)| {
            json!({"op": op, "cycles": cycles, "dense_cycles": s.dense_json(dense)})
        })
        .collect();
    let ops: Vec<Value> = cost
        .records
        .iter()
        .map(|r| {
            json!({
                "layer": r.op.layer, "op": r.op.name, "phase": r.op.phase.name(), "pass": r.pass,
                "cycles": r.cycles, "dense_cycles": s.dense_json(r.dense_cycles),
                "flops_executed": 2 * r.fmacs, "busy_cycles": r.busy_cycles, "router_forwards": r.router_forwards,
            })
        })
        .collect();
    json!({
        "schema": "wafersim.step/v1",
        "fidelity": s.step.fidelity.name(),
        "units": {
            "cycles": "fabric clock cycles", "flops": "floating-point operations (1 FMAC = 2)",
            "loss": "nats per predicted token (null: not computed)", "seconds": "at the fabric clock",
            "loss_scale": "the power of two the exact fidelity multiplied the loss by before its backward pass and divided the gradients by (null: fast fidelity)",
            "reference_check": "the exact fidelity's loss (relative error) and gradients (largest relative L2 distance of a tensor, against the larger of the tensor's norm and floor x the whole gradient's norm) against the CPU reference's, with the tolerance tests hold them to (null: fast fidelity or no numerics)",
            "busy_cycles": "summed over the region (null: not simulated)",
            "flops_counted": "flops.analytic_* and flops.non_matmul: of the operations the step runs (a prompt step computes no weight gradient)",
            "flops_executed": "per op: executed by the fabric (exact fidelity) or the analytic count (fast: nothing runs), under the FLOP convention: the blocked attention backward's recomputed Q K^T is checked but counted apart (passes.recompute_flops); flops.executed_matmul is null at the fast fidelity",
            "tokens_per_second": "tokens of the step per second at the fabric clock (a prompt step: positions, its prompt vectors included)",
            "micro_batch": "sequences per pass; weight gradients accumulate over the passes (ops[].pass: the pass that ran the operation, from 0)",
            "layers": "per block (layer null: embedding, final LayerNorm, head and loss); efficiency = realised / ideal speedup, null without the dense baseline",
        },
        "model": super::model_json(c),
        "batch": p.batch, "seq": p.seq, "prompt_len": s.prompt_len, "sparsity": s.masks.sparsity(), "dtype": p.precision.name(), "seed": seed,
        "fabric": super::fabric_json(s.fabric),
        "region": {
            "cols": p.region.cols, "rows": p.region.rows, "resident_bytes_per_pe": p.resident_bytes,
            "attention": s.attention.json(),
        },
        "passes": {
            "count": p.pass_count(), "micro_batch": p.micro_batch, "tokens_per_pass": p.micro_batch * p.seq,
            "attention_recomputed": p.recompute_attention(), "attention_block_rows": p.attention_block_rows,
            "recompute_flops": s.recompute_flops(),
        },
        "tokens_per_second": s.tokens_per_second(),
        "region_search": search_json(s.search),
        "layers": layers_json(s),
        "loss": s.step.numerics.as_ref().map(|n| n.loss),
        "reference_check": s.check.map(checked::json),
        "loss_scale": s.loss_scale,
        "flops": {
            "analytic_matmul_sparse": s.flops.matmul_sparse,
            "analytic_matmul_dense": s.flops.matmul_dense,
            "executed_matmul": (s.step.fidelity == Fidelity::Exact).then(|| cost.executed_matmul_flops()),
            "non_matmul": s.flops.non_matmul,
            "reduction": s.flops.reduction(),
        },
        "cycles": {
            "total": cost.cycles(),
            "dense_baseline": s.dense_json(cost.dense_cycles()),
            "reduction": if s.dense_timed {
                json!(cost.dense_cycles() as f64 / cost.cycles() as f64)
            } else {
                Value::Null
            },
            "by_phase": by_phase,
            "by_op": by_op,
        },
        "seconds": s.seconds(),
        "ops": ops,
        "host": { "wall_seconds": wall },
    })
}

/// `auto`, or a power of two from 1 to `2^24`, as `--loss-scale` takes it.
pub(super) fn parse_loss_scale(text: &str) -> Result<LossScale, String> {
    if text == "auto" {
        return Ok(LossScale::Auto);
    }
    let max = 1u32 << LossScale::MAX_EXPONENT;
    match text.parse::<u32>() {
        Ok(value) if value.is_power_of_two() && value <= max => {
            Ok(LossScale::Power(value.trailing_zeros() as u8))
        }
        _ => Err(format!(
            "expected auto or a power of two from 1 to {max} (1, 2, 4, ..., 1024, ...)"
        )),
    }
}

/// `1 row` or `N rows`.
pub(super) fn rows_text(rows: usize) -> String {
    if rows == 1 {
        "1 row".into()
    } else {
        format!("{rows} rows")
    }
}
