//! How far an exact step's loss and gradients are from the CPU reference's: what `wafersim step`
//! reports beside them, so that the fabric's rounding (fp16 above all) is never silent.
//!
//! Not a test and not a gate: the distances are reported, and [`ReferenceCheck::within`] says
//! whether they stay inside the agreement `tests/step_vs_reference.rs` holds the fabric to for
//! the step's precision. The fast fidelity's numerics are the reference's own: nothing to check.

use wafersim_kernels::Precision;

use super::{Numerics, RuntimeError, StepInputs, reference_numerics};

/// The agreement the tests hold a step to, per precision: the loss's relative error, each
/// gradient tensor's relative L2 distance, and the fraction of the whole gradient's norm below
/// which a tensor is measured absolutely (a gradient that vanishes mathematically, like the key
/// bias's, is rounding noise in the reference too).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    pub loss: f64,
    pub gradient: f64,
    pub floor: f64,
}

impl Tolerance {
    /// fp32: sums of a few hundred terms reordered in f32 (about 1e-7 each) against the f64
    /// reference; fp16: every matmul input and weight rounded to 2^-11.
    pub fn of(precision: Precision) -> Self {
        match precision {
            Precision::F32 => Tolerance {
                loss: 1e-5,
                gradient: 1e-4,
                floor: 1e-6,
            },
            Precision::F16 => Tolerance {
                loss: 2e-3,
                gradient: 2e-2,
                floor: 1e-3,
            },
        }
    }
}

/// The fabric's numerics against the reference's.
#[derive(Clone, Debug, PartialEq)]
pub struct ReferenceCheck {
    /// `|loss - reference| / |reference|`.
    pub loss_error: f64,
    /// The largest relative L2 distance of a gradient tensor (the prompt's, for a prompt step).
    pub gradient_error: f64,
    /// The tensor with that distance.
    pub worst_gradient: String,
    pub tolerance: Tolerance,
}

impl ReferenceCheck {
    /// Whether both distances stay inside the tolerance.
    pub fn within(&self) -> bool {
        self.loss_error <= self.tolerance.loss && self.gradient_error <= self.tolerance.gradient
    }
}

/// Runs the CPU reference on the step's inputs and measures `fabric` against it.
pub fn check_against_reference(
    inputs: StepInputs<'_>,
    fabric: &Numerics,
) -> Result<ReferenceCheck, RuntimeError> {
    let reference = reference_numerics(inputs)?;
    Ok(compare(
        fabric,
        &reference,
        Tolerance::of(inputs.plan.precision),
    ))
}

/// `fabric` against `reference`: the loss, and every gradient tensor (only the prompt's when
/// there is one, since a prompt step computes no other).
pub fn compare(fabric: &Numerics, reference: &Numerics, tolerance: Tolerance) -> ReferenceCheck {
    let loss_error =
        (fabric.loss - reference.loss).abs() / reference.loss.abs().max(f64::MIN_POSITIVE);
    let pairs: Vec<(String, &[f32], &[f32])> = match (&fabric.prompt_grad, &reference.prompt_grad) {
        (Some(got), Some(want)) => vec![("prompt".into(), &got.data[..], &want.data[..])],
        _ => {
            let want = reference.grads.tensors();
            let got = fabric.grads.tensors();
            got.into_iter()
                .zip(want)
                .map(|((name, g), (_, w))| (name, g, w))
                .collect()
        }
    };
    let whole = norm(pairs.iter().flat_map(|(_, _, w)| w.iter().copied()));
    let floor = tolerance.floor * whole;
    // A NaN distance (a non-finite value on either side) counts as the worst there is.
    let (gradient_error, worst_gradient) = pairs
        .iter()
        .map(|(name, got, want)| {
            let e = relative_l2(got, want, floor);
            (if e.is_nan() { f64::INFINITY } else { e }, name)
        })
        .fold((0.0, String::new()), |worst, (e, name)| {
            if e > worst.0 {
                (e, name.clone())
            } else {
                worst
            }
        });
    ReferenceCheck {
        loss_error,
        gradient_error,
        worst_gradient,
        tolerance,
    }
}

