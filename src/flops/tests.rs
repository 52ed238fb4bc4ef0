//! Unit tests of the FLOP accounting: hand-counted small cases, the paper's ratios, and errors.

use super::*;

/// L 1, d 4, 2 heads (head_dim 2), d_ffn 8, vocab 10, at most 3 positions.
fn micro() -> GptConfig {
    GptConfig {
        n_layer: 1,
        n_embd: 4,
        n_head: 2,
        n_positions: 3,
        vocab_size: 10,
        n_inner: 8,
        layer_norm_epsilon: 1e-5,
        scale_attn_weights: true,
    }
}

const MICRO_SHAPE: StepShape = StepShape { batch: 1, seq: 3 };

fn report(config: &GptConfig, shape: StepShape, sparsity: f64, causal: bool) -> FlopReport {
    let nnz = NnzSource::uniform(config, sparsity).unwrap();
    let opts = FlopOptions {
        causal_halving: causal,
    };
    step_flops(config, shape, &nnz, opts).unwrap()
}

fn phase_sum(r: &FlopReport, phase: Phase, matmul: bool) -> u64 {
    r.ops()
        .iter()
        .filter(|e| e.phase == phase && e.is_matmul() == matmul)
        .map(|e| e.dense)
        .sum()
}

#[test]
fn micro_matmul_flops_by_hand() {
    // T = 3 tokens, B = 1, S = 3, d = 4, f = 8, h = 2, head_dim 2, V = 10.
    // Linears per phase: 2 T (4 d^2 + 2 d f) = 6 (64 + 64) = 768.
    // Attention forward: 2 matmuls x 2 S S head_dim x h x B = 2 x 2 x 9 x 2 x 2 = 144;
    //   input-grad 288, weight-grad 0.
    // LM head per phase: 2 T d V = 2 x 3 x 4 x 10 = 240.
    // Dense step: 3 x 768 + 3 x 144 + 3 x 240 = 2304 + 432 + 720 = 3456.
    let r = report(&micro(), MICRO_SHAPE, 0.0, false);
    assert_eq!(r.matmul_dense(), 3456);
    assert_eq!(r.matmul_sparse(), 3456);
    assert_eq!(phase_sum(&r, Phase::Forward, true), 768 + 144 + 240);
    assert_eq!(phase_sum(&r, Phase::InputGrad, true), 768 + 288 + 240);
    assert_eq!(phase_sum(&r, Phase::WeightGrad, true), 768 + 240);
}

#[test]
fn micro_sparse_flops_by_hand() {
    // s = 0.5: a 4x4 matrix keeps 16 - round(8) = 8, the 4x8 and 8x4 ones 32 - 16 = 16.
    // Linears per phase: 2 T (4 x 8 + 2 x 16) = 6 x 64 = 384; attention and LM head unchanged.
    // Sparse step: 3 x 384 + 432 + 720 = 2304; reduction 3456 / 2304 = 1.5.
    let r = report(&micro(), MICRO_SHAPE, 0.5, false);
    assert_eq!(r.matmul_dense(), 3456);
    assert_eq!(r.matmul_sparse(), 2304);
    assert_eq!(r.reduction(), 1.5);
    let fc = r
        .get(Some(0), OpKind::Linear(SparseKind::Fc), Phase::WeightGrad)
        .unwrap();
    assert_eq!((fc.dense, fc.sparse), (2 * 3 * 32, 2 * 3 * 16));
}

#[test]
fn causal_halving_halves_only_the_attention_matmuls() {
    // Attention over the step: 432 -> 216, so 3456 - 216 = 3240. Softmax is unchanged.
    let full = report(&micro(), MICRO_SHAPE, 0.0, false);
    let half = report(&micro(), MICRO_SHAPE, 0.0, true);
    assert_eq!(half.matmul_dense(), 3240);
    assert_eq!(half.non_matmul(), full.non_matmul());
    let scores = half
        .get(Some(0), OpKind::AttnScores, Phase::Forward)
        .unwrap();
    // 2 B h S S head_dim / 2 = 2 x 1 x 2 x 3 x 3 x 2 / 2 = 36.
    assert_eq!(scores.dense, 36);
}

#[test]
fn micro_non_matmul_flops_by_hand() {
    // T d = 12, T f = 24, scores B h S S = 18, loss B (S - 1) V = 20.
    // Forward: embedding 12, ln_1 7x12 = 84, biases 4x12 + 24 + 12 = 84, scale 18, softmax 5x18 =
    //   90, residuals 2x12 = 24, ln_2 84, GELU 9x24 = 216, ln_f 84, loss 4x20 = 80: 776.
    // Input-grad: three LayerNorms 3 x 8 x 12 = 288, scale 18, softmax 4x18 = 72, residuals 24,
    //   GELU 18x24 = 432, loss 3x20 = 60: 894.
    // Weight-grad: LayerNorms 3 x 3 x 12 = 108, biases 84, embedding 2x12 = 24: 216.
    let r = report(&micro(), MICRO_SHAPE, 0.5, false);
    assert_eq!(phase_sum(&r, Phase::Forward, false), 776);
    assert_eq!(phase_sum(&r, Phase::InputGrad, false), 894);
    assert_eq!(phase_sum(&r, Phase::WeightGrad, false), 216);
    assert_eq!(r.non_matmul(), 776 + 894 + 216);
}

