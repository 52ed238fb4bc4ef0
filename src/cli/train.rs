//! `wafersim train`: N optimizer steps of one phase of the MediSwift recipe on the simulated
//! fabric, writing `train.csv`, `train.json`, `loss.svg` and a Hugging Face checkpoint.
//!
//! Masks travel with the checkpoint as its zero pattern: a sparse pre-training run writes its
//! pruned weights as exact zeros, and a run started from that checkpoint without `--sparsity`
//! takes every zero of a sparsified matrix as pruned (a kept weight reaching exactly 0.0 in f32
//! under AdamW is not a practical concern). Nothing else is needed to start a new run with the
//! same mask; a resumed run reads the masks its state stores.
//!
//! Ctrl-C (SIGINT), SIGTERM or SIGHUP sets a flag; the run ends after the step in progress and
//! writes everything, as at the end of a full run (`train.json` says `"interrupted": true`).
//!
//! Every checkpoint (`checkpoint/`, `step-K/`) also holds the run's state
//! ([`crate::training::state`]), and `--resume DIR` continues the run from it: the same phase,
//! schedule, batch order, seed, dtype, loss scale, fabric and fidelity, AdamW's moments and step
//! count, to the same bytes as a run that never stopped. The flags that define the run may be
//! given with `--resume` only with the values it already has (`--steps` is the run's total, not
//! more steps); those that only start a run (`--model`, `--checkpoint`, `--sparsity`,
//! `--prompt`, `--prompt-init`) are refused. The state also digests the checkpoint's
//! `model.safetensors`, and `--resume` refuses a weights file that is not the one it was
//! written with.
//!
//! `--loss-scale dynamic` ([`scaling`]) skips an exact step whose loss or gradients overflow and
//! halves the scale, doubling it again after `--loss-scale-window` clean steps; `train.csv`
//! logs every step's scale and skip, and the state carries the scale on to a resumed run.

mod scaling;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context;
use clap::ArgGroup;
use serde_json::{Value, json};
use wafersim_sim::FabricConfig;

use super::exact_cost::{self, ExactRun};
use super::fit::AttentionFit;
use super::{bad_input, checked, guard, load_fabric};
use crate::compile::{StepPlan, plan_step};
use crate::flops::{self, FlopOptions, NnzSource, StepShape};
use crate::model::checkpoint::{
    CONFIG_FILE, Staged, WEIGHTS_FILE, hf_named_tensors, read_config, read_params, stage_bytes,
    stage_f32_safetensors,
};
use crate::model::{GptConfig, GptParams, Matrix};
use crate::reference::{AdamW, Batch};
use crate::runtime::{Fidelity, LossScale};
use crate::sparsity::{self, ModelMasks};
use crate::training::state::{
    self, OptimizerState, STATE_JSON, STATE_TENSORS, SamplerState, ScheduleState, StateTensors,
    TokensState, TrainState,
};
use crate::training::{
    Corpus, LrSchedule, PromptVectors, RunShape, Sampler, StepRecord, TrainPhase, Trainer,
};
use wafersim_kernels::Precision;

