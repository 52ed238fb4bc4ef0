//! Full-wafer scale (issue 5): steps cut into passes of a micro-batch, attention recomputed in
//! the backward pass, and costing without weights. What is asserted: a step costs the sum of its
//! passes; the exact engine's gradients accumulated over passes are the whole batch's; a plan
//! that keeps only the softmax statistics runs the blocked attention (costed by its formulas,
//! run exactly against the CPU reference); a fast step without numerics writes the report
//! only, with its passes and tokens per second.

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use wafersim::compile::{StepPlan, plan_step};
use wafersim::flops::Phase;
use wafersim::reference::{self, Batch};
use wafersim::runtime::{
    CostInputs, Fidelity, GradientSet, OpRecord, StepCost, StepMode, cost_step, run_step,
    simulate_step,
};
use wafersim_kernels::{AttentionShape, BlockedAttention, BlockedAttentionBackward, Precision};

#[path = "common/tiny.rs"]
mod tiny;
use tiny::{Tiny, tiny};

impl Tiny {
    fn plan(&self) -> StepPlan {
        plan_step(
            &self.config,
            self.batch.batch,
            self.batch.seq,
            &self.fabric,
            Precision::F32,
        )
        .unwrap()
    }

    fn cost(&self, plan: &StepPlan, batch: &Batch) -> StepCost {
        cost_step(CostInputs {
            config: &self.config,
            masks: &self.masks,
            batch,
            fabric: &self.fabric,
            plan,
            dense_baseline: true,
            prompt_len: 0,
            gradients: GradientSet::All,
        })
        .unwrap()
    }

    /// Sequence `i` of the batch alone.
    fn sequence(&self, i: usize) -> Batch {
        let s = self.batch.seq;
        let tokens = self.batch.tokens[i * s..(i + 1) * s].to_vec();
        Batch::new(&self.config, 1, s, tokens).unwrap()
    }
}

/// Three sequences in passes of one: the records are those of three one-sequence steps, in
/// order (each marked with its pass), and the cycles their sum.
#[test]
fn a_step_in_passes_costs_the_sum_of_its_passes() {
    let t = tiny(3, 16);
    let mut plan = t.plan();
    assert_eq!(plan.micro_batch, 3, "48 tokens fit the 8 x 8 PEs at once");
    plan.micro_batch = 1;
    let whole = t.cost(&plan, &t.batch);
    let one = plan.passes().remove(0).plan;
    assert_eq!(one.batch, 1);
    let parts: Vec<StepCost> = (0..3).map(|i| t.cost(&one, &t.sequence(i))).collect();
    let concatenated: Vec<_> = (parts.iter().enumerate())
        .flat_map(|(pass, c)| {
            c.records
                .iter()
                .map(move |r| OpRecord { pass, ..r.clone() })
        })
        .collect();
    assert_eq!(whole.records, concatenated);
    assert_eq!(
        whole.cycles(),
        parts.iter().map(StepCost::cycles).sum::<u64>()
    );
    // One pass of 48 tokens costs less than three of 16: each pass streams every weight
    // again, and the per-weight work does not shrink with the tokens.
    let at_once = t.cost(&t.plan(), &t.batch);
    assert!(at_once.cycles() < whole.cycles());
    assert_eq!(
        at_once.executed_matmul_flops(),
        whole.executed_matmul_flops(),
        "the same FLOPs either way"
    );
}

