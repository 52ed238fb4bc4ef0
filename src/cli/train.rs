//! `wafersim train`: N optimizer steps of one phase of the MediSwift recipe on the simulated
//! fabric, writing `train.csv`, `train.json`, `loss.svg` and a Hugging Face checkpoint.
//!
//! Masks travel with the checkpoint as its zero pattern: a sparse pre-training run writes its
//! pruned weights as exact zeros, and a run started from that checkpoint without `--sparsity`
//! takes every zero of a sparsified matrix as pruned (a kept weight reaching exactly 0.0 in f32
//! under AdamW is not a practical concern). Nothing else is needed to continue with the same mask.
//!
//! Ctrl-C (SIGINT), SIGTERM or SIGHUP sets a flag; the run ends after the step in progress and
//! writes everything, as at the end of a full run (`train.json` says `"interrupted": true`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context;
use clap::ArgGroup;
use serde_json::{Value, json};
use wafersim_sim::FabricConfig;

use super::fit::AttentionFit;
use super::{bad_input, checked, guard, load_fabric};
use crate::compile::{StepPlan, plan_step};
use crate::flops::{self, FlopOptions, NnzSource, StepShape};
use crate::model::checkpoint::{
    CONFIG_FILE, Staged, WEIGHTS_FILE, hf_named_tensors, read_config, read_params, stage_bytes,
    stage_f32_safetensors,
};
use crate::model::{GptConfig, GptParams, Matrix};
use crate::reference::AdamW;
use crate::runtime::{Fidelity, LossScale};
use crate::sparsity::{self, ModelMasks};
use crate::training::{Corpus, LrSchedule, RunShape, Sampler, StepRecord, TrainPhase, Trainer};