/// Arguments of `wafersim train`.
#[derive(clap::Args)]
#[command(group(ArgGroup::new("source").args(["model", "checkpoint", "resume"]).required(true)))]
pub struct Args {
    /// A built-in model preset, initialised from --seed.
    #[arg(long, value_name = "PRESET")]
    model: Option<String>,
    /// A Hugging Face GPT-2 checkpoint folder (config.json + model.safetensors): a new run from
    /// its weights (AdamW, the schedule and the batch order start afresh).
    #[arg(long, value_name = "DIR")]
    checkpoint: Option<PathBuf>,
    /// Continue the run whose checkpoint DIR is (`checkpoint/` or a `step-K/` of a run, with
    /// its train_state.json): its settings, optimizer state, schedule and batch order. Flags
    /// that define the run may be repeated only with the same values.
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// The token file: a JSON array of token-id sequences, or one flat array of token ids (with
    /// --resume: the run's own file, checked by its digest).
    #[arg(long, value_name = "PATH")]
    tokens: PathBuf,
    /// Optimizer steps of the whole run (with --resume: its total, the same as before).
    #[arg(long, value_name = "N", required_unless_present = "resume")]
    steps: Option<u64>,
    /// Sequences per step.
    #[arg(long, value_name = "B", required_unless_present = "resume")]
    batch: Option<usize>,
    /// Tokens per sequence (windows of the token file).
    #[arg(long, value_name = "S", required_unless_present = "resume")]
    seq: Option<usize>,
    /// Which phase of the recipe.
    #[arg(long, value_enum, required_unless_present = "resume")]
    phase: Option<PhaseArg>,
    /// sparse-pretrain: fraction of each sparsified matrix pruned (drawn from --seed) [default:
    /// the checkpoint's zeros].
    #[arg(
        long,
        value_name = "S",
        allow_hyphen_values = true,
        conflicts_with = "resume"
    )]
    sparsity: Option<f64>,
    /// prompt-tune: learned prompt vectors in front of every sequence [default: 8, or the
    /// --prompt file's].
    #[arg(long, value_name = "P")]
    prompt_len: Option<usize>,
    /// prompt-tune: start from the embeddings of the data's first P token ids, or random
    /// [default: data].
    #[arg(long, value_enum, conflicts_with_all = ["prompt", "resume"])]
    prompt_init: Option<PromptInit>,
    /// prompt-tune: start from the prompt vectors of this file (a `prompt.safetensors` written by
    /// an earlier run) instead of --prompt-init.
    #[arg(long, value_name = "PATH", conflicts_with = "resume")]
    prompt: Option<PathBuf>,
    /// Peak AdamW learning rate [default: 1e-3].
    #[arg(long, allow_hyphen_values = true)]
    lr: Option<f64>,
    /// Steps of linear warm-up before the cosine decay (a run of no more steps than this ends
    /// during warm-up, with a warning) [default: 0].
    #[arg(long, value_name = "N")]
    warmup: Option<u64>,
    /// The machine: wse2, wse3, WxH, or a .toml/.json file (with --resume: the run's own, which
    /// its state holds).
    #[arg(long, value_name = "FABRIC", required_unless_present = "resume")]
    fabric: Option<String>,
    /// How cycles are obtained (fast: the loss and gradients come from the CPU reference)
    /// [default: exact].
    #[arg(long, value_enum)]
    fidelity: Option<super::gemm::FidelityArg>,
    /// Storage precision of activations and streamed weights in the matmuls (the weights and
    /// AdamW's state stay f32 on the host) [default: fp32].
    #[arg(long, value_enum)]
    dtype: Option<super::gemm::DtypeArg>,
    /// Loss scaling of the exact steps' backward pass: a power of two for every step (auto or L,
    /// as `wafersim step --loss-scale`), or dynamic (from auto's value, or from L): an
    /// overflowing step is skipped and the scale halved, and it doubles after
    /// --loss-scale-window clean steps [default: auto].
    #[arg(long, value_name = "auto|L|dynamic|dynamic:L", value_parser = scaling::ScaleSetting::parse)]
    loss_scale: Option<scaling::ScaleSetting>,
    /// With --loss-scale dynamic: clean steps after which the scale doubles [default: 50].
    #[arg(long, value_name = "W")]
    loss_scale_window: Option<u64>,
    /// Seed of the initial weights, the masks and the batch order [default: 0].
    #[arg(long)]
    seed: Option<u64>,
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
    let settings = &setup.run;
    if let Some(warning) = super::unvalidated_timing_warning(&settings.fabric, settings.fidelity) {
        eprintln!("{warning}");
    }
    let schedule = settings.schedule();
    if let Some(warning) = warm_up_warning(&schedule) {
        eprintln!("{warning}");
    }
    let (mut trainer, mut sampler, mut log) = match &setup.resumed {
        Some(resumed) => resumed.continue_run(&setup, schedule)?,
        None => {
            let (params, masks) = load_weights(&args, &setup)?;
            let trainer = new_trainer(&args, &setup, params, masks, schedule)?;
            let sampler = Sampler::new(&setup.corpus, settings.batch, settings.seed);
            (trainer, sampler, Vec::new())
        }
    };
    let stop = stop_flag();
    let shape = RunShape {
        config: &setup.config,
        fabric: &settings.fabric,
        plan: &setup.plan,
        fidelity: settings.fidelity,
        loss_scale: settings.loss_scale.fixed(),
    };
    if settings.fidelity == Fidelity::Exact {
        announce_long_exact_run(&trainer, shape, &setup);
    }
    let started = Instant::now();
    let savings = prompt_savings(&trainer, shape, &setup)?;
    let mut saved = earlier_saves(&args.out, setup.resumed.as_ref());
    while trainer.steps < settings.steps && !stop.load(Ordering::SeqCst) {
        let batch = sampler
            .next_batch(&setup.corpus, &setup.config)
            .map_err(|e| bad_input(format!("--tokens {}", args.tokens.display()), e))?;
        let checked_before = trainer.first_check.is_some();
        let record = trainer.step(shape, &batch)?;
        eprintln!(
            "step {}/{}: loss {:.4}, lr {:.3e}, {} cycles{}",
            record.step,
            settings.steps,
            record.loss,
            record.lr,
            record.cycles,
            scaling::progress_note(&record, &trainer)
        );
        log.push(record);
        if let (false, Some(check)) = (checked_before, &trainer.first_check) {
            eprintln!("step {} {}", record.step, checked::summary(check));
            if let Some(warning) = checked::warning(check, setup.plan.precision) {
                eprintln!("{warning}");
            }
        }
        if saves_at(&args, settings.steps, record.step) {
            let dir = args.out.join(step_dir(record.step));
            let mut run = Finished::new(&setup, &args, &trainer, &log, started, false);
            run.savings = savings.clone();
            run.batches_drawn = sampler.drawn();
            write_outputs(&args.out, &dir, &run)?;
            saved.push(record.step);
        }
    }
    let interrupted = trainer.steps < settings.steps;
    let mut run = Finished::new(&setup, &args, &trainer, &log, started, interrupted);
    run.savings = savings;
    run.batches_drawn = sampler.drawn();
    // The files first: a terminal or pipe that goes away while the summary prints loses nothing.
    write_outputs(&args.out, &args.out.join(CHECKPOINT_DIR), &run)?;
    note_stale_outputs(&args.out, settings.phase, &saved);
    print_summary(&run)?;
    Ok(())
}

/// Says on stderr when the run's remaining exact steps will take long, from the fast fidelity's
/// count of one step's cycles (the tokens do not change it). Says nothing if the step cannot be
/// costed: the first step reports why.
fn announce_long_exact_run(trainer: &Trainer, shape: RunShape<'_>, setup: &Setup) {
    let (batch, seq) = (setup.run.batch, setup.run.seq);
    let Ok(tokens) = Batch::new(&setup.config, batch, seq, vec![0; batch * seq]) else {
        return;
    };
    let fast = RunShape {
        fidelity: Fidelity::Fast,
        ..shape
    };
    let Ok(step) = trainer.cost(fast, &tokens) else {
        return;
    };
    let steps = setup.run.steps.saturating_sub(trainer.steps);
    let what = format!("the exact run ({steps} steps)");
    let cycles = step.cycles().saturating_mul(steps);
    let pes = setup.plan.region.pes();
    if let Some(note) = exact_cost::long_run_note(&what, cycles, pes) {
        eprintln!("{note}");
    }
}

