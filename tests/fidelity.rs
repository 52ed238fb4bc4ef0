//! The fast fidelity against the exact engine (issue 5's "done when"): single layers on several
//! fabrics, sparsities and precisions, and whole training steps of the tiny model. Fast must be
//! within 5 % of exact on total cycles and within 10 % on every operation, report the same
//! operations in the same order, and count the same FLOPs. The table it prints is the one in
//! `docs/fidelity.md` (`cargo test --test fidelity -- --nocapture`).

use wafersim::compile::plan_step;
use wafersim::flops::Phase;
use wafersim::gemm::{GemmReport, GemmSpec, run_gemm};
use wafersim::model::{GptConfig, init_params};
use wafersim::reference::Batch;
use wafersim::runtime::{
    Fidelity, GradientSet, LossScale, StepInputs, StepMode, StepReport, simulate_step,
};
use wafersim::sparsity::ModelMasks;
use wafersim_kernels::{Precision, Region};
use wafersim_sim::FabricConfig;

const TOTAL: f64 = 0.05;
const PER_OP: f64 = 0.10;

/// One row of the agreement table.
struct Row {
    what: String,
    exact: u64,
    fast: u64,
    dense_exact: u64,
    dense_fast: u64,
    /// The largest per-operation error and the operation.
    worst_op: (f64, String),
    /// Every operation of a step outside its last block: label, exact and fast cycles (the
    /// per-operation table of the docs; empty for a gemm).
    ops: Vec<(String, u64, u64)>,
}

impl Row {
    fn error(&self) -> f64 {
        rel(self.fast, self.exact)
    }

    fn print(&self) {
        eprintln!(
            "| {} | {} | {} | {:+.2} % | {} | {} | {:+.2} % | {:+.2} % ({}) |",
            self.what,
            self.exact,
            self.fast,
            100.0 * self.error(),
            self.dense_exact,
            self.dense_fast,
            100.0 * rel(self.dense_fast, self.dense_exact),
            100.0 * self.worst_op.0,
            self.worst_op.1
        );
    }

    fn print_ops(&self) {
        if self.ops.is_empty() {
            return;
        }
        eprintln!("\nper operation, {}:\n", self.what);
        eprintln!("| operation | exact | fast | error |");
        eprintln!("|---|---:|---:|---:|");
        for (label, exact, fast) in &self.ops {
            let error = 100.0 * rel(*fast, *exact);
            eprintln!("| {label} | {exact} | {fast} | {error:+.2} % |");
        }
    }

    fn check(&self) {
        assert!(
            self.error().abs() < TOTAL,
            "{}: fast {} vs exact {}",
            self.what,
            self.fast,
            self.exact
        );
        assert!(
            rel(self.dense_fast, self.dense_exact).abs() < TOTAL,
            "{}: dense fast {} vs exact {}",
            self.what,
            self.dense_fast,
            self.dense_exact
        );
        assert!(
            self.worst_op.0.abs() < PER_OP,
            "{}: {} off by {:.2} %",
            self.what,
            self.worst_op.1,
            100.0 * self.worst_op.0
        );
    }
}

fn rel(fast: u64, exact: u64) -> f64 {
    fast as f64 / exact as f64 - 1.0
}

fn worse(worst: (f64, String), error: f64, what: impl FnOnce() -> String) -> (f64, String) {
    if error.abs() > worst.0.abs() {
        (error, what())
    } else {
        worst
    }
}

fn gemm_row(
    (t, k, n): (usize, usize, usize),
    sparsity: f64,
    (cols, rows): (u32, u32),
    precision: Precision,
    sram: Option<u32>,
) -> Row {
    let mut fabric = FabricConfig::rectangle(cols + 1, rows + 1).unwrap();
    if let Some(bytes) = sram {
        fabric.sram_bytes = bytes;
    }
    let spec = |fidelity| GemmSpec {
        tokens: t,
        k,
        n,
        sparsity,
        phases: Phase::ALL.to_vec(),
        precision,
        seed: 11,
        region: Some(Region::at_origin(cols, rows)),
        cycle_limit: None,
        fidelity,
        numerics: false,
    };
    let exact: GemmReport = run_gemm(&spec(Fidelity::Exact), &fabric).unwrap();
    let fast: GemmReport = run_gemm(&spec(Fidelity::Fast), &fabric).unwrap();
    let mut worst_op = (0.0, String::new());
    for (e, f) in exact.phases.iter().zip(&fast.phases) {
        assert_eq!(e.phase, f.phase);
        assert_eq!(e.flops_executed, f.flops_executed, "{:?}", e.phase);
        worst_op = worse(worst_op, rel(f.cycles, e.cycles), || e.phase.name().into());
        worst_op = worse(worst_op, rel(f.dense_cycles, e.dense_cycles), || {
            format!("{} dense", e.phase.name())
        });
    }
    let fp = if precision == Precision::F32 { 32 } else { 16 };
    let chunks = sram.map_or(String::new(), |b| format!(", {b} B SRAM"));
    Row {
        what: format!("gemm {t}x{k}x{n}, s {sparsity}, {cols}x{rows}, fp{fp}{chunks}"),
        exact: exact.cycles(),
        fast: fast.cycles(),
        dense_exact: exact.dense_cycles(),
        dense_fast: fast.dense_cycles(),
        worst_op,
        ops: Vec::new(),
    }
}