#[test]
fn every_operation_appears_once_per_layer_and_phase() {
    let config = GptConfig::preset("tiny").unwrap();
    let r = report(&config, StepShape { batch: 2, seq: 5 }, 0.0, false);
    // Per layer 21 operations, plus embedding, ln_f, LM head and loss; each in three phases.
    assert_eq!(r.ops().len(), 3 * (21 * config.n_layer + 4));
    let by_op = r.by_op();
    assert_eq!(by_op.len(), 21 + 4);
    assert_eq!(by_op[0].op, OpKind::Embedding);
    assert_eq!(by_op.last().unwrap().op, OpKind::CrossEntropy);
}

#[test]
fn dense_matmuls_cost_three_forwards_and_attention_has_no_weight_gradient() {
    let config = GptConfig::preset("gpt2-small").unwrap();
    let r = report(&config, StepShape { batch: 2, seq: 64 }, 0.75, false);
    for t in r.by_op().iter().filter(|t| t.op.is_matmul()) {
        assert_eq!(t.dense_total(), 3 * t.dense[0], "{}", t.op.name());
        if matches!(t.op, OpKind::AttnScores | OpKind::AttnValues) {
            assert_eq!(t.dense, [t.dense[0], 2 * t.dense[0], 0]);
        }
        if !t.op.is_sparse() {
            assert_eq!(t.dense, t.sparse, "{}", t.op.name());
        }
    }
}

#[test]
fn nnz_rounds_half_away_from_zero() {
    assert_eq!(nnz_for(10, 0.25), 7); // 2.5 zeros round to 3
    assert_eq!(nnz_for(6, 0.75), 1); // 4.5 -> 5
    assert_eq!(nnz_for(4_194_304, 0.9), 419_430); // 3,774,873.6 -> 3,774,874
    assert_eq!(nnz_for(1000, 0.0), 1000);
    assert_eq!(nnz_for(0, 0.5), 0);
    // Out-of-range inputs never panic and stay in [0, numel].
    assert_eq!(nnz_for(10, f64::NAN), 10);
    assert_eq!(nnz_for(10, 7.0), 0);
    assert_eq!(nnz_for(10, -1.0), 10);
}

#[test]
fn linear_flops_is_two_tokens_nnz_per_phase() {
    assert_eq!(linear_flops(3, 4, 5, 7).unwrap(), [42, 42, 42]);
    assert_eq!(linear_flops(3, 4, 5, 20).unwrap(), [120, 120, 120]);
    assert!(matches!(
        linear_flops(3, 4, 5, 21),
        Err(FlopError::NnzExceedsMatrix {
            nnz: 21,
            k: 4,
            n: 5
        })
    ));
}

/// The reduction of a 24-layer, seq-2048, vocab-50257 shape of width `d` at `s`.
fn paper_reduction(preset: &str, sparsity: f64) -> f64 {
    let config = GptConfig::preset(preset).unwrap();
    report(
        &config,
        StepShape {
            batch: 1,
            seq: 2048,
        },
        sparsity,
        false,
    )
    .reduction()
}

#[test]
fn mediswift_reductions_match_the_paper() {
    // Per token forward, L = 24, S = 2048, V = 50257 (`docs/flops.md`):
    //   linears 24 L d^2, attention 4 L S d, LM head 2 d V; the linears scale by (1 - s).
    // XL (d 2048): 2,415,919,104 + 402,653,184 + 205,852,672 = 3,024,424,960 dense;
    //   50 %: 1,207,959,552 + 608,505,856 = 1,816,465,408 -> 1.66501;
    //   75 %:   603,979,776 + 608,505,856 = 1,212,485,632 -> 2.49440.
    // Med (d 1024): 603,979,776 + 201,326,592 + 102,926,336 = 908,232,704 dense;
    //   75 %: 150,994,944 + 304,252,928 = 455,247,872 -> 1.99503.
    // Large (d 1536): 1,358,954,496 + 301,989,888 + 154,389,504 = 1,815,333,888 dense;
    //   75 %: 339,738,624 + 456,379,392 = 796,118,016 -> 2.28023.
    let close = |got: f64, want: f64| (got - want).abs() < 5e-4;
    assert!(close(paper_reduction("mediswift-xl", 0.5), 1.665));
    assert!(close(paper_reduction("mediswift-xl", 0.75), 2.4944));
    assert!(close(paper_reduction("mediswift-med", 0.75), 1.9950));
    assert!(close(paper_reduction("mediswift-large", 0.75), 2.2802));
}