/// The exact engine over two passes of one sequence: the loss and gradients of the whole
/// batch (each pass's weighted by its half of the predicted tokens), as the reference computes
/// them in one go.
#[test]
fn gradients_accumulated_over_passes_are_the_whole_batch_gradients() {
    let t = tiny(2, 8);
    let mut plan = t.plan();
    plan.micro_batch = 1;
    let run = run_step(t.inputs(&plan)).unwrap();
    assert_eq!(run.cost.records.len() % 2, 0);
    let (loss, grads) =
        reference::loss_and_grads(&t.config, &t.params, &t.masks, &t.batch).unwrap();
    assert!(
        (run.loss - f64::from(loss)).abs() < 1e-5 * f64::from(loss),
        "loss {} vs {loss}",
        run.loss
    );
    for ((name, got), (_, want)) in run.grads.tensors().into_iter().zip(grads.tensors()) {
        let scale = want.iter().fold(0f32, |m, w| m.max(w.abs())).max(1e-3);
        let worst = got
            .iter()
            .zip(want)
            .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
        assert!(
            worst < 1e-3 * scale,
            "{name}: off by {worst} (scale {scale})"
        );
    }
}

/// A plan that keeps only the softmax statistics runs the blocked attention kernels: on the fast
/// engine each layer's attention records are the blocked kernels' formulas (forward, and the
/// backward with its prelude and recompute), with the same FLOPs as a plan that keeps the
/// probabilities; no other record changes.
#[test]
fn keeping_the_statistics_costs_the_blocked_attention_and_nothing_else_changes() {
    let t = tiny(2, 16);
    let kept = t.plan();
    let blocked = StepPlan {
        attention_block_rows: 2,
        ..kept.clone()
    };
    let (a, b) = (t.cost(&kept, &t.batch), t.cost(&blocked, &t.batch));
    assert_eq!(a.records.len(), b.records.len());
    // One pass of the whole batch: the kernels over the plan's region and both sequences.
    assert_eq!(blocked.micro_batch, 2);
    let shape = AttentionShape {
        batch: 2,
        seq_len: 16,
        heads: t.config.n_head,
        features: t.config.n_embd,
        scale: 1.0,
    };
    let forward = BlockedAttention {
        region: blocked.region,
        shape,
        block_rows: 2,
        q: &[],
        k: &[],
        v: &[],
    };
    let backward = BlockedAttentionBackward {
        region: blocked.region,
        shape,
        block_rows: 2,
        q: &[],
        k: &[],
        v: &[],
        out: &[],
        d_out: &[],
        max: &[],
        sum: &[],
    };
    let forward = forward.estimate_cycles(&t.fabric).unwrap();
    let backward = backward.estimate_cycles(&t.fabric).unwrap();
    for (x, y) in a.records.iter().zip(&b.records) {
        assert_eq!(x.op, y.op);
        assert_eq!(x.fmacs, y.fmacs, "{:?}", x.op);
        if x.op.name == "attention" {
            let want = if x.op.phase == Phase::Forward {
                forward
            } else {
                backward
            };
            assert_eq!(y.cycles, want, "{:?}", y.op);
        } else {
            assert_eq!(x, y);
        }
    }
}

/// The exact engine runs the blocked attention where the plan keeps only the statistics: the
/// loss and every gradient agree with the CPU reference, with key blocks of one row and of
/// three (each attention executes the kept plan's FMACs, its backward the recompute's `Q K^T`
/// besides, which `simulate_step` checks), and the attention costs what its kernels' runs
/// cost.
#[test]
fn the_exact_engine_runs_the_blocked_attention_where_the_statistics_are_kept() {
    let t = tiny(2, 8);
    let kept = t.plan();
    let mode = StepMode {
        fidelity: Fidelity::Exact,
        numerics: true,
        check: true,
    };
    let probabilities = simulate_step(t.inputs(&kept), mode).unwrap();
    for rows in [1, 3] {
        let plan = StepPlan {
            attention_block_rows: rows,
            ..kept.clone()
        };
        let report = simulate_step(t.inputs(&plan), mode).unwrap();
        let check = report.check.as_ref().unwrap();
        assert!(check.within(), "{rows} rows per block: {check:?}");
        // As close as the unblocked kernels come: the worst tensor is K's bias, whose true
        // gradient is 0 (a softmax ignores a constant added to a query's scores), so its
        // distance is rounding measured against the floor.
        let unblocked = probabilities.check.as_ref().unwrap();
        eprintln!("{rows} rows per block: {check:?}, unblocked {unblocked:?}");
        assert!(check.loss_error < 1e-6, "{check:?}");
        assert!(
            check.gradient_error < 3.0 * unblocked.gradient_error,
            "{check:?}"
        );
        let fmacs = |r: &wafersim::runtime::StepReport| -> Vec<u64> {
            r.cost.records.iter().map(|r| r.fmacs).collect()
        };
        assert_eq!(fmacs(&report), fmacs(&probabilities));
    }
}

