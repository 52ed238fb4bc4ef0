//! Training runs of the recipe's phases against the CPU reference: the fabric's first steps give
//! the reference's losses and weights (the reference run of several steps, `reference::train_run`),
//! the loss goes down on a small repeated corpus, and each phase changes exactly the parameters
//! it should. Everything is the `tiny` preset on a small fabric.

use wafersim::compile::plan_step;
use wafersim::model::{GptConfig, GptParams, SparseKind, init_params};
use wafersim::reference::{self, Batch};
use wafersim::runtime::{Fidelity, LossScale};
use wafersim::sparsity::ModelMasks;
use wafersim::training::{Corpus, LrSchedule, RunShape, Sampler, TrainPhase, Trainer};
use wafersim_kernels::Precision;
use wafersim_sim::FabricConfig;

fn tiny() -> GptConfig {
    GptConfig::preset("tiny").unwrap()
}

/// A small repeated corpus: one English sentence as bytes, 12 times.
fn corpus(config: &GptConfig, seq: usize) -> Corpus {
    let text = "the quick brown fox jumps over the lazy dog. ".repeat(12);
    let ids: Vec<u32> = text.bytes().map(u32::from).collect();
    Corpus::from_sequences(&[ids], seq, config).unwrap()
}

fn sparse_start(config: &GptConfig, sparsity: f64) -> (GptParams, ModelMasks) {
    let mut params = init_params(config, 3);
    let masks = ModelMasks::random(config, sparsity, 5).unwrap();
    masks.apply(&mut params).unwrap();
    (params, masks)
}

fn norm(v: impl IntoIterator<Item = f64>) -> f64 {
    v.into_iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// `|got - want| / |want - start|` over every parameter: the error relative to the change the
/// steps made.
fn rel_to_update(got: &GptParams, want: &GptParams, start: &GptParams) -> f64 {
    let flat = |p: &GptParams| -> Vec<f64> {
        p.tensors()
            .iter()
            .flat_map(|(_, t)| t.iter().map(|v| f64::from(*v)))
            .collect()
    };
    let (g, w, s) = (flat(got), flat(want), flat(start));
    let diff = norm(g.iter().zip(&w).map(|(a, b)| a - b));
    let update = norm(w.iter().zip(&s).map(|(a, b)| a - b));
    diff / update
}

struct Run {
    losses: Vec<f64>,
    batches: Vec<Batch>,
    trainer: Trainer,
}

fn run(
    phase: TrainPhase,
    params: GptParams,
    masks: ModelMasks,
    steps: u64,
    fidelity: Fidelity,
    fabric: &FabricConfig,
) -> Run {
    let config = tiny();
    let (b, s) = (2, 16);
    let corpus = corpus(&config, s);
    let plan = plan_step(&config, b, s, fabric, Precision::F32).unwrap();
    let shape = RunShape {
        config: &config,
        fabric,
        plan: &plan,
        fidelity,
        loss_scale: LossScale::Auto,
    };
    let schedule = LrSchedule {
        peak: 3e-3,
        warmup: 2,
        total: steps,
    };
    let mut trainer = Trainer::new(phase, params, masks, schedule);
    let mut sampler = Sampler::new(&corpus, b, 11);
    let (mut losses, mut batches) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        let batch = sampler.next_batch(&corpus, &config).unwrap();
        losses.push(trainer.step(shape, &batch).unwrap().loss);
        batches.push(batch);
    }
    Run {
        losses,
        batches,
        trainer,
    }
}

