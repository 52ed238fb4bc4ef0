//! A whole training step on the fabric against the CPU reference: the same loss and the same
//! gradients, for several sparsities and fabric sizes; and the executed FLOPs equal to the
//! analytic count.

use wafersim::compile::plan_step;
use wafersim::flops::{self, FlopOptions, NnzSource, StepShape};
use wafersim::model::{GptConfig, GptParams, init_params};
use wafersim::reference::{self, Batch};
use wafersim::runtime::{GradientSet, LossScale, StepInputs, run_step};
use wafersim::sparsity::ModelMasks;
use wafersim_kernels::Precision;
use wafersim_sim::FabricConfig;

fn batch(config: &GptConfig, b: usize, s: usize) -> Batch {
    let tokens = (0..b * s)
        .map(|i| ((i * 37 + 11) % config.vocab_size) as u32)
        .collect();
    Batch::new(config, b, s, tokens).unwrap()
}

fn norm(v: impl IntoIterator<Item = f64>) -> f64 {
    v.into_iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// L2 distance of `got` from `want` relative to `want`'s norm, or to `floor` when `want` is
/// (mathematically) zero: the key bias's gradient vanishes exactly by the softmax's shift
/// invariance, and its reference value is 1e-19 of rounding.
fn rel_l2(got: &[f32], want: &[f32], floor: f64) -> f64 {
    let diff = norm(
        got.iter()
            .zip(want)
            .map(|(g, w)| f64::from(*g) - f64::from(*w)),
    );
    diff / norm(want.iter().map(|w| f64::from(*w))).max(floor)
}

/// Runs one step and compares; `floor` is the fraction of the whole gradient's norm below which
/// a tensor's error is measured absolutely (see [`rel_l2`]).
fn check(
    sparsity: f64,
    fabric: FabricConfig,
    precision: Precision,
    loss_tol: f64,
    grad_tol: f64,
    floor: f64,
) {
    let config = GptConfig::preset("tiny").unwrap();
    let mut params: GptParams = init_params(&config, 3);
    let masks = ModelMasks::random(&config, sparsity, 5).unwrap();
    masks.apply(&mut params).unwrap();
    let batch = batch(&config, 2, 16);
    let plan = plan_step(&config, batch.batch, batch.seq, &fabric, precision).unwrap();
    let inputs = StepInputs {
        config: &config,
        params: &params,
        masks: &masks,
        batch: &batch,
        fabric: &fabric,
        plan: &plan,
        dense_baseline: false,
        prompt: None,
        gradients: GradientSet::All,
        loss_scale: LossScale::Auto,
    };
    let step = run_step(inputs).unwrap();
    let (loss, grads) = reference::loss_and_grads(&config, &params, &masks, &batch).unwrap();

    let rel = (step.loss - f64::from(loss)).abs() / f64::from(loss);
    assert!(
        rel < loss_tol,
        "s {sparsity} {}: loss {} vs {loss} ({rel:e})",
        fabric.name,
        step.loss
    );
    let floor = floor
        * norm(
            grads
                .tensors()
                .iter()
                .flat_map(|(_, t)| t.iter())
                .map(|v| f64::from(*v)),
        );
    for ((name, got), (_, want)) in step.grads.tensors().into_iter().zip(grads.tensors()) {
        let e = rel_l2(got, want, floor);
        assert!(
            e < grad_tol,
            "s {sparsity} {}: gradient {name} off by {e:e} relative L2",
            fabric.name
        );
    }
    // Pruned weights get exactly zero gradient.
    for (l, block) in step.grads.blocks.iter().enumerate() {
        for kind in wafersim::model::SparseKind::ALL {
            let mask = masks.get(l, kind).unwrap();
            let g = &block.linear(kind).weight.data;
            assert!(g.iter().zip(&mask.keep()).all(|(v, &k)| k || *v == 0.0));
        }
    }
    // Executed matmul FLOPs equal the analytic count exactly.
    let nnz = NnzSource::from_fn(&config, |l, k| masks.get(l, k).unwrap().nnz() as u64).unwrap();
    let shape = StepShape {
        batch: batch.batch,
        seq: batch.seq,
    };
    let analytic = flops::step_flops(&config, shape, &nnz, FlopOptions::default()).unwrap();
    assert_eq!(step.cost.executed_matmul_flops(), analytic.matmul_sparse());
}

#[test]
fn fp32_steps_match_the_reference() {
    // fp32 on the fabric against the f64 reference: sums of up to 256 terms in f32 reorder
    // rounding at ~1e-7 relative each; 1e-5 on the loss and 1e-4 on gradients leave margin.
    for sparsity in [0.0, 0.5, 0.75] {
        check(
            sparsity,
            FabricConfig::rectangle(16, 16).unwrap(),
            Precision::F32,
            1e-5,
            1e-4,
            1e-6,
        );
        check(
            sparsity,
            FabricConfig::rectangle(2, 5).unwrap(),
            Precision::F32,
            1e-5,
            1e-4,
            1e-6,
        );
    }
}

#[test]
fn fp16_steps_stay_within_fp16_rounding() {
    // fp16 storage of the matmul inputs and weights rounds each to 2^-11 relative; through two
    // layers and the head that is ~1e-3 on the loss and a few 1e-3 on gradients; a zero
    // gradient is compared at the same 1e-3 of the whole gradient's norm.
    check(
        0.5,
        FabricConfig::rectangle(8, 8).unwrap(),
        Precision::F16,
        2e-3,
        2e-2,
        1e-3,
    );
}

#[test]
fn steps_whose_heads_span_columns_match_the_reference() {
    // tiny has 4 heads of 16 features. The region takes the fabric's width up to the 64
    // features: 16 columns of 4 features on 16 x 16 (each head over 4 columns), 12 columns on
    // 12 x 4 (6, 6, 6, 6 then 5 features: column 2 holds features 12-17, the end of head 0 and
    // the start of head 1, so it sums partial scores with both neighbours' groups).
    let tiny = GptConfig::preset("tiny").unwrap();
    for (width, height, cols) in [(16, 16, 16), (12, 4, 12), (8, 8, 8)] {
        let fabric = FabricConfig::rectangle(width, height).unwrap();
        let plan = plan_step(&tiny, 2, 16, &fabric, Precision::F32).unwrap();
        assert_eq!(plan.region.cols, cols, "{width} x {height}");
    }
    check(
        0.5,
        FabricConfig::rectangle(12, 4).unwrap(),
        Precision::F32,
        1e-5,
        1e-4,
        1e-6,
    );
}