fn wafersim(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_wafersim"))
        .args(args)
        .output()
        .expect("the wafersim binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// tiny, 4 sequences of 64 tokens on 16 x 16 PEs of 3,700 bytes: the probabilities of one
/// sequence need 4,640 bytes, its two statistics per head 2,656, and the largest kernel (the
/// GELU backward) 1,024 more (see `compile.rs`'s tests), so one sequence per pass, the
/// attention blocked.
const SMALL_SRAM: &str = r#"{"name": "small", "width": 16, "height": 16, "sram_bytes": 3700}"#;

#[test]
fn a_step_without_numerics_reports_passes_and_the_exact_one_runs_the_blocked_attention() {
    let tmp = tempfile::tempdir().unwrap();
    let fabric = tmp.path().join("small.json");
    std::fs::write(&fabric, SMALL_SRAM).unwrap();
    let out = tmp.path().join("out");
    let args = |fidelity: &'static str| {
        vec![
            "step".to_string(),
            "--batch".into(),
            "4".into(),
            "--seq".into(),
            "64".into(),
            "--sparsity".into(),
            "0.5".into(),
            "--fabric".into(),
            fabric.display().to_string(),
            "--fidelity".into(),
            fidelity.into(),
            "--no-numerics".into(),
            "--out".into(),
            out.display().to_string(),
        ]
    };
    let fast = args("fast");
    let (code, stdout, stderr) = wafersim(&fast.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(
            "passes: 4, each of up to 1 sequence (64 tokens), attention probabilities recomputed"
        ),
        "{stdout}"
    );
    assert_eq!(listing(&out), vec!["report.json"]);
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(r["passes"]["count"], 4);
    assert_eq!(r["passes"]["micro_batch"], 1);
    assert_eq!(r["passes"]["attention_recomputed"], true);
    // 2 layers x the recomputed scores x 2 FLOPs x B S^2 d = 4 x 4 x 64^2 x 64.
    assert_eq!(r["passes"]["recompute_flops"], 4 * 4 * 64 * 64 * 64);
    let cycles = r["cycles"]["total"].as_f64().unwrap();
    let clock = r["fabric"]["clock_mhz"].as_f64().unwrap();
    let tokens_per_second = r["tokens_per_second"].as_f64().unwrap();
    let expected = 256.0 / (cycles / (clock * 1e6));
    assert!((tokens_per_second - expected).abs() < 1e-9 * expected);
    // The exact fidelity runs the same kind of plan (one sequence here, to keep the test short:
    // one thread, as the step's cycles do not depend on it): the blocked attention, executing
    // the analytic FLOPs, with the recompute's counted apart as the fast step counts them.
    std::fs::remove_dir_all(&out).unwrap();
    let mut exact = args("exact");
    exact[2] = "1".into();
    let exact = [&["--threads".to_string(), "1".to_string()][..], &exact[..]].concat();
    let (code, stdout, stderr) = wafersim(&exact.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("blocked kernels, key blocks of"),
        "{stdout}"
    );
    let e: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(e["passes"]["attention_recomputed"], true);
    assert_eq!(
        e["flops"]["executed_matmul"],
        e["flops"]["analytic_matmul_sparse"]
    );
    // A quarter of the four sequences' recompute.
    assert_eq!(e["passes"]["recompute_flops"], 4 * 64 * 64 * 64);
}