/// A new run's trainer: the phase's, with prompt vectors for prompt tuning.
fn new_trainer(
    args: &Args,
    setup: &Setup,
    params: GptParams,
    masks: ModelMasks,
    schedule: LrSchedule,
) -> anyhow::Result<Trainer> {
    let auto = LossScale::Auto.exponent_of_step(&setup.plan, setup.prompt_len);
    let dynamic_scale = setup
        .run
        .loss_scale
        .start(auto, setup.run.loss_scale_window)
        .map_err(|e| bad_input("--loss-scale-window", anyhow::anyhow!(e)))?;
    if setup.run.phase != TrainPhase::PromptTune {
        let mut trainer = Trainer::new(setup.run.phase, params, masks, schedule);
        trainer.dynamic_scale = dynamic_scale;
        return Ok(trainer);
    }
    let prompt = match &setup.prompt_file {
        Some(vectors) => vectors.clone(),
        None => super::prompt::initial_prompt(
            args.prompt_init == Some(PromptInit::Random),
            &setup.corpus,
            &params,
            setup.prompt_len,
            setup.run.seed,
        )?,
    };
    let mut trainer = Trainer::prompt_tuning(params, masks, prompt, schedule);
    trainer.dynamic_scale = dynamic_scale;
    Ok(trainer)
}

/// Whether `--save-every` writes `step-{step}/` in a run of `steps` steps: every K steps, but
/// not at the last, whose checkpoint is `checkpoint/`.
fn saves_at(args: &Args, steps: u64, step: u64) -> bool {
    args.save_every.is_some_and(|k| step.is_multiple_of(k)) && step < steps
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

/// The files a checkpoint folder of this phase receives: the model, the run's state and, for
/// prompt tuning, the prompt.
fn checkpoint_files(phase: TrainPhase) -> Vec<&'static str> {
    let mut names = vec![WEIGHTS_FILE, CONFIG_FILE, STATE_JSON, STATE_TENSORS];
    if phase == TrainPhase::PromptTune {
        names.push(PROMPT_FILE);
    }
    names
}

/// Every path the run will write, checked before it starts (see [`guard`]): the logs and, for
/// prompt tuning, the prompt in `--out`; `checkpoint/` and the `step-K/` folders `--save-every`
/// will write, with their files. A `step-K/` that does not exist yet needs nothing more than
/// `--out`; one that does is checked as `checkpoint/` is.
fn check_outputs(args: &Args, run: &Settings) -> anyhow::Result<()> {
    let mut logs = LOG_FILES.to_vec();
    if run.phase == TrainPhase::PromptTune {
        logs.push(PROMPT_FILE);
    }
    guard::check_output_folder("--out", &args.out, &logs)?;
    let files = checkpoint_files(run.phase);
    guard::check_output_subfolder("--out", &args.out, CHECKPOINT_DIR, &files)?;
    for (step, dir) in step_dirs(&args.out) {
        if saves_at(args, run.steps, step) {
            guard::check_output_folder("--out", &dir, &files)?;
        }
    }
    Ok(())
}

