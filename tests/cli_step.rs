//! `wafersim step` driven as a user would: the built binary, real folders and files.
//!
//! A run writes four files that agree with each other and with independent arithmetic (FLOPs by
//! the convention's formula, AdamW's first step by hand, the CPU reference on the saved weights);
//! the same seed gives the same bytes; every bad input ends with exit code 2 (1 for a step that
//! cannot run), one `error:` line naming the problem, no panic, and nothing left in `--out`.
//! Everything runs the `tiny` preset on a 2 x 2 fabric with 2 x 8 tokens: under a second per
//! step.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use wafersim::model::checkpoint::read_params;
use wafersim::model::{GptConfig, GptParams, SparseKind};
use wafersim::reference::{self, Batch};
use wafersim::sparsity::ModelMasks;

mod common;
use common::{Run, assert_fails, path_str, wafersim};

const OUTPUTS: [&str; 4] = [
    "grads.safetensors",
    "report.json",
    "updated.safetensors",
    "weights.safetensors",
];

/// `wafersim step` writing to `out` with `extra` arguments, on the tiny preset and a 2 x 2 fabric
/// unless `extra` names others.
fn step(out: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["step", "--out", path_str(out)];
    for (flag, default) in [("--model", "tiny"), ("--fabric", "2x2")] {
        let given = extra.contains(&flag) || (flag == "--model" && extra.contains(&"--checkpoint"));
        if !given {
            args.extend_from_slice(&[flag, default]);
        }
    }
    args.extend_from_slice(extra);
    wafersim(&args)
}

/// Like [`step`] with `--batch 2 --seq 8` unless `extra` brings `--tokens`.
fn small_step(out: &Path, extra: &[&str]) -> Run {
    let mut args = extra.to_vec();
    if !extra.contains(&"--tokens") {
        args.extend_from_slice(&["--batch", "2", "--seq", "8"]);
    }
    step(out, &args)
}

fn assert_ok(run: &Run) {
    assert_eq!(run.code, 0, "stderr: {}", run.stderr);
    assert!(run.stderr.is_empty(), "{}", run.stderr);
}

/// The one `warning:` line of a run that succeeded.
fn only_warning(run: &Run) -> &str {
    assert_eq!(run.code, 0, "stderr: {}", run.stderr);
    let warnings: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("warning:"))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", run.stderr);
    warnings[0]
}