#[test]
fn explicit_nonzero_counts_are_used_per_layer_and_matrix() {
    let config = GptConfig::preset("tiny").unwrap();
    let nnz = NnzSource::from_fn(&config, |layer, kind| {
        (layer as u64 + 1) * (kind.index() as u64 + 10)
    })
    .unwrap();
    let shape = StepShape { batch: 2, seq: 8 };
    let r = step_flops(&config, shape, &nnz, FlopOptions::default()).unwrap();
    // Layer 1, fc (index 4): nnz = 2 x 14 = 28, so 2 x 16 tokens x 28 = 896 in every phase.
    for phase in Phase::ALL {
        let fc = r
            .get(Some(1), OpKind::Linear(SparseKind::Fc), phase)
            .unwrap();
        assert_eq!(fc.sparse, 896);
        assert_eq!(fc.dense, 2 * 16 * 64 * 256);
    }
    // All nonzeros: sum over layers 1, 2 of l x (10 + ... + 15) = 3 x 75 = 225; 3 phases x 2 x 16.
    let linear_sparse: u64 = r
        .ops()
        .iter()
        .filter(|e| e.op.is_sparse())
        .map(|e| e.sparse)
        .sum();
    assert_eq!(linear_sparse, 3 * 2 * 16 * 225);
}

#[test]
fn bad_nonzero_counts_are_refused() {
    let config = micro();
    let err = NnzSource::from_fn(
        &config,
        |_, kind| if kind == SparseKind::V { 17 } else { 1 },
    )
    .unwrap_err();
    assert!(matches!(
        err,
        FlopError::NnzExceedsNumel {
            layer: 0,
            kind: "v",
            nnz: 17,
            numel: 16
        }
    ));
    let two_layers = GptConfig {
        n_layer: 2,
        ..micro()
    };
    let nnz = NnzSource::dense(&two_layers);
    let err = step_flops(&config, MICRO_SHAPE, &nnz, FlopOptions::default()).unwrap_err();
    assert!(matches!(
        err,
        FlopError::LayerCount {
            expected: 1,
            got: 2
        }
    ));
}

#[test]
fn bad_sparsity_and_shapes_are_refused() {
    for bad in [f64::NAN, -0.1, 1.0, 1.5, f64::INFINITY] {
        assert!(matches!(
            NnzSource::uniform(&micro(), bad),
            Err(FlopError::Sparsity { .. })
        ));
    }
    let nnz = NnzSource::dense(&micro());
    let cases = [
        (StepShape { batch: 0, seq: 3 }, "batch"),
        (StepShape { batch: 1, seq: 0 }, "seq"),
        (StepShape { batch: 1, seq: 4 }, "seq"),
    ];
    for (shape, field) in cases {
        let err = step_flops(&micro(), shape, &nnz, FlopOptions::default()).unwrap_err();
        assert!(
            matches!(err, FlopError::Shape { field: f, .. } if f == field),
            "{err}"
        );
    }
}

#[test]
fn huge_batches_overflow_into_an_error() {
    let config = GptConfig::preset("mediswift-xl").unwrap();
    let nnz = NnzSource::dense(&config);
    let shape = StepShape {
        batch: 1 << 40,
        seq: 2048,
    };
    let err = step_flops(&config, shape, &nnz, FlopOptions::default()).unwrap_err();
    assert!(matches!(err, FlopError::Overflow { .. }), "{err}");
}

/// A frozen model's step (prompt tuning) on tiny, T = 2 x 10 positions, dense: per layer the
/// forward's linears 2 T 12 d^2 = 1,966,080 and attention 4 B S^2 d = 51,200, the input
/// gradient's linears the same again and attention 8 B S^2 d = 102,400, so 4,085,760 per layer,
/// 8,171,520 for 2; the LM head 2 T d V forward and again backward: 2 x 655,360. In all
/// 9,482,240 matmul FLOPs. With the weight gradients, the whole report.
#[test]
fn a_step_without_weight_gradients_by_hand() {
    let config = GptConfig::preset("tiny").unwrap();
    let r = report(&config, StepShape { batch: 2, seq: 10 }, 0.0, false);
    let frozen = r.of_step(false);
    assert_eq!(
        (frozen.matmul_sparse, frozen.matmul_dense),
        (9_482_240, 9_482_240)
    );
    assert_eq!(
        frozen.non_matmul,
        r.non_matmul() - phase_sum(&r, Phase::WeightGrad, false)
            + r.get(None, OpKind::Embedding, Phase::WeightGrad)
                .unwrap()
                .dense,
        "every weight-gradient op but the embedding's scatter"
    );
    let all = r.of_step(true);
    assert_eq!(
        (all.matmul_sparse, all.matmul_dense, all.non_matmul),
        (r.matmul_sparse(), r.matmul_dense(), r.non_matmul())
    );
}