/// The `step-K/` folders in `out` that the run `--resume` continues wrote before it stopped,
/// when it is resumed in place (its checkpoint folder lies in `out`): those up to its step.
fn earlier_saves(out: &Path, resumed: Option<&Resumed>) -> Vec<u64> {
    let Some(resumed) = resumed else {
        return Vec::new();
    };
    let parent = match resumed.dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !guard::same_folder(parent, out) {
        return Vec::new();
    }
    let done = resumed.state.steps_done;
    step_dirs(out)
        .into_iter()
        .map(|(step, _)| step)
        .filter(|&step| step <= done)
        .collect()
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
) -> anyhow::Result<Option<Value>> {
    if setup.run.phase != TrainPhase::PromptTune {
        return Ok(None);
    }
    let batch = Sampler::new(&setup.corpus, setup.run.batch, setup.run.seed)
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

/// The peak learning rate of a new run without `--lr`.
const DEFAULT_LR: f64 = 1e-3;

/// What defines a run: a new run's flags with their defaults, or the state of the run `--resume`
/// continues.
struct Settings {
    phase: TrainPhase,
    /// The run's total steps.
    steps: u64,
    batch: usize,
    seq: usize,
    lr: f64,
    warmup: u64,
    fidelity: Fidelity,
    precision: Precision,
    loss_scale: scaling::ScaleSetting,
    /// With a dynamic scale: `--loss-scale-window` (`None`: the default).
    loss_scale_window: Option<u64>,
    seed: u64,
    fabric: FabricConfig,
}

impl Settings {
    /// A new run's settings: the flags, defaults where absent.
    fn from_flags(args: &Args) -> anyhow::Result<Self> {
        let required =
            |flag: &str| bad_input(flag, anyhow::anyhow!("is required without --resume"));
        let fabric = args.fabric.as_deref().ok_or_else(|| required("--fabric"))?;
        Ok(Self {
            phase: args.phase.ok_or_else(|| required("--phase"))?.phase(),
            steps: args.steps.ok_or_else(|| required("--steps"))?,
            batch: args.batch.ok_or_else(|| required("--batch"))?,
            seq: args.seq.ok_or_else(|| required("--seq"))?,
            lr: args.lr.unwrap_or(DEFAULT_LR),
            warmup: args.warmup.unwrap_or(0),
            fidelity: args.fidelity.map_or(Fidelity::Exact, |f| f.fidelity()),
            precision: args.dtype.map_or(Precision::F32, |d| d.precision()),
            loss_scale: args
                .loss_scale
                .unwrap_or(scaling::ScaleSetting::Fixed(LossScale::Auto)),
            loss_scale_window: args.loss_scale_window,
            seed: args.seed.unwrap_or(0),
            fabric: load_fabric(fabric)?,
        })
    }

    /// The settings of the run `state` (in `dir`) records; every flag given must agree.
    fn from_state(state: &TrainState, dir: &Path, args: &Args) -> anyhow::Result<Self> {
        let path = dir.join(STATE_JSON);
        let resume = || format!("--resume {}", dir.display());
        let field = |field: &'static str, got: &str, reason: &str| {
            bad_input(
                resume(),
                state::StateError::Field {
                    path: path.clone(),
                    field,
                    got: format!("{got:?}"),
                    reason: reason.into(),
                },
            )
        };
        let phase = state
            .train_phase(&path)
            .map_err(|e| bad_input(resume(), e))?;
        let fidelity = match state.fidelity.as_str() {
            "exact" => Fidelity::Exact,
            "fast" => Fidelity::Fast,
            other => return Err(field("fidelity", other, "expected exact or fast")),
        };
        let precision = match state.dtype.as_str() {
            "fp32" => Precision::F32,
            "fp16" => Precision::F16,
            other => return Err(field("dtype", other, "expected fp32 or fp16")),
        };
        let loss_scale = scaling::ScaleSetting::parse(&state.loss_scale)
            .map_err(|reason| field("loss_scale", &state.loss_scale, &reason))?;
        let window = match (loss_scale.is_dynamic(), &state.dynamic_loss_scale) {
            (true, Some(dynamic)) => Some(dynamic.window),
            (false, None) => None,
            (true, None) => {
                let why =
                    "a dynamic scale needs `dynamic_loss_scale` (its window, scale and count)";
                return Err(field("loss_scale", &state.loss_scale, why));
            }
            (false, Some(_)) => {
                let why = "`dynamic_loss_scale` is there, but the scale is not dynamic";
                return Err(field("loss_scale", &state.loss_scale, why));
            }
        };
        state.fabric.validate().map_err(|e| {
            let what = format!("{}: `fabric`", path.display());
            bad_input(resume(), anyhow::Error::new(e).context(what))
        })?;
        let settings = Self {
            phase,
            steps: state.schedule.total,
            batch: state.batch,
            seq: state.seq,
            lr: state.schedule.peak,
            warmup: state.schedule.warmup,
            fidelity,
            precision,
            loss_scale,
            loss_scale_window: window,
            seed: state.seed,
            fabric: state.fabric.clone(),
        };
        settings.check_agrees(args, &path)?;
        Ok(settings)
    }

    /// Every run-defining flag given with `--resume` has the run's value (`path`: its state).
    fn check_agrees(&self, args: &Args, path: &Path) -> anyhow::Result<()> {
        let state = path.display();
        if let Some(steps) = args.steps.filter(|&s| s != self.steps) {
            return Err(bad_input(
                "--steps",
                anyhow::anyhow!(
                    "{steps}, but the resumed run has {} steps in all ({state}): --steps is the run's total, on which its cosine decay ends; a longer run would change the rates of the steps already taken (start a new run with --checkpoint to train on)",
                    self.steps
                ),
            ));
        }
        let name = |p: TrainPhase| p.name();
        agree(
            "--phase",
            args.phase.map(|p| name(p.phase())),
            name(self.phase),
            path,
        )?;
        agree("--batch", args.batch, self.batch, path)?;
        agree("--seq", args.seq, self.seq, path)?;
        agree("--lr", args.lr, self.lr, path)?;
        agree("--warmup", args.warmup, self.warmup, path)?;
        agree("--seed", args.seed, self.seed, path)?;
        let fidelity = args.fidelity.map(|f| f.fidelity().name());
        agree("--fidelity", fidelity, self.fidelity.name(), path)?;
        let dtype = args.dtype.map(|d| d.precision().name());
        agree("--dtype", dtype, self.precision.name(), path)?;
        let scale = args.loss_scale.map(scaling::ScaleSetting::text);
        agree("--loss-scale", scale, self.loss_scale.text(), path)?;
        if let Some(window) = self.loss_scale_window {
            agree("--loss-scale-window", args.loss_scale_window, window, path)?;
        }
        if let Some(spec) = &args.fabric
            && load_fabric(spec)? != self.fabric
        {
            return Err(bad_input(
                "--fabric",
                anyhow::anyhow!(
                    "{spec} is not the resumed run's fabric, whose config {state} holds; omit --fabric"
                ),
            ));
        }
        Ok(())
    }

    fn schedule(&self) -> LrSchedule {
        LrSchedule {
            peak: self.lr,
            warmup: self.warmup,
            total: self.steps,
        }
    }
}

/// A flag given with `--resume` (`given`) has the resumed run's value (`saved`, from the state
/// file `path`).
fn agree<T: PartialEq + std::fmt::Display>(
    flag: &str,
    given: Option<T>,
    saved: T,
    path: &Path,
) -> anyhow::Result<()> {
    match given {
        Some(given) if given != saved => Err(bad_input(
            flag,
            anyhow::anyhow!(
                "{given} contradicts the resumed run's {saved} ({}); omit it or give the same",
                path.display()
            ),
        )),
        _ => Ok(()),
    }
}

/// The run `--resume` continues: its checkpoint folder and state.
struct Resumed {
    dir: PathBuf,
    state: TrainState,
}

impl Resumed {
    fn flag(&self) -> String {
        format!("--resume {}", self.dir.display())
    }