#[test]
fn three_exact_sparse_steps_equal_the_reference_run() {
    let config = tiny();
    let fabric = FabricConfig::from_spec("4x4").unwrap();
    let (params, masks) = sparse_start(&config, 0.5);
    let got = run(
        TrainPhase::SparsePretrain,
        params.clone(),
        masks.clone(),
        3,
        Fidelity::Exact,
        &fabric,
    );
    let schedule = got.trainer.schedule;
    let lrs: Vec<f64> = (0..3).map(|s| schedule.at(s)).collect();
    let want = reference::train_run(&config, &params, &masks, &got.batches, &lrs).unwrap();
    for (step, (g, w)) in got.losses.iter().zip(&want.losses).enumerate() {
        let rel = (g - f64::from(*w)).abs() / f64::from(*w);
        eprintln!("step {step}: loss {g} vs reference {w} ({rel:.1e})");
        assert!(
            rel < 1e-5,
            "step {step}: loss {g} vs reference {w} ({rel:e})"
        );
    }
    // The trainer checked its first step against the reference too, and found the same loss.
    let check = got
        .trainer
        .first_check
        .as_ref()
        .expect("an exact run checks");
    let first = (got.losses[0] - f64::from(want.losses[0])).abs() / f64::from(want.losses[0]);
    assert!((check.loss_error - first).abs() <= 1e-9 * first.max(1e-12));
    assert!(check.within(), "{check:?}");
    // Adam divides by sqrt(v): f32 gradient rounding moves an update by far less than its size.
    let rel = rel_to_update(&got.trainer.params, &want.params, &params);
    eprintln!("weights after 3 steps: {rel:.1e} of the update");
    assert!(
        rel < 1e-3,
        "weights after 3 steps differ by {rel:e} of the update"
    );
    // Pruned weights stayed exactly zero on both sides.
    for (l, layer) in masks.layers().iter().enumerate() {
        for kind in SparseKind::ALL {
            let w = &got.trainer.params.blocks[l].linear(kind).weight.data;
            let keep = layer[kind.index()].keep();
            assert!(w.iter().zip(keep).all(|(v, k)| k || *v == 0.0));
        }
    }
}

#[test]
fn sparse_pretraining_lowers_the_loss_on_a_repeated_corpus() {
    let config = tiny();
    let fabric = FabricConfig::from_spec("4x4").unwrap();
    let (params, masks) = sparse_start(&config, 0.75);
    let r = run(
        TrainPhase::SparsePretrain,
        params,
        masks,
        30,
        Fidelity::Fast,
        &fabric,
    );
    let (first, last) = (r.losses[0], mean_last(&r.losses, 5));
    assert!(
        r.trainer.first_check.is_none(),
        "fast numerics are the reference's"
    );
    // ln 256 = 5.545 at the start; the sentence has 28 distinct bytes (ln 28 = 3.33).
    assert!(first > 5.3, "first loss {first}");
    assert!(last < 3.5, "loss {first} -> {last}");
}

fn mean_last(losses: &[f64], n: usize) -> f64 {
    losses[losses.len() - n..].iter().sum::<f64>() / n as f64
}

#[test]
fn a_dense_finetune_step_trains_the_pruned_weights_from_zero() {
    let config = tiny();
    let fabric = FabricConfig::from_spec("4x4").unwrap();
    let (params, masks) = sparse_start(&config, 0.5);
    let r = run(
        TrainPhase::DenseFinetune,
        params,
        ModelMasks::dense(&config),
        1,
        Fidelity::Exact,
        &fabric,
    );
    for (l, layer) in masks.layers().iter().enumerate() {
        for kind in SparseKind::ALL {
            let w = &r.trainer.params.blocks[l].linear(kind).weight.data;
            let keep = layer[kind.index()].keep();
            let pruned = keep.iter().filter(|k| !**k).count();
            let moved = w
                .iter()
                .zip(keep)
                .filter(|(v, k)| !*k && **v != 0.0)
                .count();
            // AdamW's first step moves every weight with a non-zero gradient by about lr.
            assert!(
                moved * 10 > pruned * 9,
                "layer {l} {kind:?}: {moved} of {pruned} pruned weights moved"
            );
        }
    }
    assert!(r.losses[0].is_finite());
}

#[test]
fn dense_finetuning_lowers_the_loss_further() {
    let config = tiny();
    let fabric = FabricConfig::from_spec("4x4").unwrap();
    let (params, masks) = sparse_start(&config, 0.75);
    let pre = run(
        TrainPhase::SparsePretrain,
        params,
        masks,
        30,
        Fidelity::Fast,
        &fabric,
    );
    let fine = run(
        TrainPhase::DenseFinetune,
        pre.trainer.params.clone(),
        ModelMasks::dense(&config),
        15,
        Fidelity::Fast,
        &fabric,
    );
    let before = mean_last(&pre.losses, 5);
    let after = mean_last(&fine.losses, 5);
    assert!(after < before, "dense fine-tuning: {before} -> {after}");
}

fn prompt_from_data(params: &GptParams, corpus: &Corpus, p: usize) -> wafersim::model::Matrix {
    let data = corpus
        .first_ids(p)
        .iter()
        .flat_map(|&id| params.wte.row(id as usize).to_vec())
        .collect();
    wafersim::model::Matrix {
        rows: p,
        cols: params.wte.cols,
        data,
    }
}