/// Arguments of `wafersim train`.
#[derive(clap::Args)]
#[command(group(ArgGroup::new("source").args(["model", "checkpoint"]).required(true)))]
pub struct Args {
    /// A built-in model preset, initialised from --seed.
    #[arg(long, value_name = "PRESET")]
    model: Option<String>,
    /// A Hugging Face GPT-2 checkpoint folder (config.json + model.safetensors).
    #[arg(long, value_name = "DIR")]
    checkpoint: Option<PathBuf>,
    /// The token file: a JSON array of token-id sequences, or one flat array of token ids.
    #[arg(long, value_name = "PATH")]
    tokens: PathBuf,
    /// Optimizer steps to run.
    #[arg(long, value_name = "N")]
    steps: u64,
    /// Sequences per step.
    #[arg(long, value_name = "B")]
    batch: usize,
    /// Tokens per sequence (windows of the token file).
    #[arg(long, value_name = "S")]
    seq: usize,
    /// Which phase of the recipe.
    #[arg(long, value_enum)]
    phase: PhaseArg,
    /// sparse-pretrain: fraction of each sparsified matrix pruned (drawn from --seed) [default:
    /// the checkpoint's zeros].
    #[arg(long, value_name = "S", allow_hyphen_values = true)]
    sparsity: Option<f64>,
    /// prompt-tune: learned prompt vectors in front of every sequence [default: 8, or the
    /// --prompt file's].
    #[arg(long, value_name = "P")]
    prompt_len: Option<usize>,
    /// prompt-tune: start from the embeddings of the data's first P token ids, or random
    /// [default: data].
    #[arg(long, value_enum, conflicts_with = "prompt")]
    prompt_init: Option<PromptInit>,
    /// prompt-tune: start from the prompt vectors of this file (a `prompt.safetensors` written by
    /// an earlier run) instead of --prompt-init.
    #[arg(long, value_name = "PATH")]
    prompt: Option<PathBuf>,
    /// Peak AdamW learning rate.
    #[arg(long, default_value_t = 1e-3, allow_hyphen_values = true)]
    lr: f64,
    /// Steps of linear warm-up before the cosine decay (a run of no more steps than this ends
    /// during warm-up, with a warning).
    #[arg(long, value_name = "N", default_value_t = 0)]
    warmup: u64,
    /// The machine: wse2, wse3, WxH, or a .toml/.json file.
    #[arg(long, value_name = "FABRIC")]
    fabric: String,
    /// How cycles are obtained (fast: the loss and gradients come from the CPU reference).
    #[arg(long, value_enum, default_value = "exact")]
    fidelity: super::gemm::FidelityArg,
    /// Storage precision of activations and streamed weights in the matmuls (the weights and
    /// AdamW's state stay f32 on the host).
    #[arg(long, value_enum, default_value = "fp32")]
    dtype: super::gemm::DtypeArg,
    /// Loss scaling of the exact steps' backward pass (as `wafersim step --loss-scale`).
    #[arg(long, value_name = "auto|L", default_value = "auto", value_parser = super::step::parse_loss_scale)]
    loss_scale: LossScale,
    /// Seed of the initial weights, the masks and the batch order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write a checkpoint (and the logs so far) every K steps, to `step-K/`; none at the
    /// last step, whose checkpoint is `checkpoint/` (a `step-K/` of an earlier run that this run
    /// does not write is named on stderr).
    #[arg(long, value_name = "K")]
    save_every: Option<u64>,
    /// Output folder.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PromptInit {
    Data,
    Random,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PhaseArg {
    SparsePretrain,
    DenseFinetune,
    PromptTune,
}

impl PhaseArg {
    fn phase(self) -> TrainPhase {
        match self {
            PhaseArg::SparsePretrain => TrainPhase::SparsePretrain,
            PhaseArg::DenseFinetune => TrainPhase::DenseFinetune,
            PhaseArg::PromptTune => TrainPhase::PromptTune,
        }
    }
}

/// The files of `--out` (the checkpoint goes to `checkpoint/`).
const LOG_FILES: [&str; 3] = ["train.csv", "train.json", "loss.svg"];
const CHECKPOINT_DIR: &str = "checkpoint";
/// The prompt vectors of a prompt-tuning run, tensor `prompt` `[P, d]`.
const PROMPT_FILE: &str = "prompt.safetensors";

pub fn run(args: Args) -> anyhow::Result<()> {
    let setup = Setup::check(&args)?;
    if let Some(warning) =
        super::unvalidated_timing_warning(&setup.fabric, args.fidelity.fidelity())
    {
        eprintln!("{warning}");
    }
    let (params, masks) = load_weights(&args, &setup)?;
    let schedule = LrSchedule {
        peak: args.lr,
        warmup: args.warmup,
        total: args.steps,
    };
    if let Some(warning) = warm_up_warning(&schedule) {
        eprintln!("{warning}");
    }
    let mut trainer = match setup.phase {
        TrainPhase::PromptTune => {
            let prompt = match &setup.prompt_file {
                Some(vectors) => vectors.clone(),
                None => super::prompt::initial_prompt(
                    args.prompt_init == Some(PromptInit::Random),
                    &setup.corpus,
                    &params,
                    setup.prompt_len,
                    args.seed,
                )?,
            };
            Trainer::prompt_tuning(params, masks, prompt, schedule)
        }
        _ => Trainer::new(setup.phase, params, masks, schedule),
    };
    let mut sampler = Sampler::new(&setup.corpus, args.batch, args.seed);
    let stop = stop_flag();
    let shape = RunShape {
        config: &setup.config,
        fabric: &setup.fabric,
        plan: &setup.plan,
        fidelity: args.fidelity.fidelity(),
        loss_scale: args.loss_scale,
    };
    let started = Instant::now();
    let savings = prompt_savings(&trainer, shape, &setup, &args)?;
    let mut log = Vec::new();
    let mut saved = Vec::new();
    while trainer.steps < args.steps && !stop.load(Ordering::SeqCst) {
        let batch = sampler
            .next_batch(&setup.corpus, &setup.config)
            .map_err(|e| bad_input(format!("--tokens {}", args.tokens.display()), e))?;
        let record = trainer.step(shape, &batch)?;
        eprintln!(
            "step {}/{}: loss {:.4}, lr {:.3e}, {} cycles",
            record.step, args.steps, record.loss, record.lr, record.cycles
        );
        log.push(record);
        if let (1, Some(check)) = (record.step, &trainer.first_check) {
            eprintln!("step 1 {}", checked::summary(check));
            if let Some(warning) = checked::warning(check, setup.plan.precision) {
                eprintln!("{warning}");
            }
        }
        if saves_at(&args, record.step) {
            let dir = args.out.join(step_dir(record.step));
            let mut run = Finished::new(&setup, &args, &trainer, &log, started, false);
            run.savings = savings.clone();
            write_outputs(&args.out, &dir, &run)?;
            saved.push(record.step);
        }
    }
    let interrupted = trainer.steps < args.steps;
    let mut run = Finished::new(&setup, &args, &trainer, &log, started, interrupted);
    run.savings = savings;
    // The files first: a terminal or pipe that goes away while the summary prints loses nothing.
    write_outputs(&args.out, &args.out.join(CHECKPOINT_DIR), &run)?;
    note_stale_outputs(&args.out, setup.phase, &saved);
    print_summary(&run)?;
    Ok(())
}

/// Whether `--save-every` writes `step-{step}/`: every K steps, but not at the last, whose
/// checkpoint is `checkpoint/`.
fn saves_at(args: &Args, step: u64) -> bool {
    args.save_every.is_some_and(|k| step.is_multiple_of(k)) && step < args.steps
}

/// The folder of `--save-every`'s checkpoint at `step`.
fn step_dir(step: u64) -> String {
    format!("step-{step}")
}

/// The `step-K/` folders (or files of such a name) in `out`, by step, in step order.
fn step_dirs(out: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(out) else {
        return Vec::new();
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name();
            let step = name.to_str()?.strip_prefix("step-")?.parse().ok()?;
            // `step-01` is no name this run writes, and not an earlier run's either.
            (step_dir(step).as_str() == name).then(|| (step, entry.path()))
        })
        .collect();
    found.sort();
    found
}