fn step_row(sparsity: f64, fabric: (u32, u32), precision: Precision) -> Row {
    let config = GptConfig::preset("tiny").unwrap();
    let mut params = init_params(&config, 3);
    let masks = ModelMasks::random(&config, sparsity, 5).unwrap();
    masks.apply(&mut params).unwrap();
    let tokens = (0..64)
        .map(|i| ((i * 37 + 11) % config.vocab_size) as u32)
        .collect();
    let batch = Batch::new(&config, 2, 32, tokens).unwrap();
    let fabric = FabricConfig::rectangle(fabric.0, fabric.1).unwrap();
    let plan = plan_step(&config, 2, 32, &fabric, precision).unwrap();
    let inputs = StepInputs {
        config: &config,
        params: &params,
        masks: &masks,
        batch: &batch,
        fabric: &fabric,
        plan: &plan,
        dense_baseline: true,
        prompt: None,
        gradients: GradientSet::All,
        loss_scale: LossScale::Auto,
    };
    let run = |fidelity| -> StepReport {
        let mode = StepMode {
            fidelity,
            numerics: false,
            check: false,
        };
        simulate_step(inputs, mode).unwrap()
    };
    let (exact, fast) = (run(Fidelity::Exact), run(Fidelity::Fast));
    assert!(exact.numerics.is_none() && fast.numerics.is_none());
    assert_eq!(exact.cost.records.len(), fast.cost.records.len());
    let mut worst_op = (0.0, String::new());
    let mut ops = Vec::new();
    let last_block = Some(config.n_layer - 1);
    for (e, f) in exact.cost.records.iter().zip(&fast.cost.records) {
        assert_eq!(e.op, f.op, "the same operations in the same order");
        assert_eq!(e.fmacs, f.fmacs, "{}", e.op.label());
        worst_op = worse(worst_op, rel(f.cycles, e.cycles), || e.op.label());
        if e.op.layer != last_block || config.n_layer == 1 {
            ops.push((e.op.label(), e.cycles, f.cycles));
        }
    }
    let fp = if precision == Precision::F32 { 32 } else { 16 };
    Row {
        what: format!(
            "tiny step, s {sparsity}, {}x{} fabric (region {}x{}), fp{fp}",
            fabric.width, fabric.height, plan.region.cols, plan.region.rows
        ),
        exact: exact.cost.cycles(),
        fast: fast.cost.cycles(),
        dense_exact: exact.cost.dense_cycles(),
        dense_fast: fast.cost.dense_cycles(),
        worst_op,
        ops,
    }
}

#[test]
fn fast_agrees_with_exact_on_layers_and_whole_steps() {
    let rows = vec![
        gemm_row((64, 64, 64), 0.0, (8, 8), Precision::F32, None),
        gemm_row((64, 64, 256), 0.5, (8, 8), Precision::F16, None),
        gemm_row((64, 256, 64), 0.75, (8, 8), Precision::F32, None),
        gemm_row((32, 128, 128), 0.9, (4, 4), Precision::F16, None),
        gemm_row((128, 64, 64), 0.75, (4, 8), Precision::F32, None),
        gemm_row((48, 96, 80), 0.5, (3, 5), Precision::F16, None),
        gemm_row((16, 32, 32), 0.9, (2, 2), Precision::F32, None),
        gemm_row((64, 64, 256), 0.75, (8, 2), Precision::F32, Some(12_288)),
        // A row of 64 columns in a MediSwift-XL step's per-PE regime: 6 tokens and 3 features.
        gemm_row((12, 192, 192), 0.75, (64, 2), Precision::F32, None),
        step_row(0.0, (16, 16), Precision::F32),
        step_row(0.5, (16, 16), Precision::F32),
        step_row(0.9, (16, 16), Precision::F32),
        step_row(0.75, (8, 8), Precision::F16),
    ];
    eprintln!(
        "| configuration | exact | fast | error | dense exact | dense fast | dense error | worst operation |"
    );
    eprintln!("|---|---:|---:|---:|---:|---:|---:|---|");
    for row in &rows {
        row.print();
    }
    for row in rows
        .iter()
        .filter(|r| r.what.starts_with("tiny step, s 0.5,"))
    {
        row.print_ops();
    }
    for row in &rows {
        row.check();
    }
}

#[test]
fn fast_numerics_are_the_reference_and_can_be_left_out() {
    let config = GptConfig::preset("tiny").unwrap();
    let mut params = init_params(&config, 1);
    let masks = ModelMasks::random(&config, 0.5, 2).unwrap();
    masks.apply(&mut params).unwrap();
    let batch = Batch::new(&config, 1, 8, (0..8).collect()).unwrap();
    let fabric = FabricConfig::rectangle(4, 8).unwrap();
    let plan = plan_step(&config, 1, 8, &fabric, Precision::F32).unwrap();
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
    let mode = |numerics| StepMode {
        fidelity: Fidelity::Fast,
        numerics,
        check: false,
    };
    let with = simulate_step(inputs, mode(true)).unwrap();
    let numerics = with.numerics.expect("asked for");
    let (loss, grads) =
        wafersim::reference::loss_and_grads(&config, &params, &masks, &batch).unwrap();
    assert_eq!(numerics.loss, f64::from(loss));
    assert_eq!(numerics.grads.tensors(), grads.tensors());
    let without = simulate_step(inputs, mode(false)).unwrap();
    assert!(without.numerics.is_none());
    assert_eq!(without.cost, with.cost, "numerics do not change the cycles");
    assert_eq!(with.fidelity, Fidelity::Fast);
}