    /// Reads the state of the checkpoint `dir` and checks it is consistent and not finished.
    fn read(dir: &Path) -> anyhow::Result<Self> {
        let flag = || format!("--resume {}", dir.display());
        let state = TrainState::read(dir).map_err(|e| bad_input(flag(), e))?;
        let path = dir.join(STATE_JSON);
        let done = state.steps_done;
        let steps: Vec<u64> = state.log.iter().map(|r| r.step).collect();
        let skipped = state.log.iter().filter(|r| r.skipped).count() as u64;
        let inconsistent = state.sampler.batches_drawn != done
            || state.optimizer.t.checked_add(skipped) != Some(done)
            || state.sampler.seed != state.seed
            || steps != (1..=done).collect::<Vec<u64>>();
        if inconsistent {
            return Err(bad_input(
                flag(),
                anyhow::anyhow!(
                    "{}: steps_done {done}, sampler.batches_drawn {}, optimizer.t {} (+ {skipped} skipped) and the log's {} steps do not agree (and sampler.seed must be seed)",
                    path.display(),
                    state.sampler.batches_drawn,
                    state.optimizer.t,
                    steps.len()
                ),
            ));
        }
        check_optimizer(&state.optimizer, &path).map_err(|e| bad_input(flag(), e))?;
        if done >= state.schedule.total {
            return Err(bad_input(
                flag(),
                anyhow::anyhow!(
                    "the run is complete ({done} of {} steps, {}): nothing to resume (start a new run with --checkpoint to train on)",
                    state.schedule.total,
                    path.display()
                ),
            ));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            state,
        })
    }

    /// The trainer, sampler and log of the run as they were after its last step: the weights,
    /// the prompt, the moments and the masks of the checkpoint.
    fn continue_run(
        &self,
        setup: &Setup,
        schedule: LrSchedule,
    ) -> anyhow::Result<(Trainer, Sampler, Vec<StepRecord>)> {
        let mut params = self.weights(&setup.config)?;
        let mut tensors = self.tensors(setup)?;
        let masks = match setup.run.phase {
            TrainPhase::SparsePretrain => {
                let layers = tensors.masks.take().unwrap_or_default();
                ModelMasks::from_layers(self.state.sparsity, layers)
            }
            TrainPhase::DenseFinetune => ModelMasks::dense(&setup.config),
            // The model is frozen: its zeros are the masks they were.
            TrainPhase::PromptTune => ModelMasks::from_params_zeros(&params),
        };
        masks
            .apply(&mut params)
            .map_err(|e| bad_input(self.flag(), e))?;
        let prompt = match (&setup.prompt_file, tensors.prompt_moments) {
            (Some(vectors), Some((m, v))) => PromptVectors::with_moments(vectors.clone(), m, v),
            _ => None,
        };
        if setup.run.phase == TrainPhase::PromptTune && prompt.is_none() {
            let why = "the prompt vectors and their moments differ in size";
            return Err(bad_input(self.flag(), anyhow::anyhow!(why)));
        }
        let mut trainer = Trainer::resume(
            setup.run.phase,
            params,
            masks,
            schedule,
            tensors.moments,
            prompt,
            self.state.steps_done,
        )
        .with_updates(self.state.optimizer.t);
        let path = self.dir.join(STATE_JSON);
        trainer.dynamic_scale = match &self.state.dynamic_loss_scale {
            Some(dynamic) => Some(
                dynamic
                    .to_scale(&path)
                    .map_err(|e| bad_input(self.flag(), e))?,
            ),
            None => None,
        };
        let mut sampler = Sampler::new(&setup.corpus, setup.run.batch, setup.run.seed);
        sampler.skip(self.state.sampler.batches_drawn);
        Ok((trainer, sampler, self.log(setup)))
    }

    /// The run's log so far; rows of a state written before the log had scales get the run's
    /// fixed scale (at the exact fidelity), which those steps ran with.
    fn log(&self, setup: &Setup) -> Vec<StepRecord> {
        let mut log = self.state.log.clone();
        let fixed = match setup.run.loss_scale {
            scaling::ScaleSetting::Fixed(scale) if setup.run.fidelity == Fidelity::Exact => {
                f64::from(scale.of_step(&setup.plan, setup.prompt_len))
            }
            _ => return log,
        };
        for record in log.iter_mut().filter(|r| r.loss_scale.is_none()) {
            record.loss_scale = Some(fixed);
        }
        log
    }

    /// The bytes of the checkpoint's file `name`, with its path.
    fn read_file(&self, name: &str) -> anyhow::Result<(PathBuf, Vec<u8>)> {
        let path = self.dir.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => Ok((path, bytes)),
            Err(source) => Err(bad_input(
                self.flag(),
                state::StateError::Read { path, source },
            )),
        }
    }

    /// The checkpoint's weights, whose bytes must be those the state digested (a state written
    /// before the digest existed has none to compare).
    fn weights(&self, config: &GptConfig) -> anyhow::Result<GptParams> {
        let (path, bytes) = self.read_file(WEIGHTS_FILE)?;
        let digest = state::digest_text(state::bytes_digest(&bytes));
        if let Some(saved) = self.state.weights_digest.as_ref().filter(|d| **d != digest) {
            return Err(bad_input(
                self.flag(),
                anyhow::anyhow!(
                    "{}: digest {digest}, but the run's state was written with weights of digest {saved} ({}): the weights file was replaced; resume from the run's own checkpoint, or start a new run from these weights with --checkpoint",
                    path.display(),
                    self.dir.join(STATE_JSON).display()
                ),
            ));
        }
        crate::model::checkpoint::params_from_safetensors(&path, &bytes, config)
            .map_err(|e| bad_input(self.flag(), e))
    }

    /// The moments (and masks) of `train_state.safetensors`, checked against the model.
    fn tensors(&self, setup: &Setup) -> anyhow::Result<StateTensors> {
        let (path, bytes) = self.read_file(STATE_TENSORS)?;
        state::read_state_tensors(
            &path,
            &bytes,
            &setup.config,
            setup.run.phase,
            setup.prompt_len,
        )
        .map_err(|e| bad_input(self.flag(), e))
    }

    /// The token file is the run's: the same digest.
    fn check_corpus(&self, corpus: &Corpus, tokens: &Path) -> anyhow::Result<()> {
        let digest = state::digest_text(corpus.digest());
        if digest == self.state.tokens.digest {
            return Ok(());
        }
        Err(bad_input(
            format!("--tokens {}", tokens.display()),
            anyhow::anyhow!(
                "not the resumed run's token file: digest {digest}, {} windows, but the run read {} ({} windows; {})",
                corpus.windows(),
                self.state.tokens.digest,
                self.state.tokens.windows,
                self.dir.join(STATE_JSON).display()
            ),
        ))
    }
}