/// The files a checkpoint folder of this phase receives.
fn checkpoint_files(phase: TrainPhase) -> Vec<&'static str> {
    let mut names = vec![WEIGHTS_FILE, CONFIG_FILE];
    if phase == TrainPhase::PromptTune {
        names.push(PROMPT_FILE);
    }
    names
}

/// Every path the run will write, checked before it starts (see [`guard`]): the logs and, for
/// prompt tuning, the prompt in `--out`; `checkpoint/` and the `step-K/` folders `--save-every`
/// will write, with their files. A `step-K/` that does not exist yet needs nothing more than
/// `--out`; one that does is checked as `checkpoint/` is.
fn check_outputs(args: &Args, phase: TrainPhase) -> anyhow::Result<()> {
    let mut logs = LOG_FILES.to_vec();
    if phase == TrainPhase::PromptTune {
        logs.push(PROMPT_FILE);
    }
    guard::check_output_folder("--out", &args.out, &logs)?;
    let files = checkpoint_files(phase);
    guard::check_output_subfolder("--out", &args.out, CHECKPOINT_DIR, &files)?;
    for (step, dir) in step_dirs(&args.out) {
        if saves_at(args, step) {
            guard::check_output_folder("--out", &dir, &files)?;
        }
    }
    Ok(())
}

/// Names on stderr what an earlier run left in `out` and this one did not write: `step-K/`
/// folders other than this run's (`saved`), and, when this run is not prompt tuning, the prompt
/// files of an earlier prompt-tuning run in `out` and beside the models this run wrote.
fn note_stale_outputs(out: &Path, phase: TrainPhase, saved: &[u64]) {
    for (step, dir) in step_dirs(out) {
        if !saved.contains(&step) {
            guard::note_stale(&dir);
        }
    }
    if phase == TrainPhase::PromptTune {
        return;
    }
    let checkpoints = saved.iter().map(|&step| step_dir(step));
    let folders = [String::new(), CHECKPOINT_DIR.to_string()]
        .into_iter()
        .chain(checkpoints);
    for folder in folders {
        let prompt = out.join(folder).join(PROMPT_FILE);
        if prompt.exists() {
            guard::note_stale(&prompt);
        }
    }
}

/// A run no longer than its warm-up never reaches the cosine decay (nor, when shorter, the
/// peak). A short test run is legitimate, so this is a warning, not a refusal.
fn warm_up_warning(schedule: &LrSchedule) -> Option<String> {
    if !schedule.ends_during_warm_up() {
        return None;
    }
    let (steps, warmup) = (schedule.total, schedule.warmup);
    let last = schedule.at(steps.saturating_sub(1));
    Some(format!(
        "warning: --warmup {warmup} is not shorter than --steps {steps}: the run ends during warm-up, its last step at lr {last:.3e} ({steps}/{warmup} of --lr), and never decays to --lr / 10"
    ))
}