/// A prompt step's inputs: tiny at 50 %, 2 sequences of 12 tokens behind 4 prompt vectors (the
/// embeddings of the data's first ids), on 4 x 4 PEs.
struct PromptCase {
    config: GptConfig,
    fabric: FabricConfig,
    params: GptParams,
    masks: ModelMasks,
    prompt: wafersim::model::Matrix,
    plan: wafersim::compile::StepPlan,
    batch: Batch,
    /// `(sequences, tokens per sequence, prompt vectors)`.
    sizes: (usize, usize, usize),
}

fn prompt_case() -> PromptCase {
    let config = tiny();
    let fabric = FabricConfig::from_spec("4x4").unwrap();
    let (params, masks) = sparse_start(&config, 0.5);
    let (b, s, p) = (2, 12, 4);
    let corpus = corpus(&config, s);
    let prompt = prompt_from_data(&params, &corpus, p);
    let plan = plan_step(&config, b, s + p, &fabric, Precision::F32).unwrap();
    let batch = Sampler::new(&corpus, b, 1)
        .next_batch(&corpus, &config)
        .unwrap();
    PromptCase {
        config,
        fabric,
        params,
        masks,
        prompt,
        plan,
        batch,
        sizes: (b, s, p),
    }
}

/// Prompt tuning on the fabric: the loss and the prompt gradient equal the reference's, the
/// weight-gradient kernels do not run (their cycles and FLOPs are saved), and no weight moves.
#[test]
fn an_exact_prompt_step_equals_the_reference_and_changes_no_weight() {
    use wafersim::flops::Phase;
    let PromptCase {
        config,
        fabric,
        params,
        masks,
        prompt,
        plan,
        batch,
        sizes: (b, s, p),
    } = prompt_case();
    let shape = RunShape {
        config: &config,
        fabric: &fabric,
        plan: &plan,
        fidelity: Fidelity::Exact,
        loss_scale: LossScale::Auto,
    };
    let schedule = LrSchedule {
        peak: 1e-2,
        warmup: 0,
        total: 2,
    };
    let mut trainer =
        Trainer::prompt_tuning(params.clone(), masks.clone(), prompt.clone(), schedule);
    let (all, only) = trainer.cost_with_all_gradients(shape, &batch).unwrap();
    let record = trainer.step(shape, &batch).unwrap();

    let (loss, grad) = reference::prompt_loss_and_grad(&config, &params, &prompt, &batch).unwrap();
    let rel = (record.loss - f64::from(loss)).abs() / f64::from(loss);
    assert!(rel < 1e-5, "loss {} vs {loss} ({rel:e})", record.loss);
    // The first AdamW step moves each vector entry by lr * sign(g) (m / sqrt(v) = g / |g|).
    let moved = &trainer.prompt.as_ref().unwrap().vectors;
    for ((new, old), g) in moved.data.iter().zip(&prompt.data).zip(&grad.data) {
        if g.abs() > 1e-6 {
            let step = f64::from(*new) - f64::from(*old);
            assert!(
                (step + 1e-2 * f64::from(g.signum())).abs() < 1e-5,
                "{step} for g {g}"
            );
        }
    }
    assert_eq!(trainer.params, params, "a prompt step changed a weight");

    // No weight-gradient record at all; everything else is the same kernels. The full step
    // has 2 layers x 6 + 1 (head) weight-gradient kernels more.
    let wg = |c: &wafersim::runtime::StepCost| {
        c.records
            .iter()
            .filter(|r| r.op.phase == Phase::WeightGrad && !r.op.matmuls.is_empty())
            .count()
    };
    assert_eq!((wg(&all), wg(&only)), (13, 0));
    assert_eq!(all.records.len() - only.records.len(), 13);
    // FLOPs saved: the weight-gradient phase over T = 2 x (12 + 4) = 32 positions: 2 T per kept
    // weight of the sparse matrices (all layers: masks.nnz()) plus the LM head's 2 T V d.
    let t = (b * (s + p)) as u64;
    let nnz: u64 = masks.nnz() as u64;
    let expected = 2 * t * nnz + 2 * t * 256 * 64;
    let saved = all.executed_matmul_flops() - only.executed_matmul_flops();
    assert_eq!(saved, expected);
    assert!(all.cycles() > only.cycles());
    // The LayerNorm backwards (2 per block and ln_f) compute no parameter gradient: each is
    // cheaper; every other kernel both steps run costs the same.
    let ln_backward = |c: &wafersim::runtime::StepCost| -> Vec<u64> {
        c.records
            .iter()
            .filter(|r| r.op.phase == Phase::InputGrad && r.op.name.starts_with("ln_"))
            .map(|r| r.cycles)
            .collect()
    };
    let (ln_all, ln_only) = (ln_backward(&all), ln_backward(&only));
    assert_eq!((ln_all.len(), ln_only.len()), (5, 5));
    assert!(
        ln_all.iter().zip(&ln_only).all(|(a, o)| o < a),
        "{ln_all:?} vs {ln_only:?}"
    );
}

