//! A matrix that keeps every weight is its own dense baseline: `step` and `gemm` simulate its
//! kernels once, not a second time for the baseline, and report the same figures. And a step
//! simulates the baseline of each weight shape once: every layer after the first adds none.
//!
//! Measured with the engine's process-wide event counter ([`events_processed`]), so this file
//! holds a single test: nothing else runs in its process while it counts.

use wafersim::compile::plan_step;
use wafersim::flops::Phase;
use wafersim::gemm::{GemmSpec, run_gemm};
use wafersim::model::{GptConfig, init_params};
use wafersim::reference::Batch;
use wafersim::runtime::{
    Fidelity, GradientSet, LossScale, OpRecord, StepInputs, StepRun, run_step,
};
use wafersim::sparsity::ModelMasks;
use wafersim_kernels::{Precision, Region, StreamMatmul, StreamedMatrix};
use wafersim_sim::{FabricConfig, RunOptions, events_processed};

/// What `f` returns and the engine events it processed.
fn counting<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let before = events_processed();
    let out = f();
    (out, events_processed() - before)
}

/// One exact step of the tiny model (with `layers` blocks) at `sparsity`, with or without the
/// dense baseline.
fn tiny_step(layers: usize, sparsity: f64, dense_baseline: bool) -> StepRun {
    let config = GptConfig {
        n_layer: layers,
        ..GptConfig::preset("tiny").unwrap()
    };
    let mut params = init_params(&config, 3);
    let masks = ModelMasks::random(&config, sparsity, 5).unwrap();
    masks.apply(&mut params).unwrap();
    let tokens = (0..16)
        .map(|i| (i * 37 + 11) % config.vocab_size as u32)
        .collect();
    let batch = Batch::new(&config, 2, 8, tokens).unwrap();
    let fabric = FabricConfig::rectangle(8, 8).unwrap();
    let plan = plan_step(&config, 2, 8, &fabric, Precision::F32).unwrap();
    run_step(StepInputs {
        config: &config,
        params: &params,
        masks: &masks,
        batch: &batch,
        fabric: &fabric,
        plan: &plan,
        dense_baseline,
        prompt: None,
        gradients: GradientSet::All,
        loss_scale: LossScale::Auto,
    })
    .unwrap()
}

#[test]
fn each_dense_baseline_is_simulated_once() {
    // A dense step: the baseline adds no event and its cycles are the step's.
    let (plain, plain_events) = counting(|| tiny_step(2, 0.0, false));
    let (with, with_events) = counting(|| tiny_step(2, 0.0, true));
    assert_eq!(with_events, plain_events);
    assert_eq!(with.cost.dense_cycles(), plain.cost.cycles());
    // A sparse one simulates its baseline, as many events for two layers as for one (the
    // second layer's shapes are the first's), and costs each of its operations as the dense
    // step does.
    let baseline_events = |layers| {
        let (_, without) = counting(|| tiny_step(layers, 0.5, false));
        let (sparse, with) = counting(|| tiny_step(layers, 0.5, true));
        (sparse, with - without)
    };
    let (_, one_layer) = baseline_events(1);
    let (sparse, two_layers) = baseline_events(2);
    assert!(one_layer > 0);
    assert_eq!(two_layers, one_layer);
    let streamed = |run: &StepRun, cycles: fn(&OpRecord) -> u64| -> Vec<u64> {
        let records = run.cost.records.iter();
        let weights = ["q", "k", "v", "attn_proj", "fc", "fc_proj"];
        records
            .filter(|r| weights.contains(&r.op.name))
            .map(cycles)
            .collect()
    };
    let baselines = streamed(&sparse, |r| r.dense_cycles);
    assert_eq!(baselines.len(), 2 * 3 * 6);
    assert_eq!(baselines, streamed(&plain, |r| r.cycles));

    // `gemm` at sparsity 0: as many events as one run of the product's kernel.
    let (t, k, n, region) = (16, 24, 20, Region::at_origin(4, 4));
    let fabric = FabricConfig::rectangle(8, 8).unwrap();
    let spec = GemmSpec {
        tokens: t,
        k,
        n,
        sparsity: 0.0,
        phases: vec![Phase::Forward],
        precision: Precision::F16,
        seed: 7,
        region: Some(region),
        cycle_limit: None,
        fidelity: Fidelity::Exact,
        numerics: true,
    };
    let (report, gemm_events) = counting(|| run_gemm(&spec, &fabric).unwrap());
    assert_eq!(report.phases[0].dense_cycles, report.phases[0].cycles);
    let x: Vec<f32> = (0..t * k).map(|i| (i % 7) as f32 * 0.25).collect();
    let values: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.5 - 1.0).collect();
    let w = StreamedMatrix::from_dense(k, n, &values, None);
    let product = StreamMatmul {
        region,
        tokens: t,
        x: &x,
        w: &w,
        bias: None,
        precision: Precision::F16,
    };
    let run = product.run(&fabric, RunOptions::default()).unwrap();
    assert_eq!(gemm_events, run.stats.events);
    assert_eq!(report.phases[0].cycles, run.stats.cycles);
}