/// Prompt tuning: one step's cost with every gradient against the run's (no weight gradient),
/// on the first batch, as JSON; `None` for the other phases.
fn prompt_savings(
    trainer: &Trainer,
    shape: RunShape<'_>,
    setup: &Setup,
    args: &Args,
) -> anyhow::Result<Option<Value>> {
    if setup.phase != TrainPhase::PromptTune {
        return Ok(None);
    }
    let batch = Sampler::new(&setup.corpus, args.batch, args.seed)
        .next_batch(&setup.corpus, &setup.config)
        .map_err(|e| bad_input("--tokens", e))?;
    let (all, run) = trainer.cost_with_all_gradients(shape, &batch)?;
    Ok(Some(json!({
        "what": "one step on the first batch, at the run's fidelity: every gradient against the prompt's only",
        "all_gradients": { "cycles": all.cycles(), "flops": all.executed_matmul_flops() },
        "prompt_only": { "cycles": run.cycles(), "flops": run.executed_matmul_flops() },
        "saved": {
            "cycles": all.cycles() - run.cycles(),
            "flops": all.executed_matmul_flops() - run.executed_matmul_flops(),
            "cycle_fraction": (all.cycles() - run.cycles()) as f64 / all.cycles() as f64,
        },
    })))
}

/// Set by Ctrl-C, SIGTERM or SIGHUP: the loop ends after the step in progress.
fn stop_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let handler_flag = Arc::clone(&flag);
    if let Err(e) = ctrlc::set_handler(move || handler_flag.store(true, Ordering::SeqCst)) {
        eprintln!("warning: Ctrl-C and SIGTERM will not stop the run cleanly: {e}");
    }
    flag
}

/// Everything checked before any weight is drawn or read and before the output folder exists.
struct Setup {
    phase: TrainPhase,
    fabric: FabricConfig,
    config: GptConfig,
    corpus: Corpus,
    plan: StepPlan,
    /// Prompt vectors in front of every sequence (0 outside prompt-tune).
    prompt_len: usize,
    /// The vectors of `--prompt`, read once.
    prompt_file: Option<Matrix>,
}

impl Setup {
    fn check(args: &Args) -> anyhow::Result<Self> {
        let phase = args.phase.phase();
        let fabric = load_fabric(&args.fabric)?;
        let config = load_config(args)?;
        check_flags(args, phase)?;
        guard::check_batch_shape("--batch/--seq", &config, args.batch, args.seq)?;
        let corpus = read_corpus(&args.tokens, args.seq, &config)?;
        let prompt_file = match &args.prompt {
            Some(path) => Some(super::prompt::read_prompt(path, config.n_embd)?),
            None => None,
        };
        let prompt_len = if phase == TrainPhase::PromptTune {
            prompt_len(args.prompt_len, prompt_file.as_ref())?
        } else {
            0
        };
        let positions = args.seq.saturating_add(prompt_len);
        let what = "--seq + the prompt's vectors";
        guard::check_batch_shape(what, &config, args.batch, positions)?;
        let plan = plan_step(
            &config,
            args.batch,
            positions,
            &fabric,
            args.dtype.precision(),
        )
        .map_err(guard::plan_error)?;
        let attention = AttentionFit::of(&config, &plan, &fabric);
        attention.refuse_if_exact(args.fidelity.fidelity())?;
        if let Some(warning) = attention.warning() {
            eprintln!("{warning}");
        }
        check_outputs(args, phase)?;
        Ok(Setup {
            phase,
            fabric,
            config,
            corpus,
            plan,
            prompt_len,
            prompt_file,
        })
    }
}

