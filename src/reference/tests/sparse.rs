//! Sparsity in the training step: pruned weights get exactly zero gradient, AdamW leaves them
//! and their moments at exactly zero, and masking changes nothing else.

use super::*;
use crate::model::{GptParams, SparseKind};
use crate::reference::fixtures::{formula_batch, sine_params};
use crate::sparsity::ModelMasks;

fn masked_sine_params(config: &GptConfig, masks: &ModelMasks) -> GptParams {
    let mut params = sine_params(config);
    masks.apply(&mut params).unwrap();
    params
}

/// Calls `f(layer, kind, flat index, kept)` for every weight of every sparsified matrix.
fn for_each_sparse_weight(masks: &ModelMasks, mut f: impl FnMut(usize, SparseKind, usize, bool)) {
    for (layer, layer_masks) in masks.layers().iter().enumerate() {
        for kind in SparseKind::ALL {
            for (i, &kept) in layer_masks[kind.index()].keep().iter().enumerate() {
                f(layer, kind, i, kept);
            }
        }
    }
}

#[test]
fn pruned_weights_get_zero_gradient_and_stay_zero_through_training() {
    let config = micro_config();
    let masks = ModelMasks::random(&config, 0.75, 3).unwrap();
    let mut params = masked_sine_params(&config, &masks);
    let batch = micro_batch(&config);
    let opt = AdamW::new(0.05);
    let mut state = AdamState::new(&params);
    for _ in 0..3 {
        let out = train_step(&config, &params, &masks, &batch, &opt, &mut state).unwrap();
        let mut kept_moved = 0;
        for_each_sparse_weight(&masks, |layer, kind, i, kept| {
            let at = |p: &GptParams| p.blocks[layer].linear(kind).weight.data[i];
            if kept {
                kept_moved += usize::from(at(&out.updated) != at(&params));
            } else {
                // Bitwise +0.0, not merely "equal to zero".
                for value in [at(&out.grads), at(&out.updated), at(&state.m), at(&state.v)] {
                    assert_eq!(value.to_bits(), 0, "layer {layer} {} [{i}]", kind.name());
                }
            }
        });
        assert_eq!(kept_moved, masks.nnz(), "every kept weight takes a step");
        params = out.updated;
    }
    assert_eq!(state.t, 3);
}

#[test]
fn masking_only_zeroes_the_pruned_gradients() {
    let config = micro_config();
    // Seed 24 prunes no whole row of `c_proj` nor whole column of `c_fc` (8 entries each, so
    // about one seed in three does at 50 %): such a line makes a feature's dense gradient
    // exactly zero, which the `assert_ne!` below would take for a masking bug.
    let masks = ModelMasks::random(&config, 0.5, 24).unwrap();
    let params = masked_sine_params(&config, &masks);
    let batch = micro_batch(&config);
    let (sparse_loss, sparse) = loss_and_grads(&config, &params, &masks, &batch).unwrap();
    let (dense_loss, dense) =
        loss_and_grads(&config, &params, &ModelMasks::dense(&config), &batch).unwrap();
    assert_eq!(sparse_loss, dense_loss);
    for_each_sparse_weight(&masks, |layer, kind, i, kept| {
        let s = sparse.blocks[layer].linear(kind).weight.data[i];
        let d = dense.blocks[layer].linear(kind).weight.data[i];
        if kept {
            assert_eq!(s, d);
        } else {
            assert_eq!(s, 0.0);
            assert_ne!(
                d, 0.0,
                "a pruned weight's dense gradient is generically nonzero"
            );
        }
    });
    // Everything that is not a sparsified weight is identical.
    assert_eq!(sparse.wte, dense.wte);
    assert_eq!(sparse.wpe, dense.wpe);
    assert_eq!(sparse.ln_f, dense.ln_f);
    for (s, d) in sparse.blocks.iter().zip(&dense.blocks) {
        assert_eq!((&s.ln_1, &s.ln_2), (&d.ln_1, &d.ln_2));
        for kind in SparseKind::ALL {
            assert_eq!(s.linear(kind).bias, d.linear(kind).bias);
        }
    }
}

/// The tiny preset (2 x 64, vocabulary 256) at B = 2, S = 32 and 50 % sparsity: a few AdamW
/// steps on one fixed batch must lower its loss every time (the step is a descent step for a
/// small enough learning rate). Also the size the brief asks to run well under a second.
#[test]
fn tiny_preset_training_lowers_the_loss_on_a_fixed_batch() {
    let config = GptConfig::preset("tiny").unwrap();
    let masks = ModelMasks::random(&config, 0.5, 1).unwrap();
    let mut params = masked_sine_params(&config, &masks);
    let batch = formula_batch(&config, 2, 32).unwrap();
    let opt = AdamW::new(1e-3);
    let mut state = AdamState::new(&params);
    let mut losses = Vec::new();
    for _ in 0..4 {
        let out = train_step(&config, &params, &masks, &batch, &opt, &mut state).unwrap();
        losses.push(out.loss);
        params = out.updated;
    }
    assert!(losses.windows(2).all(|w| w[1] < w[0]), "losses {losses:?}");
}