/// The names in `dir`, sorted (empty if `dir` does not exist).
fn listing(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn tiny() -> GptConfig {
    GptConfig::preset("tiny").expect("tiny is a preset")
}

fn report(dir: &Path) -> Value {
    let text = fs::read_to_string(dir.join("report.json")).expect("report.json");
    serde_json::from_str(&text).expect("report.json is JSON")
}

fn u64_at(v: &Value, pointer: &str) -> u64 {
    v.pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{pointer} is not an unsigned integer in {v}"))
}

fn f64_at(v: &Value, pointer: &str) -> f64 {
    v.pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{pointer} is not a number"))
}

fn params(dir: &Path, file: &str) -> GptParams {
    read_params(&dir.join(file), &tiny()).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// Whether AdamW decays the tensor called `name` ([`GptParams::tensors`] naming): the
/// embeddings and the Linear weights, not biases nor LayerNorms.
fn decayed(name: &str) -> bool {
    name.ends_with(".weight") && !name.contains("ln_")
}

fn is_sparse(name: &str) -> bool {
    [
        "attn.q.weight",
        "attn.k.weight",
        "attn.v.weight",
        "attn.c_proj.weight",
        "mlp.c_fc.weight",
        "mlp.c_proj.weight",
    ]
    .iter()
    .any(|s| name.ends_with(s))
}

/// Every key anywhere in `v`, with its path.
fn keys(v: &Value, path: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                let p = format!("{path}/{k}");
                out.push(p.clone());
                keys(child, &p, out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                keys(child, &format!("{path}/{i}"), out);
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// A normal run

#[test]
fn a_step_writes_four_files_that_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let run = small_step(&out, &["--sparsity", "0.5", "--seed", "3"]);
    assert_ok(&run);
    assert!(
        run.stdout.starts_with("step: 2 layers x 64"),
        "{}",
        run.stdout
    );
    assert_eq!(listing(&out), OUTPUTS);

    let r = report(&out);
    assert_eq!(r["schema"], "wafersim.step/v1");
    assert_eq!(
        r.pointer("/region/attention/fits"),
        Some(&Value::Bool(true))
    );
    check_flops(&r);
    check_cycles(&r);
    check_loss(&r);
    check_host_is_the_only_wall_time(&r);
    check_passes(&r);

    let weights = params(&out, "weights.safetensors");
    let grads = params(&out, "grads.safetensors");
    let updated = params(&out, "updated.safetensors");
    check_pruning(&weights, &grads, 0.5);
    check_first_adamw_step(&weights, &grads, &updated);
}

/// FLOPs of tiny (L 2, d 64, d_ffn 256, V 256, 4 heads) with B 2, S 8, T 16 tokens at 50 %:
/// - sparse linears, per layer: 3 phases x 2 T x nnz, nnz = 4 x 2048 (Q, K, V, proj: half of
///   64 x 64) + 2 x 8192 (fc, fc_proj: half of 64 x 256) = 24,576: 6 x 16 x 24,576 = 2,359,296;
///   two layers 4,718,592 (dense: 9,437,184);
/// - attention, per layer: scores and values 2 x (2 B S S d) = 32,768, x 3 phases = 98,304;
///   two layers 196,608;
/// - LM head: 3 x 2 T d V = 3 x 2 x 16 x 64 x 256 = 1,572,864.
///
/// Sparse 4,718,592 + 196,608 + 1,572,864 = 6,488,064; dense 9,437,184 + ... = 11,206,656.
#[test]
fn a_run_without_numerics_names_the_files_an_earlier_run_left() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let full = small_step(&out, &[]);
    assert_ok(&full);
    assert_eq!(report(&out)["files"].as_array().unwrap().len(), 4);
    assert_eq!(report(&out)["reference_check"]["within_tolerance"], true);
    let cost_only = small_step(&out, &["--fidelity", "fast", "--no-numerics"]);
    assert_eq!(cost_only.code, 0, "stderr: {}", cost_only.stderr);
    // The three safetensors are the first run's: kept, and named on stderr, one line each; the
    // report lists only itself.
    assert_eq!(listing(&out), OUTPUTS);
    let notes: Vec<&str> = cost_only.stderr.lines().collect();
    assert_eq!(notes.len(), 3, "{}", cost_only.stderr);
    for (note, file) in notes.iter().zip(["weights", "grads", "updated"]) {
        assert!(note.starts_with("note: ") && note.contains(&format!("{file}.safetensors")));
        assert!(note.contains("earlier run"), "{note}");
    }
    assert_eq!(report(&out)["files"], serde_json::json!(["report.json"]));
    assert_eq!(
        report(&out)["reference_check"],
        Value::Null,
        "nothing to check"
    );
}

fn check_flops(r: &Value) {
    assert_eq!(u64_at(r, "/flops/analytic_matmul_sparse"), 6_488_064);
    assert_eq!(u64_at(r, "/flops/analytic_matmul_dense"), 11_206_656);
    assert_eq!(
        u64_at(r, "/flops/executed_matmul"),
        u64_at(r, "/flops/analytic_matmul_sparse")
    );
    let ops = r["ops"].as_array().expect("ops is an array");
    let executed: u64 = ops
        .iter()
        .filter(|op| op["flops_executed"].as_u64() != Some(0))
        .map(|op| u64_at(op, "/flops_executed"))
        .sum();
    assert_eq!(executed, 6_488_064, "the per-op FLOPs add up to the total");
}

fn check_cycles(r: &Value) {
    let total = u64_at(r, "/cycles/total");
    let dense = u64_at(r, "/cycles/dense_baseline");
    // The same f64 division the report states; JSON round-trips an f64 exactly.
    assert_eq!(f64_at(r, "/cycles/reduction"), dense as f64 / total as f64);
    assert!(dense > total, "sparsity saves cycles: {dense} vs {total}");
    let by_phase = r["cycles"]["by_phase"].as_object().expect("by_phase");
    let phase_sum: u64 = by_phase.values().map(|p| u64_at(p, "/cycles")).sum();
    let phase_dense: u64 = by_phase.values().map(|p| u64_at(p, "/dense_cycles")).sum();
    assert_eq!((phase_sum, phase_dense), (total, dense));
    let ops = r["ops"].as_array().expect("ops");
    assert_eq!(ops.iter().map(|o| u64_at(o, "/cycles")).sum::<u64>(), total);
    let clock = f64_at(r, "/fabric/clock_mhz");
    // serde_json's default float parser may be one ulp off the printed shortest form.
    let seconds = total as f64 / (clock * 1e6);
    assert!((f64_at(r, "/seconds") - seconds).abs() <= 2.0 * f64::EPSILON * seconds);
}

/// At initialisation the logits are `h . wte[v]` with `h` the final LayerNorm's output
/// (|h| ~ sqrt(64) = 8) and `wte` entries N(0, 0.02): logit spread ~0.16, so the cross-entropy
/// is ln 256 + ~0.16^2 / 2 = 5.558, give or take sampling noise over 14 predicted tokens.
fn check_loss(r: &Value) {
    let loss = f64_at(r, "/loss");
    assert!(loss.is_finite());
    assert!(
        (loss - 256f64.ln()).abs() < 0.1,
        "loss {loss} is not near ln 256 = {}",
        256f64.ln()
    );
}

/// On 2 x 2 PEs the two sequences run as two passes (`passes.count`): each pass is the whole
/// schedule, so the operations of pass 1 are those of pass 0, in the same order, after them.
fn check_passes(r: &Value) {
    assert_eq!(u64_at(r, "/passes/count"), 2);
    let ops = r["ops"].as_array().unwrap();
    let (first, second) = ops.split_at(ops.len() / 2);
    let names = |ops: &[Value]| -> Vec<String> {
        ops.iter()
            .map(|o| format!("{} {} {}", o["layer"], o["op"], o["phase"]))
            .collect()
    };
    assert!(first.iter().all(|o| o["pass"] == 0));
    assert!(second.iter().all(|o| o["pass"] == 1));
    assert_eq!(names(first), names(second));
}

fn check_host_is_the_only_wall_time(r: &Value) {
    let host = r["host"].as_object().expect("host is an object");
    assert_eq!(host.keys().collect::<Vec<_>>(), ["wall_seconds"]);
    assert!(f64_at(r, "/host/wall_seconds") > 0.0);
    let mut all = Vec::new();
    keys(r, "", &mut all);
    let timed: Vec<&String> = all
        .iter()
        .filter(|k| k.contains("wall") || k.contains("host") || k.contains("elapsed"))
        .collect();
    assert_eq!(timed, ["/host", "/host/wall_seconds"]);
}

/// Exactly round(s * numel) zeros in each sparsified weight (its N(0, 0.02) initialisation never
/// draws an exact 0), and exactly zero gradient there.
fn check_pruning(weights: &GptParams, grads: &GptParams, sparsity: f64) {
    let tensors = weights.tensors().into_iter().zip(grads.tensors());
    for ((name, w), (_, g)) in tensors.filter(|((name, _), _)| is_sparse(name)) {
        let zeros = w.iter().filter(|x| **x == 0.0).count();
        assert_eq!(
            zeros,
            (sparsity * w.len() as f64).round() as usize,
            "{name}"
        );
        let leaked = w.iter().zip(g).filter(|(w, g)| **w == 0.0 && **g != 0.0);
        assert_eq!(leaked.count(), 0, "{name}: pruned weights with a gradient");
    }
}

/// AdamW's first step from zero moments, by hand: `m = (1 - b1) g`, `v = (1 - b2) g^2`, so the
/// bias-corrected `m / (1 - b1) = g` and `sqrt(v / (1 - b2)) = |g|`, and
/// `w' = w (1 - lr wd) - lr g / (|g| + eps)` with lr 6e-4 (the default), wd 0.1 on weight
/// matrices only, eps 1e-8. A weight changes only where its gradient is nonzero or it decays;
/// pruned weights (0 with 0 gradient) stay exactly 0.
fn check_first_adamw_step(weights: &GptParams, grads: &GptParams, updated: &GptParams) {
    let (lr, wd, eps) = (6e-4, 0.1, 1e-8);
    let tensors = weights
        .tensors()
        .into_iter()
        .zip(grads.tensors())
        .zip(updated.tensors());
    for (((name, w), (_, g)), (_, u)) in tensors {
        let decay = if decayed(&name) { 1.0 - lr * wd } else { 1.0 };
        for (i, ((&w, &g), &u)) in w.iter().zip(g).zip(u).enumerate() {
            let (w64, g64) = (f64::from(w), f64::from(g));
            let want = w64 * decay - lr * g64 / (g64.abs() + eps);
            assert!(
                (f64::from(u) - want).abs() < 1e-7,
                "{name}[{i}]: updated {u}, AdamW gives {want}"
            );
            if g == 0.0 && !decayed(&name) {
                assert_eq!(u, w, "{name}[{i}] has no gradient and no decay");
            }
            if w == 0.0 && g == 0.0 {
                assert_eq!(u, 0.0, "{name}[{i}] is pruned");
            }
        }
    }
}

#[test]
fn the_saved_gradients_are_the_references_for_the_saved_weights() {
    // Through the files only: the loss in report.json and grads.safetensors against the CPU
    // reference run on weights.safetensors and the tokens file.
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny();
    let tokens: Vec<u32> = (0..16u32).map(|i| (i * 37 + 11) % 256).collect();
    let rows: Vec<&[u32]> = tokens.chunks(8).collect();
    let tokens_path = tmp.path().join("tokens.json");
    fs::write(&tokens_path, serde_json::to_string(&rows).unwrap()).unwrap();
    let out = tmp.path().join("out");
    let run = small_step(
        &out,
        &[
            "--tokens",
            path_str(&tokens_path),
            "--sparsity",
            "0.75",
            "--no-dense-baseline",
        ],
    );
    assert_ok(&run);

    let weights = params(&out, "weights.safetensors");
    let grads = params(&out, "grads.safetensors");
    let masks = ModelMasks::from_params_zeros(&weights);
    let batch = Batch::new(&config, 2, 8, tokens).unwrap();
    let (loss, want) = reference::loss_and_grads(&config, &weights, &masks, &batch).unwrap();
    let got_loss = f64_at(&report(&out), "/loss");
    let rel = (got_loss - f64::from(loss)).abs() / f64::from(loss);
    assert!(rel < 1e-5, "loss {got_loss} vs reference {loss}");

    // Relative L2 per tensor, against 1e-6 of the whole gradient's norm where the true gradient
    // is zero: the key bias, removed from the loss by softmax's shift invariance.
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let whole: f64 = want
        .tensors()
        .iter()
        .map(|(_, t)| norm(t).powi(2))
        .sum::<f64>()
        .sqrt();
    let mut worst = (0.0, String::new());
    for ((name, g), (_, w)) in grads.tensors().into_iter().zip(want.tensors()) {
        let diff: Vec<f32> = g.iter().zip(w).map(|(a, b)| a - b).collect();
        let e = norm(&diff) / norm(w).max(1e-6 * whole);
        assert!(e < 1e-4, "{name}: relative L2 {e:e}");
        if e > worst.0 {
            worst = (e, name);
        }
    }
    // The report's own check found the same distances.
    let check = &report(&out)["reference_check"];
    assert!((f64_at(check, "/loss_relative_error") - rel).abs() <= 1e-9 * rel.max(1e-12));
    let reported = f64_at(check, "/gradient_relative_l2");
    assert!(
        (reported - worst.0).abs() <= 1e-9 * worst.0,
        "{reported} vs {}",
        worst.0
    );
    assert_eq!(check["worst_gradient"], worst.1.as_str());
    assert_eq!(check["within_tolerance"], true);
    // fp32 scales nothing by default.
    assert_eq!(f64_at(&report(&out), "/loss_scale"), 1.0);
    for kind in SparseKind::ALL {
        assert!(masks.get(0, kind).is_some_and(|m| m.nnz() * 4 == m.numel()));
    }
}

// ---------------------------------------------------------------------------------------------
// Determinism

/// `--no-dense-baseline` times no dense baseline, so the report must not pretend it did.
fn without_the_dense_baseline_the_report_has_no_dense_cycles(r: &Value) {
    assert!(u64_at(r, "/cycles/total") > 0);
    assert_eq!(r["cycles"]["dense_baseline"], Value::Null);
    assert_eq!(r["cycles"]["reduction"], Value::Null);
    let ops = r["ops"].as_array().expect("ops");
    assert!(ops.iter().all(|op| op["dense_cycles"].is_null()));
    let by_phase = r["cycles"]["by_phase"].as_object().expect("by_phase");
    assert!(by_phase.values().all(|p| p["dense_cycles"].is_null()));
}

/// `report.json` without its one wall-time line.
fn report_without_wall_time(dir: &Path) -> String {
    let text = fs::read_to_string(dir.join("report.json")).expect("report.json");
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("\"wall_seconds\""))
        .collect();
    assert_eq!(kept.len() + 1, text.lines().count(), "one wall-time line");
    kept.join("\n")
}

#[test]
fn the_same_seed_writes_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = ["a", "b", "c"].iter().map(|n| tmp.path().join(n)).collect();
    for (dir, seed) in dirs.iter().zip(["7", "7", "8"]) {
        let run = small_step(
            dir,
            &["--sparsity", "0.5", "--seed", seed, "--no-dense-baseline"],
        );
        assert_ok(&run);
    }
    assert_eq!(
        report_without_wall_time(&dirs[0]),
        report_without_wall_time(&dirs[1])
    );
    without_the_dense_baseline_the_report_has_no_dense_cycles(&report(&dirs[0]));
    for file in [
        "weights.safetensors",
        "grads.safetensors",
        "updated.safetensors",
    ] {
        let a = fs::read(dirs[0].join(file)).unwrap();
        assert!(a == fs::read(dirs[1].join(file)).unwrap(), "{file} differs");
        assert!(
            a != fs::read(dirs[2].join(file)).unwrap(),
            "{file} ignores the seed"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

/// Runs `extra` writing to a fresh `out` that must still be absent after the expected failure.
fn fails_without_output(extra: &[&str], code: i32, needles: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let run = step(&out, extra);
    assert_fails(&run, code, needles);
    assert!(run.stdout.is_empty(), "nothing ran: {}", run.stdout);
    assert!(!out.exists(), "{extra:?} left {:?}", listing(&out));
}

/// A tokens file with `json` in a fresh folder; returns the folder (kept alive) and the path.
fn tokens_file(json: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tokens.json");
    fs::write(&path, json).unwrap();
    (tmp, path)
}

#[test]
fn a_model_too_big_for_the_fabric_is_refused_with_bytes() {
    // tiny on 2 x 2 with 2 x 64 tokens: 2 columns (divide the 4 heads), 2 rows. Even one
    // sequence per pass (32 tokens per row) with two softmax statistics per head instead of
    // the probabilities: per layer and token 8 x 32 + 2 x 128 + 4 + 2 heads x 2 = 520 floats,
    // per layer 4 x 32 x 520 = 66,560 bytes; the head 4 x 32 x (2 x 32 + 2 + 128) = 24,832; in
    // all 2 x 66,560 + 24,832 = 157,952 against 48 KiB = 49,152.
    fails_without_output(
        &["--batch", "2", "--seq", "64", "--fabric", "2x2"],
        1,
        &["does not fit", "157952 bytes", "has 49152"],
    );
}

/// One PE of 891,392 bytes (`ONE_PE`): tiny (64 features, 4 heads of 16, 256 FFN features and
/// vocabulary) with one sequence of 64 tokens, all on the one PE. It keeps for the backward pass
/// (two softmax statistics per head; the probabilities, 64 per head, would not fit) per token
/// and layer 8 x 64 + 2 x 256 + 4 + 4 x 2 = 1,036 floats and for the head 2 x 64 + 2 + 256 =
/// 386: 4 x 64 x (2 x 1,036 + 386) = 629,248 bytes, and the GELU backward's X, dY, dX and a
/// scratch tile (4 x 64 x 256 f32, 262,144 bytes) fit beside them, exactly. The blocked attention
/// cannot be cut below one region row, the whole sequence here. Its forward: Q, K, V, O tiles
/// 4 x 64 x 64 = 16,384, statistics 2 x 4 x 64 = 512, the block window 2 x 64 x 64 = 8,192, the
/// scores 4 heads x 64 keys x 64 tokens = 16,384, rows 2 x 64 + 64, a counter: 41,665 f32,
/// 166,660 bytes. Its backward: Q, K, V, dO, dQ, dK, dV tiles 7 x 4,096 = 28,672, statistics
/// and D 3 x 256, window and partial dK, dV 16,384, scores and dP 32,768, a counter: 78,593 f32,
/// 314,372 bytes, of which all but the Q, K, V tiles and the statistics come on top of the kept
/// activations: 65,793 f32, 263,172 bytes, 1,028 more than the GELU's.
const ONE_PE: &str = r#"{"name": "one", "width": 1, "height": 1, "sram_bytes": 891392}"#;
const LONG_ATTENTION: [&str; 4] = ["--batch", "1", "--seq", "64"];

#[test]
fn an_attention_too_big_for_the_sram_is_refused_exactly_and_flagged_when_costed() {
    let tmp = tempfile::tempdir().unwrap();
    let fabric = tmp.path().join("one.json");
    fs::write(&fabric, ONE_PE).unwrap();
    let mut args = LONG_ATTENTION.to_vec();
    args.extend_from_slice(&["--fabric", path_str(&fabric)]);
    let needles = [
        "attention does not fit",
        "166660 B (forward) and 314372 B (backward), of which 263172 B come on top of the 629248 B",
    ];
    fails_without_output(&args, 1, &needles);
    let out = tmp.path().join("out");
    args.extend_from_slice(&["--fidelity", "fast", "--no-numerics"]);
    let run = step(&out, &args);
    let warning = only_warning(&run);
    assert!(warning.contains(needles[1]), "{warning}");
    let r = report(&out);
    assert_eq!(
        u64_at(&r, "/region/attention/forward_bytes_per_pe"),
        166_660
    );
    assert_eq!(
        u64_at(&r, "/region/attention/backward_bytes_per_pe"),
        314_372
    );
    assert_eq!(
        u64_at(&r, "/region/attention/beyond_resident_bytes_per_pe"),
        263_172
    );
    assert_eq!(u64_at(&r, "/region/attention/block_rows"), 1);
    assert_eq!(
        r.pointer("/region/attention/fits"),
        Some(&Value::Bool(false))
    );
}

#[test]
fn the_fast_fidelity_warns_on_latencies_its_formulas_were_not_checked_on() {
    let tmp = tempfile::tempdir().unwrap();
    let fabric = tmp.path().join("slow.toml");
    fs::write(
        &fabric,
        "base = \"2x2\"\nqueue_depth = 1\nramp_latency = 6\n",
    )
    .unwrap();
    let fabric = path_str(&fabric);
    let fast = small_step(
        &tmp.path().join("fast"),
        &["--fabric", fabric, "--fidelity", "fast", "--no-numerics"],
    );
    let warning = only_warning(&fast);
    for needle in [
        "queue_depth 1 (validated: 4)",
        "ramp_latency 6 (validated: 2)",
    ] {
        assert!(warning.contains(needle), "{warning}");
    }
    // The exact fidelity simulates those latencies: nothing to warn about.
    let exact = small_step(&tmp.path().join("exact"), &["--fabric", fabric]);
    assert_ok(&exact);
}

#[test]
fn a_huge_model_is_refused_before_its_weights_exist() {
    // 1.3 B parameters would take ~24 s and 6 GB to initialise; the fit check comes first.
    // Region 100 x 100: 21 tokens per row; per column 21 of d, 82 of d_ffn, 503 of the
    // vocabulary and up to 2 heads, two softmax statistics each (recomputed attention): per
    // layer 4 * 21 * (8 * 21 + 2 * 82 + 4 + 2 * 2) = 28,560 bytes; the head
    // 4 * 21 * (2 * 21 + 2 + 503) = 45,948: 24 * 28,560 + 45,948 = 731,388.
    let started = Instant::now();
    fails_without_output(
        &[
            "--model",
            "mediswift-xl",
            "--fabric",
            "100x100",
            "--batch",
            "1",
            "--seq",
            "2048",
        ],
        1,
        &["does not fit", "731388 bytes", "has 49152"],
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn bad_token_files_are_refused() {
    let cases: [(&str, &[&str]); 7] = [
        (
            "[[1, 2, 3], [4, 5, 256]]",
            &[
                "token id 256",
                "sequence 1, position 2",
                "vocabulary of 256",
            ],
        ),
        (
            &format!("[{:?}]", (0..65).collect::<Vec<u32>>()),
            &["sequence length 65", "n_positions 64"],
        ),
        ("[[1, 2, 3], [4, 5]]", &["sequence 1 has 2 tokens"]),
        ("[[1, 2,", &["expected a JSON array of arrays of token ids"]),
        (
            "[[1, -2]]",
            &["expected a JSON array of arrays of token ids"],
        ),
        ("[]", &["batch size is 0"]),
        ("[[7]]", &["sequence length 1 is below 2"]),
    ];
    for (json, needles) in cases {
        let (_keep, path) = tokens_file(json);
        let mut all = vec!["--tokens"];
        all.extend_from_slice(needles);
        fails_without_output(&["--tokens", path_str(&path)], 2, &all);
    }
    fails_without_output(
        &["--tokens", "/nonexistent/tokens.json"],
        2,
        &["--tokens /nonexistent/tokens.json"],
    );
}

#[test]
fn bad_numbers_are_refused() {
    for s in ["1.0", "NaN", "-0.5", "inf"] {
        fails_without_output(
            &["--batch", "2", "--seq", "8", "--sparsity", s],
            2,
            &["--sparsity", "is not a fraction in [0, 1)"],
        );
    }
    for lr in ["-1", "NaN"] {
        fails_without_output(
            &["--batch", "2", "--seq", "8", &format!("--lr={lr}")],
            2,
            &["--lr", "AdamW lr"],
        );
    }
    for scale in ["1000", "0", "-4", "33554432", "auto2"] {
        fails_without_output(
            &[
                "--batch",
                "2",
                "--seq",
                "8",
                &format!("--loss-scale={scale}"),
            ],
            2,
            &["--loss-scale", "power of two from 1 to 16777216"],
        );
    }
    fails_without_output(&["--batch", "0", "--seq", "8"], 2, &["batch size is 0"]);
    fails_without_output(&["--batch", "1", "--seq", "65"], 2, &["sequence length 65"]);
}

#[test]
fn a_bad_out_folder_is_refused_before_running() {
    let tmp = tempfile::tempdir().unwrap();
    let nested = tmp.path().join("missing").join("out");
    let run = small_step(&nested, &[]);
    assert_fails(&run, 2, &["--out", "missing", "does not exist"]);
    assert!(run.stdout.is_empty());
    assert!(!tmp.path().join("missing").exists());

    let file = tmp.path().join("a-file");
    fs::write(&file, "x").unwrap();
    let run = small_step(&file, &[]);
    assert_fails(&run, 2, &["--out", "is not a folder"]);
    assert_eq!(fs::read(&file).unwrap(), b"x");
}

#[test]
fn an_output_that_cannot_be_written_is_refused_before_running() {
    // A folder in the place of report.json would make the last write fail; it is found before
    // the step runs (exit code 2), and nothing is written.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    fs::create_dir_all(out.join("report.json")).unwrap();
    let run = small_step(&out, &["--no-dense-baseline"]);
    assert_fails(&run, 2, &["--out", "report.json", "is a folder"]);
    assert_eq!(listing(&out), ["report.json"]);
}

/// fp16 on weights far from any initialisation (the MLP's at N(0, 40) instead of N(0, 0.02)):
/// the step runs and its loss stays close, but the gradients leave fp16's range, so `step`
/// warns with the distances instead of handing them over silently. The same checkpoint in fp32
/// agrees with the reference and prints no warning.
#[test]
fn fp16_gradients_far_from_the_reference_are_flagged() {
    use wafersim::model::checkpoint::save_checkpoint;
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny();
    let mut params = wafersim::model::init_params(&config, 1);
    for block in &mut params.blocks {
        for lin in [&mut block.fc, &mut block.fc_proj] {
            lin.weight.data.iter_mut().for_each(|w| *w *= 2000.0);
        }
    }
    let ckpt = tmp.path().join("ckpt");
    save_checkpoint(&ckpt, &config, &params).unwrap();
    for (dtype, warned) in [("fp16", true), ("fp32", false)] {
        let out = tmp.path().join(dtype);
        let run = small_step(&out, &["--checkpoint", path_str(&ckpt), "--dtype", dtype]);
        assert_eq!(run.code, 0, "stderr: {}", run.stderr);
        let check = &report(&out)["reference_check"];
        assert_eq!(check["within_tolerance"], !warned, "{dtype}: {check}");
        assert_eq!(
            run.stderr
                .contains("warning: the fabric's loss and gradients"),
            warned
        );
    }
}