/// The optimizer the state names is the one `train` runs: AdamW with its fixed settings.
fn check_optimizer(saved: &OptimizerState, path: &Path) -> Result<(), state::StateError> {
    let ours = AdamW::new(DEFAULT_LR);
    let fields = [
        ("optimizer.beta1", saved.beta1, ours.beta1),
        ("optimizer.beta2", saved.beta2, ours.beta2),
        ("optimizer.eps", saved.eps, ours.eps),
        (
            "optimizer.weight_decay",
            saved.weight_decay,
            ours.weight_decay,
        ),
    ];
    let bad = fields.iter().find(|(_, got, want)| got != want);
    match (saved.name.as_str(), bad) {
        ("AdamW", None) => Ok(()),
        (name, None) => Err(state::StateError::Field {
            path: path.to_path_buf(),
            field: "optimizer.name",
            got: format!("{name:?}"),
            reason: "expected \"AdamW\"".into(),
        }),
        (_, Some(&(field, got, want))) => Err(state::StateError::Field {
            path: path.to_path_buf(),
            field,
            got: got.to_string(),
            reason: format!("train runs AdamW with {want}"),
        }),
    }
}

/// Everything checked before any weight is drawn or read and before the output folder exists.
struct Setup {
    run: Settings,
    config: GptConfig,
    corpus: Corpus,
    plan: StepPlan,
    /// Prompt vectors in front of every sequence (0 outside prompt-tune).
    prompt_len: usize,
    /// The vectors of `--prompt` (or of the resumed checkpoint), read once.
    prompt_file: Option<Matrix>,
    /// The run `--resume` continues.
    resumed: Option<Resumed>,
}

impl Setup {
    fn check(args: &Args) -> anyhow::Result<Self> {
        let resumed = args.resume.as_deref().map(Resumed::read).transpose()?;
        let run = match &resumed {
            Some(r) => Settings::from_state(&r.state, &r.dir, args)?,
            None => Settings::from_flags(args)?,
        };
        let config = load_config(args)?;
        check_flags(args, &run)?;
        guard::check_batch_shape("--batch/--seq", &config, run.batch, run.seq)?;
        let corpus = read_corpus(&args.tokens, run.seq, &config)?;
        if let Some(r) = &resumed {
            r.check_corpus(&corpus, &args.tokens)?;
        }
        let prompt_file = match (&resumed, &args.prompt) {
            (Some(r), _) if run.phase == TrainPhase::PromptTune => {
                let path = r.dir.join(PROMPT_FILE);
                Some(super::prompt::read_prompt_for(
                    &r.flag(),
                    &path,
                    config.n_embd,
                )?)
            }
            (None, Some(path)) => Some(super::prompt::read_prompt(path, config.n_embd)?),
            _ => None,
        };
        let prompt_len = match (&resumed, run.phase) {
            (_, TrainPhase::SparsePretrain | TrainPhase::DenseFinetune) => 0,
            (Some(r), TrainPhase::PromptTune) => {
                resumed_prompt_len(r, args.prompt_len, prompt_file.as_ref())?
            }
            (None, TrainPhase::PromptTune) => prompt_len(args.prompt_len, prompt_file.as_ref())?,
        };
        let positions = run.seq.saturating_add(prompt_len);
        let what = "--seq + the prompt's vectors";
        guard::check_batch_shape(what, &config, run.batch, positions)?;
        let plan = plan_step(&config, run.batch, positions, &run.fabric, run.precision)
            .map_err(guard::plan_error)?;
        let attention = AttentionFit::of(&config, &plan, &run.fabric);
        attention.refuse_if_exact(run.fidelity)?;
        if run.fidelity == Fidelity::Exact {
            // Kept weights: what a new sparse pre-training draws, every weight when fine-tuning
            // dense, none counted where the masks come from the weights' zeros.
            let kept_weights = match (run.phase, args.sparsity) {
                (TrainPhase::SparsePretrain, Some(s)) => exact_cost::kept_weights(&config, s),
                (TrainPhase::DenseFinetune, _) => exact_cost::kept_weights(&config, 0.0),
                _ => 0,
            };
            ExactRun {
                config: &config,
                kept_weights,
                pes: plan.region.pes(),
                checked: true,
                optimizer: true,
            }
            .check_memory()?;
        }
        if let Some(warning) = attention.warning() {
            eprintln!("{warning}");
        }
        check_outputs(args, &run)?;
        Ok(Setup {
            run,
            config,
            corpus,
            plan,
            prompt_len,
            prompt_file,
            resumed,
        })
    }
}

/// The prompt length of a resumed prompt-tuning run: the state's, which the checkpoint's
/// prompt file and `--prompt-len` (if given) must match.
fn resumed_prompt_len(
    resumed: &Resumed,
    given: Option<usize>,
    file: Option<&Matrix>,
) -> anyhow::Result<usize> {
    let saved = resumed.state.prompt_len;
    let rows = file.map_or(0, |m| m.rows);
    if rows != saved {
        return Err(bad_input(
            resumed.flag(),
            anyhow::anyhow!(
                "{} holds {rows} prompt vectors but {} says {saved}",
                resumed.dir.join(PROMPT_FILE).display(),
                resumed.dir.join(STATE_JSON).display()
            ),
        ));
    }
    match given {
        Some(given) if given != saved => Err(bad_input(
            "--prompt-len",
            anyhow::anyhow!(
                "{given} contradicts the resumed run's {saved} ({}); omit it or give the same",
                resumed.dir.join(STATE_JSON).display()
            ),
        )),
        _ => Ok(saved),
    }
}

