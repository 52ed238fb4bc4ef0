//! Cases whose answers are worked out by hand (in the comments), and identities the exact
//! gradient must satisfy.

use super::*;
use crate::model::GptParams;
use crate::reference::fixtures::{formula_batch, sine_params};
use crate::reference::ops;
use crate::reference::tensor::Mat;
use crate::sparsity::ModelMasks;

/// All weights zero except the final LayerNorm shift `beta_f`.
///
/// Then every residual stream is the zero vector, `LN(0) = beta` (xhat = 0 since eps > 0), so
/// `ln_f(x) = beta_f` at every position and `logits = beta_f . wte[v] = 0`: the softmax is
/// uniform and every predicted position costs `ln V`, so the loss is `ln 11` exactly.
///
/// Backward: `dlogits[t, v] = (1/V - [v = target_t]) / N` with `N = 2 * 4 = 8`. The head gives
/// `dwte[v] = sum_t dlogits[t, v] beta_f = (1/V - c_v / N) beta_f`, where `c_v` counts `v` among
/// the targets; `d ln_f(x) = dlogits wte = 0`, so every other gradient is exactly 0.
/// The micro batch's targets are 7 1 10 3 | 5 5 9 2: `c_5 = 2`; `c_1, c_2, c_3, c_7, c_9,
/// c_10 = 1`; `c_0, c_4, c_6, c_8 = 0`.
#[test]
fn zero_model_has_loss_ln_v_and_only_the_head_gradient() {
    let config = GptConfig {
        n_layer: 1,
        ..micro_config()
    };
    let mut params = GptParams::zeros(&config);
    let beta: Vec<f32> = (0..8)
        .map(|i| 0.1 * (i as f32 + 1.0) * if i % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    params.ln_f.beta = beta.clone();
    let batch = micro_batch(&config);
    let (loss, grads) =
        loss_and_grads(&config, &params, &ModelMasks::dense(&config), &batch).unwrap();
    assert_eq!(loss, 11f64.ln() as f32);

    let counts = [0, 1, 1, 1, 0, 2, 0, 1, 0, 1, 1];
    for (v, &count) in counts.iter().enumerate() {
        let coefficient = 1.0 / 11.0 - f64::from(count) / 8.0;
        for (i, &beta_i) in beta.iter().enumerate() {
            let expected = coefficient * f64::from(beta_i);
            let got = f64::from(grads.wte.at(v, i));
            assert!(
                (got - expected).abs() <= 1e-7 * expected.abs(),
                "dwte[{v}, {i}] {got} vs {expected}"
            );
        }
    }
    for (name, g) in grads.tensors().into_iter().skip(1) {
        assert!(g.iter().all(|&x| x == 0.0), "{name} should be exactly zero");
    }
}

/// `gelu(x) - gelu(-x) = x` for the tanh form (the tanh term is odd), so `gelu'(x) +
/// gelu'(-x) = 1`. Values: PyTorch `gelu(x, approximate="tanh")` and its autograd in float64.
#[test]
fn gelu_and_its_derivative_match_the_closed_form() {
    let cases = [
        (1.0, 0.841_191_990_608_276_8, 1.082_964_083_845_782_6),
        (-1.0, -0.158_808_009_391_723_24, -0.082_964_083_845_782_52),
        (2.5, 2.484_915_733_910_001, 1.037_951_576_212_666),
    ];
    for (x, value, slope) in cases {
        assert!((ops::gelu(x) - value).abs() < 1e-15, "gelu({x})");
        assert!((ops::gelu_grad(x) - slope).abs() < 1e-14, "gelu'({x})");
        assert!((ops::gelu_grad(x) + ops::gelu_grad(-x) - 1.0).abs() < 1e-15);
    }
    assert_eq!(ops::gelu(0.0), 0.0);
}

/// `x = [1, 2, 3, 4]`: mean 2.5, biased variance (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25,
/// so `xhat = (x - 2.5) / sqrt(1.25 + eps)`; with `gamma = 2`, `beta = 1`: `y = 2 xhat + 1`.
#[test]
fn layer_norm_uses_the_biased_variance() {
    let x = Mat {
        rows: 1,
        cols: 4,
        data: vec![1.0, 2.0, 3.0, 4.0],
    };
    let ln = crate::model::LayerNorm {
        gamma: vec![2.0; 4],
        beta: vec![1.0; 4],
    };
    let eps = 1e-5;
    let out = ops::layer_norm_forward(&x, &ln, eps);
    for (i, &xi) in x.data.iter().enumerate() {
        let xhat = (xi - 2.5) / (1.25f64 + eps).sqrt();
        assert!((out.y.at(0, i) - (2.0 * xhat + 1.0)).abs() < 1e-15);
    }
    assert!((out.rstd[0] - 1.0 / 1.25001f64.sqrt()).abs() < 1e-15);
}

/// Adding a constant to every key adds `q_i . b` to all scores of query `i`, which the softmax
/// ignores: the key bias gets exactly zero gradient in exact arithmetic (rounding noise here).
#[test]
fn key_bias_gradient_vanishes() {
    let config = micro_config();
    let params = sine_params(&config);
    let batch = micro_batch(&config);
    let (_, grads) = loss_and_grads(&config, &params, &ModelMasks::dense(&config), &batch).unwrap();
    for block in &grads.blocks {
        let q_bias = block.q.bias.iter().map(|g| g.abs()).fold(0.0, f32::max);
        let k_bias = block.k.bias.iter().map(|g| g.abs()).fold(0.0, f32::max);
        assert!(
            q_bias > 1e-4,
            "query bias gradient should not vanish: {q_bias}"
        );
        assert!(k_bias < 1e-12, "key bias gradient {k_bias}");
    }
}

/// Causal attention and independent sequences: changing the last token of sequence 0 changes
/// no logit of an earlier position and nothing in sequence 1 (bit for bit: same inputs, same
/// operations in the same order).
#[test]
fn earlier_positions_and_other_sequences_ignore_a_changed_token() {
    let config = micro_config();
    let params = sine_params(&config);
    let batch = micro_batch(&config);
    let mut changed = batch.clone();
    changed.tokens[4] = 8;
    let a = forward_trace(&config, &params, &batch).unwrap();
    let b = forward_trace(&config, &params, &changed).unwrap();
    for t in 0..10 {
        let same = a.logits.row(t) == b.logits.row(t);
        assert_eq!(same, t != 4, "row {t}");
    }
}

/// The trace is consistent with itself and with `forward_loss`.
#[test]
fn the_trace_exposes_every_stage_consistently() {
    let config = micro_config();
    let params = sine_params(&config);
    let batch = formula_batch(&config, 2, 6).unwrap();
    let trace = forward_trace(&config, &params, &batch).unwrap();
    assert_eq!(trace.loss, forward_loss(&config, &params, &batch).unwrap());
    assert_eq!(trace.layers.len(), 2);
    assert_eq!((trace.logits.rows, trace.logits.cols), (12, 11));
    for layer in &trace.layers {
        assert_eq!((layer.fc_pre.rows, layer.fc_pre.cols), (12, 32));
        assert_eq!(layer.attn_probs.len(), 2 * 2);
        for p in &layer.attn_probs {
            for i in 0..6 {
                let row_sum: f32 = p.row(i).iter().sum();
                assert!((row_sum - 1.0).abs() < 1e-6);
                assert!(p.row(i)[i + 1..].iter().all(|&x| x == 0.0));
            }
        }
        for (r, (mid, ffn)) in layer
            .residual_mid
            .data
            .iter()
            .zip(&layer.ffn_out.data)
            .enumerate()
        {
            assert!((layer.residual_out.data[r] - (mid + ffn)).abs() < 1e-6);
        }
    }
}

/// One AdamW step by hand, lr 0.01, defaults beta1 0.9, beta2 0.95, eps 1e-8, wd 0.1, starting
/// from w = 0.5 with gradients 0.2 then -0.1:
///
/// step 1: m = 0.02, v = 0.05 * 0.04 = 0.002; m / (1 - 0.9) = 0.2, sqrt(v / (1 - 0.95)) = 0.2;
///   update = 0.01 * 0.2 / (0.2 + 1e-8) = 0.0099999995.
///   weight (decayed): 0.5 * (1 - 0.001) - 0.0099999995 = 0.4895000005;
///   bias (not decayed): 0.5 - 0.0099999995 = 0.4900000005.
/// step 2: m = 0.9 * 0.02 - 0.01 = 0.008, v = 0.95 * 0.002 + 0.05 * 0.01 = 0.0024;
///   update = (0.01 / 0.19) * 0.008 / (sqrt(0.0024) / sqrt(0.0975) + 1e-8) = 0.0026836943;
///   weight: 0.4895000005 * 0.999 - 0.0026836943 = 0.4863268062;
///   bias: 0.4900000005 - 0.0026836943 = 0.4873163062.
/// A dense weight with zero gradient only decays: 0.5 -> 0.4995. The tolerance 1e-7 covers the
/// f32 storage of weights and moments between steps (an ulp of 0.5 is 6e-8).
#[test]
fn adamw_steps_match_the_hand_computation() {
    let config = micro_config();
    let masks = ModelMasks::dense(&config);
    let mut params = GptParams::zeros(&config);
    params.blocks[0].fc.weight.data[3] = 0.5;
    params.blocks[0].fc.bias[3] = 0.5;
    params.wpe.data[0] = 0.5;
    let mut state = AdamState::new(&params);
    let opt = AdamW::new(0.01);
    let mut expected = vec![(0.4895000005, 0.4900000005), (0.4863268062, 0.4873163062)];
    for (step, g) in [0.2f32, -0.1].into_iter().enumerate() {
        let mut grads = GptParams::zeros(&config);
        grads.blocks[0].fc.weight.data[3] = g;
        grads.blocks[0].fc.bias[3] = g;
        opt.step(&mut params, &grads, &masks, &mut state).unwrap();
        let (weight, bias) = expected.remove(0);
        assert_eq!(state.t, step as u64 + 1);
        assert!((f64::from(params.blocks[0].fc.weight.data[3]) - weight).abs() < 1e-7);
        assert!((f64::from(params.blocks[0].fc.bias[3]) - bias).abs() < 1e-7);
    }
    assert!((f64::from(state.m.blocks[0].fc.weight.data[3]) - 0.008).abs() < 1e-9);
    assert!((f64::from(state.v.blocks[0].fc.weight.data[3]) - 0.0024).abs() < 1e-9);
    // wpe: zero gradient, decayed twice: 0.5 * 0.999^2 = 0.4990005.
    assert!((f64::from(params.wpe.data[0]) - 0.4990005).abs() < 1e-7);
    // Zero weights with zero gradients stay exactly zero.
    assert_eq!(params.wte.data.iter().filter(|&&w| w != 0.0).count(), 0);
}