fn check_flags(args: &Args, phase: TrainPhase) -> anyhow::Result<()> {
    if args.steps == 0 {
        return Err(bad_input("--steps", anyhow::anyhow!("must be at least 1")));
    }
    if args.save_every == Some(0) {
        return Err(bad_input(
            "--save-every",
            anyhow::anyhow!("must be at least 1"),
        ));
    }
    AdamW::new(args.lr)
        .validate()
        .map_err(|e| bad_input("--lr", e))?;
    match (phase, args.sparsity) {
        (TrainPhase::SparsePretrain, Some(s)) => {
            sparsity::validate(s).map_err(|e| bad_input("--sparsity", e))?;
        }
        (TrainPhase::SparsePretrain, None) if args.checkpoint.is_none() => {
            return Err(bad_input(
                "--sparsity",
                anyhow::anyhow!("sparse-pretrain from a preset needs --sparsity"),
            ));
        }
        (TrainPhase::DenseFinetune | TrainPhase::PromptTune, Some(_)) => {
            return Err(bad_input(
                "--sparsity",
                anyhow::anyhow!(
                    "only sparse-pretrain takes a sparsity ({} has none)",
                    phase.name()
                ),
            ));
        }
        _ => {}
    }
    if args.prompt_len == Some(0) {
        return Err(bad_input(
            "--prompt-len",
            anyhow::anyhow!("must be at least 1"),
        ));
    }
    let prompt_flags = [
        ("--prompt", args.prompt.is_some()),
        ("--prompt-len", args.prompt_len.is_some()),
        ("--prompt-init", args.prompt_init.is_some()),
    ];
    if phase != TrainPhase::PromptTune
        && let Some((flag, _)) = prompt_flags.iter().find(|(_, given)| *given)
    {
        return Err(bad_input(
            *flag,
            anyhow::anyhow!("only prompt-tune learns prompt vectors"),
        ));
    }
    Ok(())
}

/// The prompt-tune run's number of prompt vectors: `--prompt-len` (8 if absent), or the rows of
/// the `--prompt` file (which `--prompt-len`, if given, must equal).
fn prompt_len(given: Option<usize>, file: Option<&Matrix>) -> anyhow::Result<usize> {
    let Some(vectors) = file else {
        return Ok(given.unwrap_or(8));
    };
    match given {
        Some(given) if given != vectors.rows => Err(bad_input(
            "--prompt-len",
            anyhow::anyhow!(
                "{given}, but the --prompt file holds {} vectors",
                vectors.rows
            ),
        )),
        _ => Ok(vectors.rows),
    }
}

fn load_config(args: &Args) -> anyhow::Result<GptConfig> {
    if let Some(dir) = &args.checkpoint {
        return read_config(&dir.join(CONFIG_FILE)).map_err(|e| bad_input("--checkpoint", e));
    }
    let name = args.model.as_deref().unwrap_or("tiny");
    GptConfig::preset(name).map_err(|e| bad_input("--model", e))
}

fn read_corpus(path: &Path, seq: usize, config: &GptConfig) -> anyhow::Result<Corpus> {
    let what = || format!("--tokens {}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| bad_input(what(), e))?;
    Corpus::from_json(&text, seq, config).map_err(|e| bad_input(what(), e))
}

/// The starting weights (pruned entries zeroed) and the masks of the phase.
fn load_weights(args: &Args, setup: &Setup) -> anyhow::Result<(GptParams, ModelMasks)> {
    let config = &setup.config;
    let mut params = match &args.checkpoint {
        Some(dir) => read_params(&dir.join(WEIGHTS_FILE), config)
            .map_err(|e| bad_input("--checkpoint", e))?,
        None => guard::seeded_params(config, args.seed)?,
    };
    let masks = match (setup.phase, args.sparsity) {
        (TrainPhase::SparsePretrain, Some(s)) => {
            if args.checkpoint.is_some() {
                guard::note_new_masks_over_zeros(&params, " (omit --sparsity to keep them)");
            }
            ModelMasks::random(config, s, args.seed).map_err(|e| bad_input("--sparsity", e))?
        }
        (TrainPhase::SparsePretrain | TrainPhase::PromptTune, _) => {
            ModelMasks::from_params_zeros(&params)
        }
        (TrainPhase::DenseFinetune, _) => ModelMasks::dense(config),
    };
    masks
        .apply(&mut params)
        .map_err(|e| bad_input("--sparsity", e))?;
    Ok((params, masks))
}

/// A run's state at the moment its files are written.
struct Finished<'a> {
    setup: &'a Setup,
    args: &'a Args,
    trainer: &'a Trainer,
    log: &'a [StepRecord],
    wall: f64,
    interrupted: bool,
    savings: Option<Value>,
}

impl<'a> Finished<'a> {
    fn new(
        setup: &'a Setup,
        args: &'a Args,
        trainer: &'a Trainer,
        log: &'a [StepRecord],
        started: Instant,
        interrupted: bool,
    ) -> Self {
        Self {
            setup,
            args,
            trainer,
            log,
            wall: started.elapsed().as_secs_f64(),
            interrupted,
            savings: None,
        }
    }

