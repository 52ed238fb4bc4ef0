//! Bad inputs are refused with typed errors naming what is wrong, before any arithmetic.

use super::*;
use crate::model::{GptParams, Matrix};
use crate::reference::fixtures::sine_params;
use crate::sparsity::ModelMasks;

#[test]
fn batches_are_checked_against_the_config() {
    let c = micro_config(); // vocab 11, n_positions 6
    assert_eq!(Batch::new(&c, 0, 4, vec![]), Err(BatchError::EmptyBatch));
    assert_eq!(
        Batch::new(&c, 1, 1, vec![0]),
        Err(BatchError::SeqTooShort { seq: 1 })
    );
    assert_eq!(
        Batch::new(&c, 1, 7, vec![0; 7]),
        Err(BatchError::SeqTooLong {
            seq: 7,
            n_positions: 6
        })
    );
    assert_eq!(
        Batch::new(&c, 2, 3, vec![0; 5]),
        Err(BatchError::TokenCount {
            batch: 2,
            seq: 3,
            expected: 6,
            got: 5
        })
    );
    let err = Batch::new(&c, 2, 3, vec![0, 1, 2, 3, 11, 5]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "token id 11 (sequence 1, position 1) is outside the vocabulary of 11"
    );
    let ok = Batch::new(&c, 2, 6, vec![10; 12]).unwrap();
    assert_eq!((ok.positions(), ok.predicted_positions()), (12, 10));
}

#[test]
fn an_unchecked_batch_is_still_refused_by_every_entry_point() {
    let c = micro_config();
    let params = sine_params(&c);
    let bad = Batch {
        batch: 1,
        seq: 2,
        tokens: vec![1, 99],
    };
    let is_vocab_error = |e: ReferenceError| {
        matches!(
            e,
            ReferenceError::Batch(BatchError::TokenOutOfVocab { id: 99, .. })
        )
    };
    assert!(is_vocab_error(forward_loss(&c, &params, &bad).unwrap_err()));
    assert!(is_vocab_error(
        forward_trace(&c, &params, &bad).unwrap_err()
    ));
    let masks = ModelMasks::dense(&c);
    assert!(is_vocab_error(
        loss_and_grads(&c, &params, &masks, &bad).unwrap_err()
    ));
}

#[test]
fn parameters_of_the_wrong_shape_are_refused_by_name() {
    let c = micro_config();
    let batch = micro_batch(&c);
    let mut params = sine_params(&c);
    params.blocks[1].fc_proj.weight = Matrix::zeros(32, 7);
    assert_eq!(
        forward_loss(&c, &params, &batch).unwrap_err().to_string(),
        "params tensor `h.1.mlp.c_proj.weight`: expected [32, 8], got [32, 7] with 224 values"
    );
    let mut params = sine_params(&c);
    params.ln_f.beta.pop();
    assert_eq!(
        forward_loss(&c, &params, &batch).unwrap_err().to_string(),
        "params tensor `ln_f.bias`: expected [8], got [7]"
    );
    let mut params = sine_params(&c);
    params.blocks.pop();
    assert_eq!(
        forward_loss(&c, &params, &batch).unwrap_err().to_string(),
        "params has 1 blocks, expected 2"
    );
    let bad_config = GptConfig {
        n_head: 3,
        ..c.clone()
    };
    assert!(matches!(
        forward_loss(&bad_config, &sine_params(&c), &batch),
        Err(ReferenceError::Config(_))
    ));
}

#[test]
fn nonzero_pruned_weights_and_misfit_masks_are_refused() {
    let c = micro_config();
    let batch = micro_batch(&c);
    let masks = ModelMasks::random(&c, 0.5, 4).unwrap();
    // sine_params has no zeros, so the first pruned weight is reported.
    let params = sine_params(&c);
    let err = loss_and_grads(&c, &params, &masks, &batch).unwrap_err();
    let first_pruned = masks
        .get(0, crate::model::SparseKind::Q)
        .unwrap()
        .keep()
        .iter()
        .position(|&k| !k)
        .unwrap();
    match err {
        ReferenceError::UnmaskedWeight {
            layer,
            kind,
            row,
            col,
            value,
        } => {
            assert_eq!((layer, kind), (0, "q"));
            assert_eq!(row * 8 + col, first_pruned);
            assert_eq!(value, params.blocks[0].q.weight.data[first_pruned]);
        }
        other => panic!("expected UnmaskedWeight, got {other}"),
    }
    let other_model = GptConfig {
        n_layer: 3,
        ..c.clone()
    };
    let err = loss_and_grads(&c, &params, &ModelMasks::dense(&other_model), &batch).unwrap_err();
    assert_eq!(err.to_string(), "masks cover 3 layers but the model has 2");
}

#[test]
fn optimizer_settings_and_state_are_checked() {
    let c = micro_config();
    let masks = ModelMasks::dense(&c);
    let mut params = sine_params(&c);
    let grads = GptParams::zeros(&c);
    let mut state = AdamState::new(&params);
    for (opt, field) in [
        (
            AdamW {
                lr: f64::NAN,
                ..AdamW::new(0.1)
            },
            "lr",
        ),
        (
            AdamW {
                beta1: 1.0,
                ..AdamW::new(0.1)
            },
            "beta1",
        ),
        (
            AdamW {
                beta2: -0.5,
                ..AdamW::new(0.1)
            },
            "beta2",
        ),
        (
            AdamW {
                eps: 0.0,
                ..AdamW::new(0.1)
            },
            "eps",
        ),
        (
            AdamW {
                weight_decay: f64::INFINITY,
                ..AdamW::new(0.1)
            },
            "weight_decay",
        ),
    ] {
        let err = opt
            .step(&mut params, &grads, &masks, &mut state)
            .unwrap_err();
        assert!(
            matches!(err, ReferenceError::Optimizer { field: f, .. } if f == field),
            "{err}"
        );
    }
    assert_eq!(
        AdamW {
            beta1: 1.0,
            ..AdamW::new(0.1)
        }
        .validate()
        .unwrap_err()
        .to_string(),
        "AdamW beta1 = 1 must be finite and in [0, 1)"
    );
    state.v.wte.data.pop();
    let err = AdamW::new(0.1)
        .step(&mut params, &grads, &masks, &mut state)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "adam v tensor `wte.weight`: expected 88 values, got 87 values"
    );
    assert_eq!(state.t, 0, "a refused step does not count");
    assert_eq!(params, sine_params(&c), "a refused step changes nothing");
}