fn norm(values: impl Iterator<Item = f32>) -> f64 {
    values
        .map(|v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt()
}

/// `|got - want| / max(|want|, floor)` in L2.
fn relative_l2(got: &[f32], want: &[f32], floor: f64) -> f64 {
    let diff = norm(got.iter().zip(want).map(|(g, w)| g - w));
    let scale = norm(want.iter().copied()).max(floor);
    if scale > 0.0 { diff / scale } else { diff }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{GptConfig, GptParams, Matrix};

    fn numerics(loss: f64, grads: GptParams) -> Numerics {
        Numerics {
            loss,
            grads,
            prompt_grad: None,
        }
    }

    #[test]
    fn the_worst_tensor_and_the_loss_are_measured_relative_to_the_reference() {
        let config = GptConfig::preset("tiny").unwrap();
        let mut want = GptParams::zeros(&config);
        want.wte.data.iter_mut().for_each(|v| *v = 1.0);
        want.ln_f.gamma[0] = 2.0;
        let mut got = want.clone();
        // wte: one entry of 16,384 ones off by 64: |diff| 64, |want| 128, so 0.5.
        got.wte.data[0] += 64.0;
        // ln_f.weight: [2, 0, ...] read as [2.5, 0, ...]: 0.25.
        got.ln_f.gamma[0] = 2.5;
        let check = compare(
            &numerics(4.04, got),
            &numerics(4.0, want),
            Tolerance::of(Precision::F32),
        );
        assert!((check.loss_error - 0.01).abs() < 1e-12);
        assert_eq!(check.gradient_error, 0.5);
        assert_eq!(check.worst_gradient, "wte.weight");
        assert!(!check.within());
    }

    #[test]
    fn a_vanishing_gradient_is_measured_against_the_floor() {
        // The whole gradient's norm is 3 (wte: nine entries of 1); ln_f.bias is 0 in the
        // reference and 3e-6 on the fabric: 3e-6 against the fp32 floor 1e-6 x 3 is 1, but a
        // zero in both is no error.
        let config = GptConfig::preset("tiny").unwrap();
        let mut want = GptParams::zeros(&config);
        want.wte.data[..9].iter_mut().for_each(|v| *v = 1.0);
        let mut got = want.clone();
        got.ln_f.beta[0] = 3e-6;
        let check = compare(
            &numerics(1.0, got),
            &numerics(1.0, want.clone()),
            Tolerance::of(Precision::F32),
        );
        assert!((check.gradient_error - 1.0).abs() < 1e-6);
        assert_eq!(check.worst_gradient, "ln_f.bias");
        let same = compare(
            &numerics(1.0, want.clone()),
            &numerics(1.0, want),
            Tolerance::of(Precision::F32),
        );
        assert_eq!((same.loss_error, same.gradient_error), (0.0, 0.0));
        assert!(same.within());
    }

    #[test]
    fn a_non_finite_gradient_is_the_worst_and_outside_the_tolerance() {
        // wte is off by 1e-3 relative everywhere; ln_f.bias holds a NaN on the fabric: its
        // distance is NaN, which must not read as "no error".
        let config = GptConfig::preset("tiny").unwrap();
        let mut want = GptParams::zeros(&config);
        want.wte.data.iter_mut().for_each(|v| *v = 1.0);
        let mut got = want.clone();
        got.wte.data.iter_mut().for_each(|v| *v = 1.001);
        got.ln_f.beta[3] = f32::NAN;
        let check = compare(
            &numerics(1.0, got),
            &numerics(1.0, want),
            Tolerance::of(Precision::F16),
        );
        assert_eq!(check.gradient_error, f64::INFINITY);
        assert_eq!(check.worst_gradient, "ln_f.bias");
        assert!(!check.within());
    }

    #[test]
    fn a_prompt_step_is_measured_on_the_prompt_gradient_only() {
        let config = GptConfig::preset("tiny").unwrap();
        let prompt = |values: Vec<f32>| Matrix {
            rows: 1,
            cols: 2,
            data: values,
        };
        let with_prompt = |p: Matrix| Numerics {
            loss: 1.0,
            grads: GptParams::zeros(&config),
            prompt_grad: Some(p),
        };
        // [3, 4] against [3, 4.5]: |diff| 0.5 over |want| 5.
        let check = compare(
            &with_prompt(prompt(vec![3.0, 4.5])),
            &with_prompt(prompt(vec![3.0, 4.0])),
            Tolerance::of(Precision::F16),
        );
        assert!((check.gradient_error - 0.1).abs() < 1e-12);
        assert_eq!(check.worst_gradient, "prompt");
    }
}