    fn total_flops(&self) -> u64 {
        self.log.iter().map(|r| r.flops).sum()
    }

    fn total_cycles(&self) -> u64 {
        self.log.iter().map(|r| r.cycles).sum()
    }

    /// The power of two the exact steps scaled their loss by (`None`: fast fidelity).
    fn loss_scale(&self) -> Option<f32> {
        let exact = self.args.fidelity.fidelity() == Fidelity::Exact;
        let setup = self.setup;
        exact.then(|| (self.args.loss_scale).of_step(&setup.plan, setup.prompt_len))
    }

    fn seconds(&self) -> f64 {
        self.total_cycles() as f64 / (f64::from(self.setup.fabric.clock_mhz) * 1e6)
    }
}

fn print_summary(run: &Finished<'_>) -> anyhow::Result<()> {
    let (first, last) = (run.log.first(), run.log.last());
    let loss = |r: Option<&StepRecord>| r.map_or(f64::NAN, |r| r.loss);
    outln!(
        "{}, {} fidelity, {}: {} of {} steps{}, loss {:.4} -> {:.4} (ln vocab {:.4})",
        run.setup.phase.name(),
        run.args.fidelity.fidelity().name(),
        checked::dtype_label(run.setup.plan.precision, run.loss_scale()),
        run.log.len(),
        run.args.steps,
        if run.interrupted {
            " (interrupted)"
        } else {
            ""
        },
        loss(first),
        loss(last),
        (run.setup.config.vocab_size as f64).ln()
    )?;
    let counted = match run.args.fidelity.fidelity() {
        crate::runtime::Fidelity::Exact => "executed",
        crate::runtime::Fidelity::Fast => "counted",
    };
    outln!(
        "matmul FLOPs {counted} {}, cycles {} ({:.6} s at {} MHz), host wall {:.1} s",
        run.total_flops(),
        run.total_cycles(),
        run.seconds(),
        run.setup.fabric.clock_mhz,
        run.wall
    )?;
    Ok(())
}

/// Stages the logs in `out` and the checkpoint in `checkpoint` (with the prompt, if any, in both),
/// then moves them all into place (see [`guard::write_all`]). A `checkpoint` folder created here
/// is removed again if staging fails.
fn write_outputs(out: &Path, checkpoint: &Path, run: &Finished<'_>) -> anyhow::Result<()> {
    guard::write_all(out, |out| {
        let created = !checkpoint.exists();
        std::fs::create_dir_all(checkpoint)
            .with_context(|| format!("creating {}", checkpoint.display()))?;
        let staged = stage_outputs(out, checkpoint, run);
        if staged.is_err() && created {
            let _ = std::fs::remove_dir(checkpoint);
        }
        staged
    })
}

fn stage_outputs(out: &Path, checkpoint: &Path, run: &Finished<'_>) -> anyhow::Result<Vec<Staged>> {
    let mut staged = stage_checkpoint(checkpoint, &run.setup.config, &run.trainer.params)?;
    if let Some(prompt) = &run.trainer.prompt {
        let v = &prompt.vectors;
        let tensors = [("prompt".to_string(), vec![v.rows, v.cols], &v.data[..])];
        // The latest prompt in `out`, and each checkpoint's own beside its model.
        for path in [out.join(PROMPT_FILE), checkpoint.join(PROMPT_FILE)] {
            staged.push(
                stage_f32_safetensors(&path, &tensors)
                    .with_context(|| format!("writing {}", path.display()))?,
            );
        }
    }
    let [csv, json_file, svg] = LOG_FILES;
    staged.push(stage_text(&out.join(csv), &csv_text(run.log))?);
    let report = super::json_text(&report_json(run, checkpoint))?;
    staged.push(stage_text(&out.join(json_file), &report)?);
    staged.push(stage_text(
        &out.join(svg),
        &crate::plot::loss_svg(run.log, &format!("{} loss", run.setup.phase.name()))?,
    )?);
    Ok(staged)
}

