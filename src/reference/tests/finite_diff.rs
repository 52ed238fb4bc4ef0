//! Gradients against central finite differences of the loss, for EVERY entry of EVERY
//! parameter tensor of the micro model (about 1,900 entries, 2 forward passes each).
//!
//! Accuracy argument. The loss is computed in `f64` from `f32` weights (`forward_loss_f64`), so
//! it is a smooth function of the weight known to ~1e-15. A weight `w` is moved to the `f32`
//! values `w+ = f32(w + h)` and `w- = f32(w - h)` with `h = 1e-4`, and the difference quotient
//! uses the step actually taken, `(L(w+) - L(w-)) / (w+ - w-)`. Its error is
//! - truncation `h^2 |L'''| / 6 ~ 2e-9 |L'''|`,
//! - asymmetry `|(w+ - w) - (w - w-)| |L''| / 2 <= ulp(w) |L''| / 2 ~ 6e-8 |w| |L''|`,
//! - cancellation `~1e-15 / 2e-4 = 5e-12`,
//!
//! and the analytic gradient is rounded to `f32` (`6e-8` relative). With the second and third
//! derivatives of this small model of order 1-10 that is a few 1e-8 at most, so the tests allow
//! `|fd - grad| <= 1e-8 + 1e-6 |fd|`. The worst entry measured uses 19 % of that (an error of
//! 2.4e-7 relative); a wrong term in a gradient is off by O(100 %).

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::model::GptParams;
use crate::sparsity::ModelMasks;

/// Weights uniform in `[-0.5, 0.5)`, LayerNorm scales in `[0.7, 1.3)`: large enough that
/// attention is far from uniform and GELU is well inside its curved part.
fn random_params(config: &GptConfig, seed: u64) -> GptParams {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut params = GptParams::zeros(config);
    for (name, tensor) in params.tensors_mut() {
        let center = if name.contains("ln_") && name.ends_with(".weight") {
            1.0
        } else {
            0.0
        };
        for w in tensor.iter_mut() {
            *w = center + rng.random_range(-0.5f32..0.5) * if center == 1.0 { 0.6 } else { 1.0 };
        }
    }
    params
}

const H: f32 = 1e-4;
const ABS_TOL: f64 = 1e-8;
const REL_TOL: f64 = 1e-6;

/// Central difference of the loss with respect to entry `i` of tensor number `k`.
fn central_difference(
    config: &GptConfig,
    params: &GptParams,
    batch: &Batch,
    k: usize,
    i: usize,
) -> f64 {
    let mut moved = params.clone();
    let w = params.tensors()[k].1[i];
    let (up, down) = (w + H, w - H);
    let mut loss_at = |value: f32| {
        moved.tensors_mut()[k].1[i] = value;
        forward_loss_f64(config, &moved, batch).unwrap()
    };
    let (l_up, l_down) = (loss_at(up), loss_at(down));
    (l_up - l_down) / (f64::from(up) - f64::from(down))
}

/// Checks every entry of every tensor for which `check(k, i)` holds; returns how many.
fn check_against_finite_differences(
    config: &GptConfig,
    params: &GptParams,
    masks: &ModelMasks,
    batch: &Batch,
    check: impl Fn(usize, usize) -> bool,
) -> usize {
    let (_, grads) = loss_and_grads(config, params, masks, batch).unwrap();
    let mut checked = 0;
    let mut worst = (0.0f64, String::new());
    for (k, (name, g)) in grads.tensors().iter().enumerate() {
        for (i, &analytic) in g.iter().enumerate() {
            if !check(k, i) {
                continue;
            }
            let fd = central_difference(config, params, batch, k, i);
            let err = (fd - f64::from(analytic)).abs();
            let ratio = err / (ABS_TOL + REL_TOL * fd.abs());
            if ratio > worst.0 {
                worst = (ratio, format!("{name}[{i}]: grad {analytic} vs fd {fd}"));
            }
            checked += 1;
        }
    }
    assert!(
        worst.0 <= 1.0,
        "worst entry at {:.3} x tolerance: {}",
        worst.0,
        worst.1
    );
    checked
}

#[test]
fn every_gradient_entry_matches_finite_differences() {
    let config = micro_config();
    let params = random_params(&config, 2024);
    let batch = micro_batch(&config);
    let checked = check_against_finite_differences(
        &config,
        &params,
        &ModelMasks::dense(&config),
        &batch,
        |_, _| true,
    );
    assert_eq!(checked, params.numel());
}

#[test]
fn kept_gradient_entries_of_a_sparse_model_match_finite_differences() {
    let config = micro_config();
    let masks = ModelMasks::random(&config, 0.5, 11).unwrap();
    let mut params = random_params(&config, 7);
    masks.apply(&mut params).unwrap();
    let batch = micro_batch(&config);
    // Pruned entries would move off zero and be refused; check all the others.
    let zero_before: Vec<Vec<bool>> = params
        .tensors()
        .iter()
        .map(|(_, t)| t.iter().map(|&w| w == 0.0).collect())
        .collect();
    let checked = check_against_finite_differences(&config, &params, &masks, &batch, |k, i| {
        !zero_before[k][i]
    });
    let pruned = masks.numel() - masks.nnz();
    assert_eq!(checked, params.numel() - pruned);
}

#[test]
fn gradients_without_attention_scaling_match_finite_differences() {
    let config = GptConfig {
        scale_attn_weights: false,
        ..micro_config()
    };
    let params = random_params(&config, 99);
    let batch = micro_batch(&config);
    let checked = check_against_finite_differences(
        &config,
        &params,
        &ModelMasks::dense(&config),
        &batch,
        |_, i| i % 5 == 0,
    );
    assert!(checked > 300, "{checked}");
}