/// A prompt step on the fabric leaves every frozen parameter's gradient at zero, the LayerNorms'
/// and the embedding tables' included (their kernels compute or keep none), and gives the
/// reference's prompt gradient.
#[test]
fn an_exact_prompt_step_computes_no_frozen_gradient() {
    use wafersim::runtime::{GradientSet, LossScale, StepInputs, StepMode, simulate_step};
    let PromptCase {
        config,
        fabric,
        params,
        masks,
        prompt,
        plan,
        batch,
        ..
    } = prompt_case();
    let inputs = StepInputs {
        config: &config,
        params: &params,
        masks: &masks,
        batch: &batch,
        fabric: &fabric,
        plan: &plan,
        dense_baseline: false,
        prompt: Some(&prompt),
        gradients: GradientSet::PromptOnly,
        loss_scale: LossScale::Auto,
    };
    let mode = StepMode {
        fidelity: Fidelity::Exact,
        numerics: true,
        check: false,
    };
    let numerics = simulate_step(inputs, mode).unwrap().numerics.unwrap();
    let zeros = |v: &[f32]| v.iter().all(|&g| g == 0.0);
    let grads = &numerics.grads;
    assert!(
        zeros(&grads.wte.data) && zeros(&grads.wpe.data),
        "embedding tables"
    );
    assert!(zeros(&grads.ln_f.gamma) && zeros(&grads.ln_f.beta), "ln_f");
    for block in &grads.blocks {
        for ln in [&block.ln_1, &block.ln_2] {
            assert!(zeros(&ln.gamma) && zeros(&ln.beta), "a block's LayerNorm");
        }
    }
    let (_, want) = reference::prompt_loss_and_grad(&config, &params, &prompt, &batch).unwrap();
    let got = numerics.prompt_grad.unwrap();
    let scale = norm(want.data.iter().map(|&g| f64::from(g)));
    let error = norm(
        got.data
            .iter()
            .zip(&want.data)
            .map(|(&a, &b)| f64::from(a - b)),
    );
    assert!(
        error < 1e-4 * scale,
        "prompt gradient: error {error} of {scale}"
    );
}

#[test]
fn prompt_tuning_lowers_the_loss_on_new_data() {
    let config = tiny();
    let fabric = FabricConfig::from_spec("4x4").unwrap();
    let (params, masks) = sparse_start(&config, 0.5);
    let pre = run(
        TrainPhase::SparsePretrain,
        params,
        masks,
        20,
        Fidelity::Fast,
        &fabric,
    );
    let (b, s, p) = (2, 12, 4);
    let text = "Q: what is the dose? A: one tablet. ".repeat(10);
    let ids: Vec<u32> = text.bytes().map(u32::from).collect();
    let new = Corpus::from_sequences(&[ids], s, &config).unwrap();
    let prompt = prompt_from_data(&pre.trainer.params, &new, p);
    let plan = plan_step(&config, b, s + p, &fabric, Precision::F32).unwrap();
    let shape = RunShape {
        config: &config,
        fabric: &fabric,
        plan: &plan,
        fidelity: Fidelity::Fast,
        loss_scale: LossScale::Auto,
    };
    let schedule = LrSchedule {
        peak: 3e-2,
        warmup: 0,
        total: 30,
    };
    let frozen = pre.trainer.params.clone();
    let mut trainer =
        Trainer::prompt_tuning(frozen.clone(), pre.trainer.masks.clone(), prompt, schedule);
    let mut sampler = Sampler::new(&new, b, 2);
    let losses: Vec<f64> = (0..30)
        .map(|_| {
            let batch = sampler.next_batch(&new, &config).unwrap();
            trainer.step(shape, &batch).unwrap().loss
        })
        .collect();
    let (first, last) = (mean_first(&losses, 5), mean_last(&losses, 5));
    assert!(last < first, "prompt tuning: {first} -> {last}");
    assert_eq!(trainer.params, frozen);
}

fn mean_first(losses: &[f64], n: usize) -> f64 {
    losses[..n].iter().sum::<f64>() / n as f64
}
