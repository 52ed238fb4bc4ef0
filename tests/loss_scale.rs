//! Loss scaling of the exact step (`LossScale`): a power of two changes no bit of an fp32 step,
//! and in fp16 it keeps the gradients that the mean over the tokens shrinks out of fp16's
//! subnormals, which the CPU reference shows.

use wafersim::compile::plan_step;
use wafersim::model::Matrix;
use wafersim::runtime::{
    Fidelity, GradientSet, LossScale, StepInputs, StepMode, StepReport, simulate_step,
};
use wafersim_kernels::Precision;

#[path = "common/tiny.rs"]
mod tiny;
use tiny::{Tiny, tiny};

/// The step at `precision` with `loss_scale`: its report (checked against the CPU reference)
/// and the scale it resolved to.
fn step(t: &Tiny, precision: Precision, loss_scale: LossScale) -> (StepReport, f32) {
    let (b, s) = (t.batch.batch, t.batch.seq);
    let plan = plan_step(&t.config, b, s, &t.fabric, precision).unwrap();
    let inputs = StepInputs {
        loss_scale,
        ..t.inputs(&plan)
    };
    let mode = StepMode {
        fidelity: Fidelity::Exact,
        numerics: true,
        check: true,
    };
    (
        simulate_step(inputs, mode).unwrap(),
        inputs.resolved_loss_scale(),
    )
}

/// The loss's and the worst gradient tensor's distance from the CPU reference.
fn errors(report: &StepReport) -> (f64, f64) {
    let check = report.check.as_ref().unwrap();
    (check.loss_error, check.gradient_error)
}

/// In f32 no value of the tiny step comes near the ends of the range, so scaling the loss by
/// 2^10 scales every value of the backward pass exactly and dividing it back restores every
/// bit; the cycles do not depend on the values at all. `Auto` is no scaling in fp32.
#[test]
fn a_power_of_two_changes_no_bit_of_an_fp32_step() {
    let t = tiny(2, 16);
    let (plain, plain_scale) = step(&t, Precision::F32, LossScale::Auto);
    let (scaled, scale) = step(&t, Precision::F32, LossScale::Power(10));
    assert_eq!((plain_scale, scale), (1.0, 1024.0));
    let (plain_numerics, scaled_numerics) = (
        plain.numerics.as_ref().unwrap(),
        scaled.numerics.as_ref().unwrap(),
    );
    assert_eq!(
        plain_numerics.loss.to_bits(),
        scaled_numerics.loss.to_bits()
    );
    let pairs = plain_numerics.grads.tensors().into_iter();
    for ((name, p), (_, s)) in pairs.zip(scaled_numerics.grads.tensors()) {
        let same = p.iter().zip(s).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{name} differs");
    }
    let cycles = |report: &StepReport| -> Vec<u64> {
        report.cost.records.iter().map(|r| r.cycles).collect()
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
    let t = tiny(16, 16);
    let (unscaled, none) = step(&t, Precision::F16, LossScale::Power(0));
    let (scaled, auto) = step(&t, Precision::F16, LossScale::Auto);
    assert_eq!((none, auto), (1.0, 32.0));
    let ((_, unscaled), (loss_error, scaled)) = (errors(&unscaled), errors(&scaled));
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
    let t = tiny(2, 16);
    let values = (0..4 * 64).map(|i| 0.02 * ((i % 7) as f32 - 3.0)).collect();
    let prompt = Matrix {
        rows: 4,
        cols: 64,
        data: values,
    };
    let (b, s) = (t.batch.batch, t.batch.seq);
    let plan = plan_step(&t.config, b, s + 4, &t.fabric, Precision::F16).unwrap();
    let inputs = StepInputs {
        prompt: Some(&prompt),
        gradients: GradientSet::PromptOnly,
        ..t.inputs(&plan)
    };
    assert_eq!(plan.pass_count(), 1);
    assert_eq!(inputs.resolved_loss_scale(), 32.0);
    let mode = StepMode {
        fidelity: Fidelity::Exact,
        numerics: true,
        check: true,
    };
    let report = simulate_step(inputs, mode).unwrap();
    let check = report.check.unwrap();
    assert_eq!(check.worst_gradient, "prompt");
    assert!(check.gradient_error < 2e-3, "{:e}", check.gradient_error);
}
