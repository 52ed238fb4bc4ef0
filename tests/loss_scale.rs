//! Loss scaling of the exact step (`LossScale`): a power of two changes no bit of an fp32 step,
//! and in fp16 it keeps the gradients that the mean over the tokens shrinks out of fp16's
//! subnormals, which the CPU reference shows.

use wafersim::compile::plan_step;
use wafersim::model::{GptConfig, GptParams, Matrix, init_params};
use wafersim::reference::Batch;
use wafersim::runtime::{
    GradientSet, LossScale, Numerics, StepInputs, StepRun, check_against_reference, run_step,
};
use wafersim::sparsity::ModelMasks;
use wafersim_kernels::Precision;
use wafersim_sim::FabricConfig;

struct Tiny {
    config: GptConfig,
    params: GptParams,
    masks: ModelMasks,
    batch: Batch,
    fabric: FabricConfig,
}

impl Tiny {
    fn new(batch: usize, seq: usize, fabric: u32) -> Self {
        let config = GptConfig::preset("tiny").unwrap();
        let mut params = init_params(&config, 3);
        let masks = ModelMasks::random(&config, 0.5, 5).unwrap();
        masks.apply(&mut params).unwrap();
        let tokens = (0..batch * seq)
            .map(|i| ((i * 37 + 11) % config.vocab_size) as u32)
            .collect();
        let batch = Batch::new(&config, batch, seq, tokens).unwrap();
        let fabric = FabricConfig::rectangle(fabric, fabric).unwrap();
        Tiny {
            config,
            params,
            masks,
            batch,
            fabric,
        }
    }

    /// The step at `precision` with `loss_scale`: its run, the scale it resolved to, and its
    /// numerics against the CPU reference's (loss error, worst gradient error).
    fn step(&self, precision: Precision, loss_scale: LossScale) -> (StepRun, f32, (f64, f64)) {
        let (b, s) = (self.batch.batch, self.batch.seq);
        let plan = plan_step(&self.config, b, s, &self.fabric, precision).unwrap();
        let inputs = StepInputs {
            config: &self.config,
            params: &self.params,
            masks: &self.masks,
            batch: &self.batch,
            fabric: &self.fabric,
            plan: &plan,
            dense_baseline: false,
            prompt: None,
            gradients: GradientSet::All,
            loss_scale,
        };
        let run = run_step(inputs).unwrap();
        let numerics = Numerics {
            loss: run.loss,
            grads: run.grads.clone(),
            prompt_grad: None,
        };
        let check = check_against_reference(inputs, &numerics).unwrap();
        let scale = inputs.resolved_loss_scale();
        (run, scale, (check.loss_error, check.gradient_error))
    }
}

/// In f32 no value of the tiny step comes near the ends of the range, so scaling the loss by
/// 2^10 scales every value of the backward pass exactly and dividing it back restores every
/// bit; the cycles do not depend on the values at all. `Auto` is no scaling in fp32.
#[test]
fn a_power_of_two_changes_no_bit_of_an_fp32_step() {
    let tiny = Tiny::new(2, 16, 8);
    let (plain, plain_scale, _) = tiny.step(Precision::F32, LossScale::Auto);
    let (scaled, scale, _) = tiny.step(Precision::F32, LossScale::Power(10));
    assert_eq!((plain_scale, scale), (1.0, 1024.0));
    assert_eq!(plain.loss.to_bits(), scaled.loss.to_bits());
    for ((name, p), (_, s)) in plain
        .grads
        .tensors()
        .into_iter()
        .zip(scaled.grads.tensors())
    {
        let same = p.iter().zip(s).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{name} differs");
    }
    let cycles = |run: &StepRun| {
        run.cost
            .records
            .iter()
            .map(|r| r.cycles)
            .collect::<Vec<_>>()
    };
    assert_eq!(cycles(&plain), cycles(&scaled));
}

/// 16 sequences of 16 tokens on 8 x 8 PEs run as passes of 4 sequences, each predicting 60
/// positions: every gradient is a mean over 60, and the logits' gradient away from the targets
/// is about `1 / (60 x 256)` = 6.5e-5 per entry, at fp16's smallest normal (6.1e-5), and below
/// it wherever the softmax is below uniform. Unscaled, the worst gradient tensor measured 9.4e-3
/// from the reference; with `Auto` (32, the largest power of two not above 60) 1.03e-3, and any
/// larger power of two up to 2^15 measured 1.02e-3: about what rounding every matmul input to
/// fp16 (2^-11 = 4.9e-4) gives. The loss is computed in f32 either way.
#[test]
fn auto_scaling_keeps_fp16_gradients_out_of_the_subnormals() {
    let tiny = Tiny::new(16, 16, 8);
    let (_, none, (_, unscaled)) = tiny.step(Precision::F16, LossScale::Power(0));
    let (_, auto, (loss_error, scaled)) = tiny.step(Precision::F16, LossScale::Auto);
    assert_eq!((none, auto), (1.0, 32.0));
    assert!(unscaled > 5e-3, "unscaled: {unscaled:e}");
    assert!(scaled < 1.5e-3, "scaled: {scaled:e}");
    assert!(loss_error < 1e-5, "loss: {loss_error:e}");
}

/// A prompt-tuning step in fp16 scales its loss too, and the prompt's gradient comes back
/// unscaled: 4 prompt vectors in front of 2 sequences of 16 tokens predict 2 x 16 = 32
/// positions in one pass, so `auto` is 32; the prompt's gradient measured 2.6e-4 from the CPU
/// reference (left scaled, it would be 32 times the true one: an error of 31).
#[test]
fn a_prompt_step_unscales_the_prompt_gradient() {
    let tiny = Tiny::new(2, 16, 8);
    let values = (0..4 * 64).map(|i| 0.02 * ((i % 7) as f32 - 3.0)).collect();
    let prompt = Matrix {
        rows: 4,
        cols: 64,
        data: values,
    };
    let (b, s) = (tiny.batch.batch, tiny.batch.seq);
    let plan = plan_step(&tiny.config, b, s + 4, &tiny.fabric, Precision::F16).unwrap();
    let inputs = StepInputs {
        config: &tiny.config,
        params: &tiny.params,
        masks: &tiny.masks,
        batch: &tiny.batch,
        fabric: &tiny.fabric,
        plan: &plan,
        dense_baseline: false,
        prompt: Some(&prompt),
        gradients: GradientSet::PromptOnly,
        loss_scale: LossScale::Auto,
    };
    assert_eq!(plan.pass_count(), 1);
    assert_eq!(inputs.resolved_loss_scale(), 32.0);
    let run = run_step(inputs).unwrap();
    let numerics = Numerics {
        loss: run.loss,
        grads: run.grads,
        prompt_grad: run.prompt_grad,
    };
    let check = check_against_reference(inputs, &numerics).unwrap();
    assert_eq!(check.worst_gradient, "prompt");
    assert!(check.gradient_error < 2e-3, "{:e}", check.gradient_error);
}