fn stage_text(path: &Path, text: &str) -> anyhow::Result<Staged> {
    stage_bytes(path, text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

/// `config.json` and `model.safetensors` of `params`, staged in `dir`.
pub(crate) fn stage_checkpoint(
    dir: &Path,
    config: &GptConfig,
    params: &GptParams,
) -> anyhow::Result<Vec<Staged>> {
    let named = hf_named_tensors(params);
    let views: Vec<_> = named
        .iter()
        .map(|(n, shape, data)| (n.clone(), shape.clone(), &data[..]))
        .collect();
    let weights = stage_f32_safetensors(&dir.join(WEIGHTS_FILE), &views)
        .with_context(|| format!("writing {}", dir.join(WEIGHTS_FILE).display()))?;
    let config_file = stage_text(&dir.join(CONFIG_FILE), &config.to_hf_json())?;
    Ok(vec![weights, config_file])
}

/// `step,loss,lr,flops,cycles`, one line per step.
fn csv_text(log: &[StepRecord]) -> String {
    let mut text = String::from("step,loss,lr,flops,cycles\n");
    for r in log {
        text.push_str(&format!(
            "{},{},{},{},{}\n",
            r.step, r.loss, r.lr, r.flops, r.cycles
        ));
    }
    text
}

fn report_json(run: &Finished<'_>, checkpoint: &Path) -> Value {
    let (setup, args) = (run.setup, run.args);
    let c = &setup.config;
    let losses: Vec<f64> = run.log.iter().map(|r| r.loss).collect();
    let tail = &losses[losses.len().saturating_sub(10)..];
    let steps = run.log.len() as u64;
    let dense_step = dense_step_flops(setup).unwrap_or(0);
    json!({
        "schema": "wafersim.train/v1",
        "units": {
            "loss": "nats per predicted token", "flops": "matmul floating-point operations (1 FMAC = 2)",
            "cycles": "fabric clock cycles", "seconds": "at the fabric clock",
            "reference_check": "the first step's loss and gradients against the CPU reference's (exact fidelity; null at the fast one)",
            "loss_scale": "the power of two the exact steps multiplied the loss by before their backward pass and divided the gradients by (null: fast fidelity)",
        },
        "phase": setup.phase.name(),
        "fidelity": args.fidelity.fidelity().name(),
        "model": super::model_json(c),
        "fabric": super::fabric_json(&setup.fabric),
        "region": { "cols": setup.plan.region.cols, "rows": setup.plan.region.rows },
        "batch": args.batch, "seq": args.seq, "seed": args.seed,
        "dtype": setup.plan.precision.name(), "loss_scale": run.loss_scale(),
        "sparsity": run.trainer.masks.sparsity(),
        "lr": { "peak": args.lr, "warmup": args.warmup, "schedule": "linear warm-up, cosine to peak/10" },
        "tokens_file": { "path": args.tokens.display().to_string(), "windows": setup.corpus.windows(), "tokens": setup.corpus.tokens() },
        "steps": { "requested": args.steps, "done": steps },
        "interrupted": run.interrupted,
        "tokens_trained": steps * (args.batch * args.seq) as u64,
        "loss": {
            "first": losses.first(), "last": losses.last(),
            "min": losses.iter().copied().reduce(f64::min),
            "mean_last_10": (!tail.is_empty()).then(|| tail.iter().sum::<f64>() / tail.len() as f64),
            "ln_vocab": (c.vocab_size as f64).ln(),
        },
        "totals": {
            "flops": run.total_flops(),
            "dense_flops": steps * dense_step,
            "cycles": run.total_cycles(),
            "seconds": run.seconds(),
        },
        "checkpoint": checkpoint.display().to_string(),
        "reference_check": run.trainer.first_check.as_ref().map(checked::json),
        "prompt": run.trainer.prompt.as_ref().map(|p| json!({
            "len": p.vectors.rows, "file": PROMPT_FILE, "savings": run.savings,
        })),
        "host": { "wall_seconds": run.wall },
    })
}

/// Matmul FLOPs of one dense step of this shape and phase (the comparison the totals are read
/// against); a prompt step computes no weight gradient.
fn dense_step_flops(setup: &Setup) -> anyhow::Result<u64> {
    let shape = StepShape {
        batch: setup.plan.batch,
        seq: setup.plan.seq,
    };
    let nnz = NnzSource::dense(&setup.config);
    let report = flops::step_flops(&setup.config, shape, &nnz, FlopOptions::default())?;
    let weight_gradients = setup.phase != TrainPhase::PromptTune;
    Ok(report.of_step(weight_gradients).matmul_dense)
}