fn check_flags(args: &Args, run: &Settings) -> anyhow::Result<()> {
    let phase = run.phase;
    if run.steps == 0 {
        return Err(bad_input("--steps", anyhow::anyhow!("must be at least 1")));
    }
    if args.save_every == Some(0) {
        return Err(bad_input(
            "--save-every",
            anyhow::anyhow!("must be at least 1"),
        ));
    }
    if args.loss_scale_window.is_some() && !run.loss_scale.is_dynamic() {
        return Err(bad_input(
            "--loss-scale-window",
            anyhow::anyhow!(
                "only --loss-scale dynamic has a window (the run's scale is {})",
                run.loss_scale.text()
            ),
        ));
    }
    if args.loss_scale_window == Some(0) {
        return Err(bad_input(
            "--loss-scale-window",
            anyhow::anyhow!("must be at least 1"),
        ));
    }
    AdamW::new(run.lr)
        .validate()
        .map_err(|e| bad_input("--lr", e))?;
    match (phase, args.sparsity) {
        (TrainPhase::SparsePretrain, Some(s)) => {
            sparsity::validate(s).map_err(|e| bad_input("--sparsity", e))?;
        }
        (TrainPhase::SparsePretrain, None)
            if args.checkpoint.is_none() && args.resume.is_none() =>
        {
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
    if let Some(dir) = &args.resume {
        let flag = format!("--resume {}", dir.display());
        return read_config(&dir.join(CONFIG_FILE)).map_err(|e| bad_input(flag, e));
    }
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

/// A new run's starting weights (pruned entries zeroed) and the masks of the phase.
fn load_weights(args: &Args, setup: &Setup) -> anyhow::Result<(GptParams, ModelMasks)> {
    let config = &setup.config;
    let seed = setup.run.seed;
    let mut params = match &args.checkpoint {
        Some(dir) => read_params(&dir.join(WEIGHTS_FILE), config)
            .map_err(|e| bad_input("--checkpoint", e))?,
        None => guard::seeded_params(config, seed)?,
    };
    let masks = match (setup.run.phase, args.sparsity) {
        (TrainPhase::SparsePretrain, Some(s)) => {
            if args.checkpoint.is_some() {
                guard::note_new_masks_over_zeros(&params, " (omit --sparsity to keep them)");
            }
            ModelMasks::random(config, s, seed).map_err(|e| bad_input("--sparsity", e))?
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
    /// Batches the sampler has drawn (a resumed run replays them).
    batches_drawn: u64,
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
            batches_drawn: trainer.steps,
        }
    }

    fn total_flops(&self) -> u64 {
        self.log.iter().map(|r| r.flops).sum()
    }

    fn total_cycles(&self) -> u64 {
        self.log.iter().map(|r| r.cycles).sum()
    }

    /// The power of two the exact steps scaled their loss by: the fixed one, or with dynamic
    /// scaling the run's first step's (its start) (`None`: fast fidelity).
    fn loss_scale(&self) -> Option<f32> {
        let setup = self.setup;
        if setup.run.fidelity != Fidelity::Exact {
            return None;
        }
        let first = self.log.first().and_then(|r| r.loss_scale);
        let current = self.trainer.dynamic_scale.map(|d| d.scale());
        match setup.run.loss_scale {
            scaling::ScaleSetting::Dynamic { .. } => first.or(current).map(|s| s as f32),
            scaling::ScaleSetting::Fixed(scale) => {
                Some(scale.of_step(&setup.plan, setup.prompt_len))
            }
        }
    }

    fn skipped_steps(&self) -> u64 {
        self.log.iter().filter(|r| r.skipped).count() as u64
    }

    fn seconds(&self) -> f64 {
        self.total_cycles() as f64 / (f64::from(self.setup.run.fabric.clock_mhz) * 1e6)
    }

    /// The first step's reference check as JSON: this run's, or the resumed run's.
    fn reference_check(&self) -> Option<Value> {
        let resumed = self.setup.resumed.as_ref();
        match &self.trainer.first_check {
            Some(check) => Some(checked::json(check)),
            None => resumed.and_then(|r| r.state.reference_check.clone()),
        }
    }

    /// The run's state after its last step, for `--resume`; `weights_digest` is that of the
    /// `model.safetensors` written beside it.
    fn train_state(&self, weights_digest: u64) -> TrainState {
        let (setup, trainer) = (self.setup, self.trainer);
        let run = &setup.run;
        let adam = AdamW::new(run.lr);
        TrainState {
            schema: state::SCHEMA.into(),
            phase: run.phase.name().into(),
            steps_done: trainer.steps,
            schedule: ScheduleState {
                peak: run.lr,
                warmup: run.warmup,
                total: run.steps,
            },
            batch: run.batch,
            seq: run.seq,
            seed: run.seed,
            sampler: SamplerState {
                seed: run.seed,
                batches_drawn: self.batches_drawn,
            },
            tokens: TokensState {
                digest: state::digest_text(setup.corpus.digest()),
                windows: setup.corpus.windows(),
                tokens: setup.corpus.tokens(),
            },
            weights_digest: Some(state::digest_text(weights_digest)),
            fidelity: run.fidelity.name().into(),
            dtype: run.precision.name().into(),
            loss_scale: run.loss_scale.text(),
            dynamic_loss_scale: trainer
                .dynamic_scale
                .as_ref()
                .map(state::DynamicScaleState::of),
            fabric: run.fabric.clone(),
            prompt_len: setup.prompt_len,
            sparsity: trainer.masks.sparsity(),
            optimizer: OptimizerState {
                name: "AdamW".into(),
                beta1: adam.beta1,
                beta2: adam.beta2,
                eps: adam.eps,
                weight_decay: adam.weight_decay,
                t: trainer.updates(),
            },
            log: self.log.to_vec(),
            reference_check: self.reference_check(),
        }
    }
}

fn print_summary(run: &Finished<'_>) -> anyhow::Result<()> {
    let (first, last) = (run.log.first(), run.log.last());
    let loss = |r: Option<&StepRecord>| r.map_or(f64::NAN, |r| r.loss);
    let skipped = match run.skipped_steps() {
        0 if !run.setup.run.loss_scale.is_dynamic() => String::new(),
        n => format!(" ({n} skipped by dynamic loss scaling)"),
    };
    outln!(
        "{}, {} fidelity, {}: {} of {} steps{skipped}{}, loss {:.4} -> {:.4} (ln vocab {:.4})",
        run.setup.run.phase.name(),
        run.setup.run.fidelity.name(),
        dtype_label(run),
        run.log.len(),
        run.setup.run.steps,
        if run.interrupted {
            " (interrupted)"
        } else {
            ""
        },
        loss(first),
        loss(last),
        (run.setup.config.vocab_size as f64).ln()
    )?;
    let counted = match run.setup.run.fidelity {
        crate::runtime::Fidelity::Exact => "executed",
        crate::runtime::Fidelity::Fast => "counted",
    };
    outln!(
        "matmul FLOPs {counted} {}, cycles {} ({:.6} s at {} MHz), host wall {:.1} s",
        run.total_flops(),
        run.total_cycles(),
        run.seconds(),
        run.setup.run.fabric.clock_mhz,
        run.wall
    )?;
    Ok(())
}

/// The summary's dtype and loss scale: the fixed scale, or a dynamic one's first and next.
fn dtype_label(run: &Finished<'_>) -> String {
    let precision = run.setup.plan.precision;
    match (run.loss_scale(), run.trainer.dynamic_scale) {
        (Some(first), Some(next)) if run.setup.run.loss_scale.is_dynamic() => format!(
            "{} (dynamic loss scale {first} at the first step, {} next)",
            precision.name(),
            next.scale()
        ),
        (scale, _) => checked::dtype_label(precision, scale),
    }
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
    let weights_digest = staged_digest(&staged[0])?;
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
    staged.extend(stage_state(checkpoint, run, weights_digest)?);
    let [csv, json_file, svg] = LOG_FILES;
    staged.push(stage_text(&out.join(csv), &csv_text(run.log))?);
    let report = super::json_text(&report_json(run, checkpoint))?;
    staged.push(stage_text(&out.join(json_file), &report)?);
    staged.push(stage_text(
        &out.join(svg),
        &crate::plot::loss_svg(run.log, &format!("{} loss", run.setup.run.phase.name()))?,
    )?);
    Ok(staged)
}

/// The FNV-1a digest of a staged file's bytes (those its commit puts in place).
fn staged_digest(staged: &Staged) -> anyhow::Result<u64> {
    let reading = || format!("digesting {}", staged.target().display());
    let file = std::fs::File::open(staged.staged_path()).with_context(reading)?;
    state::reader_digest(std::io::BufReader::new(file)).with_context(reading)
}

/// The run's state (`train_state.json`, `train_state.safetensors`), staged in `checkpoint`.
fn stage_state(
    checkpoint: &Path,
    run: &Finished<'_>,
    weights_digest: u64,
) -> anyhow::Result<[Staged; 2]> {
    let json_path = checkpoint.join(STATE_JSON);
    let text = run
        .train_state(weights_digest)
        .to_json()
        .with_context(|| format!("writing {}", json_path.display()))?;
    let tensors_path = checkpoint.join(STATE_TENSORS);
    let bytes = state::state_tensor_bytes(run.trainer, &tensors_path)?;
    let tensors = stage_bytes(&tensors_path, &bytes)
        .with_context(|| format!("writing {}", tensors_path.display()))?;
    Ok([stage_text(&json_path, &text)?, tensors])
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

/// `step,loss,lr,flops,cycles,loss_scale,skipped`, one line per step (`loss_scale` empty at
/// the fast fidelity; `skipped` 1 for a step dynamic loss scaling skipped, else 0).
fn csv_text(log: &[StepRecord]) -> String {
    let mut text = String::from("step,loss,lr,flops,cycles,loss_scale,skipped\n");
    for r in log {
        text.push_str(&format!(
            "{},{},{},{},{},{},{}\n",
            r.step,
            r.loss,
            r.lr,
            r.flops,
            r.cycles,
            scaling::scale_field(r),
            u8::from(r.skipped)
        ));
    }
    text
}

fn report_json(run: &Finished<'_>, checkpoint: &Path) -> Value {
    let (setup, args, settings) = (run.setup, run.args, &run.setup.run);
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
            "reference_check": "the first applied (not skipped) step's loss and gradients against the CPU reference's (exact fidelity; null at the fast one)",
            "loss_scale": "the power of two the exact steps multiplied the loss by before their backward pass and divided the gradients by; with dynamic scaling the first step's (null: fast fidelity)",
            "loss_scaling": "policy fixed or dynamic; window: clean steps before the scale doubles; next_scale: the scale the next step would run with; clean_steps: clean steps counted towards the window; per_step: every step's scale (as train.csv's loss_scale); skipped_steps: the steps whose loss or gradients overflowed, not applied, their batches consumed, their cycles and FLOPs counted in the totals (null: fast fidelity)",
            "steps": "requested: the run's total; done: steps taken, skipped ones included; skipped: steps not applied (AdamW's step count is done - skipped)",
            "tokens_trained": "tokens of the applied steps' batches (a skipped step's batch is drawn but trains nothing)",
        },
        "phase": settings.phase.name(),
        "fidelity": settings.fidelity.name(),
        "model": super::model_json(c),
        "fabric": super::fabric_json(&settings.fabric),
        "region": { "cols": setup.plan.region.cols, "rows": setup.plan.region.rows },
        "batch": settings.batch, "seq": settings.seq, "seed": settings.seed,
        "dtype": setup.plan.precision.name(), "loss_scale": run.loss_scale(),
        "loss_scaling": scaling::report(settings.loss_scale, settings.fidelity == Fidelity::Exact, run.trainer, run.log),
        "sparsity": run.trainer.masks.sparsity(),
        "lr": { "peak": settings.lr, "warmup": settings.warmup, "schedule": "linear warm-up, cosine to peak/10" },
        "tokens_file": { "path": args.tokens.display().to_string(), "windows": setup.corpus.windows(), "tokens": setup.corpus.tokens() },
        "steps": { "requested": settings.steps, "done": steps, "skipped": run.skipped_steps() },
        "interrupted": run.interrupted,
        "resumed_from": setup.resumed.as_ref().map(|r| json!({
            "checkpoint": r.dir.display().to_string(), "step": r.state.steps_done,
        })),
        "tokens_trained": (steps - run.skipped_steps()) * (settings.batch * settings.seq) as u64,
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
        "reference_check": run.reference_check(),
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
    let weight_gradients = setup.run.phase != TrainPhase::PromptTune;
    Ok(report.of_step(weight_gradients).matmul_dense)
}
