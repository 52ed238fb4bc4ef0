//! `wafersim train` driven as a user would: the built binary, real folders and files. A run
//! writes logs that agree with each other, a checkpoint that loads and keeps the mask, and
//! Ctrl-C ends a run after the current step with everything written.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use wafersim::model::SparseKind;
use wafersim::model::checkpoint::load_checkpoint;

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

/// A token file of a repeated sentence (bytes of the tiny preset's vocabulary).
fn tokens_file(dir: &Path) -> PathBuf {
    let ids: Vec<u32> = "the quick brown fox jumps over the lazy dog. "
        .repeat(20)
        .bytes()
        .map(u32::from)
        .collect();
    let path = dir.join("tokens.json");
    fs::write(&path, serde_json::to_string(&ids).unwrap()).unwrap();
    path
}

fn train_args<'a>(tokens: &'a Path, out: &'a Path, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--tokens",
        path_str(tokens),
        "--out",
        path_str(out),
        "--steps",
        steps,
        "--batch",
        "2",
        "--seq",
        "16",
        "--fabric",
        "4x4",
    ]
}

/// [`train_args`] for a fast-fidelity dense fine-tuning of the tiny preset.
fn fast_finetune_args<'a>(tokens: &'a Path, out: &'a Path, steps: &'a str) -> Vec<&'a str> {
    let mut args = train_args(tokens, out, steps);
    args.extend([
        "--model",
        "tiny",
        "--phase",
        "dense-finetune",
        "--fidelity",
        "fast",
    ]);
    args
}

fn wafersim(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_wafersim"))
        .args(args)
        .output()
        .expect("the wafersim binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), stderr)
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

fn csv_rows(path: &Path) -> Vec<Vec<f64>> {
    let text = fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("step,loss,lr,flops,cycles,loss_scale,skipped")
    );
    // `loss_scale` is empty at the fast fidelity (no step scales its loss): NaN here.
    let field = |v: &str| {
        if v.is_empty() {
            f64::NAN
        } else {
            v.parse().unwrap()
        }
    };
    lines.map(|l| l.split(',').map(field).collect()).collect()
}

#[test]
fn a_sparse_run_writes_agreeing_logs_and_a_checkpoint_that_keeps_its_mask() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tokens_file(tmp.path());
    let out = tmp.path().join("pre");
    let mut args = train_args(&tokens, &out, "4");
    args.extend([
        "--model",
        "tiny",
        "--phase",
        "sparse-pretrain",
        "--sparsity",
        "0.5",
    ]);
    args.extend(["--save-every", "2"]);
    args.extend(["--fidelity", "fast"]);
    let (code, stderr) = wafersim(&args);
    assert_eq!(code, 0, "{stderr}");
    let rows = csv_rows(&out.join("train.csv"));
    assert_eq!(rows.len(), 4);
    let report = json(&out.join("train.json"));
    assert_eq!(report["steps"]["done"], 4);
    assert_eq!(report["interrupted"], false);
    let flops: f64 = rows.iter().map(|r| r[3]).sum();
    let cycles: f64 = rows.iter().map(|r| r[4]).sum();
    assert_eq!(report["totals"]["flops"].as_f64(), Some(flops));
    assert_eq!(report["totals"]["cycles"].as_f64(), Some(cycles));
    // Sparse matmuls at density 1/2: the six sparse matrices' FLOPs halve, the head and
    // attention stay, so the run's FLOPs lie strictly between half and all of the dense ones.
    let dense = report["totals"]["dense_flops"].as_f64().unwrap();
    assert!(
        flops > dense / 2.0 && flops < dense,
        "{flops} vs dense {dense}"
    );
    assert!(
        fs::read_to_string(out.join("loss.svg"))
            .unwrap()
            .starts_with("<svg")
    );
    for dir in ["checkpoint", "step-2"] {
        assert!(load_checkpoint(&out.join(dir)).is_ok(), "{dir}");
    }
    assert!(
        !out.join("step-4").exists(),
        "the last step's checkpoint is `checkpoint/`"
    );

    // Continue sparse pre-training from the checkpoint: no --sparsity, same mask (the zeros).
    let (_, before) = load_checkpoint(&out.join("checkpoint")).unwrap();
    let next = tmp.path().join("next");
    let ckpt = out.join("checkpoint");
    let mut args = train_args(&tokens, &next, "2");
    args.extend([
        "--checkpoint",
        path_str(&ckpt),
        "--phase",
        "sparse-pretrain",
    ]);
    args.extend(["--fidelity", "fast"]);
    let (code, stderr) = wafersim(&args);
    assert_eq!(code, 0, "{stderr}");
    let (_, after) = load_checkpoint(&next.join("checkpoint")).unwrap();
    for l in 0..2 {
        for kind in SparseKind::ALL {
            let (b, a) = (
                &before.blocks[l].linear(kind).weight.data,
                &after.blocks[l].linear(kind).weight.data,
            );
            let zeros_kept = b.iter().zip(a).all(|(x, y)| (*x == 0.0) == (*y == 0.0));
            assert!(zeros_kept, "layer {l} {kind:?}: the mask changed");
            assert_eq!(b.iter().filter(|v| **v == 0.0).count() * 2, b.len());
        }
    }
    assert_eq!(json(&next.join("train.json"))["sparsity"], 0.5);
    assert!(!stderr.contains("note:"), "{stderr}");

    // A new --sparsity over the checkpoint's zeros draws new masks, and says so.
    let redrawn = tmp.path().join("redrawn");
    let step = [
        "step",
        "--checkpoint",
        path_str(&ckpt),
        "--sparsity",
        "0.25",
        "--fabric",
        "4x4",
        "--batch",
        "1",
        "--seq",
        "8",
        "--fidelity",
        "fast",
        "--no-numerics",
        "--out",
        path_str(&redrawn),
    ];
    let (code, stderr) = wafersim(&step);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("note: the masks are drawn anew; the checkpoint's zeros (50.0 %"),
        "{stderr}"
    );

    // Dense fine-tuning from it: the pruned weights learn.
    let fine = tmp.path().join("fine");
    let mut args = train_args(&tokens, &fine, "1");
    args.extend(["--checkpoint", path_str(&ckpt), "--phase", "dense-finetune"]);
    args.extend(["--fidelity", "fast"]);
    let (code, stderr) = wafersim(&args);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(json(&fine.join("train.json"))["sparsity"], 0.0);
    let report = json(&fine.join("train.json"));
    assert_eq!(report["totals"]["flops"], report["totals"]["dense_flops"]);
}

#[test]
fn bad_flags_are_refused_with_exit_code_2_and_nothing_written() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tokens_file(tmp.path());
    let out = tmp.path().join("out");
    let cases: [(&[&str], &str); 4] = [
        (&["--phase", "sparse-pretrain"], "needs --sparsity"),
        (
            &["--phase", "dense-finetune", "--sparsity", "0.5"],
            "only sparse-pretrain",
        ),
        (&["--phase", "dense-finetune", "--lr", "-1"], "--lr"),
        (
            &["--phase", "dense-finetune", "--save-every", "0"],
            "--save-every",
        ),
    ];
    for (extra, needle) in cases {
        let mut args = train_args(&tokens, &out, "2");
        args.extend(["--model", "tiny"]);
        args.extend(extra);
        let (code, stderr) = wafersim(&args);
        assert_eq!(code, 2, "{extra:?}: {stderr}");
        assert!(stderr.contains(needle), "{extra:?}: {stderr}");
        assert!(!out.exists());
    }
    let bad_json = tmp.path().join("bad.json");
    fs::write(&bad_json, "{\"tokens\": 3}").unwrap();
    let prompt_file = tmp.path().join("p.safetensors");
    fs::write(&prompt_file, b"not safetensors").unwrap();
    let p = path_str(&prompt_file);
    let more: [(&Path, &[&str], &str); 7] = [
        (
            &bad_json,
            &["--phase", "dense-finetune"],
            "expected a JSON array",
        ),
        (
            &tokens,
            &["--phase", "dense-finetune", "--prompt", p],
            "only prompt-tune",
        ),
        (
            &tokens,
            &["--phase", "prompt-tune", "--prompt-len", "60"],
            "--seq + the prompt's vectors",
        ),
        (
            &tokens,
            &["--phase", "prompt-tune", "--prompt-len", "4", "--prompt", p],
            "--prompt",
        ),
        (
            &tokens,
            &["--phase", "dense-finetune", "--prompt-len", "4"],
            "--prompt-len: only prompt-tune",
        ),
        (
            &tokens,
            &["--phase", "dense-finetune", "--prompt-init", "random"],
            "--prompt-init: only prompt-tune",
        ),
        (
            &tokens,
            &[
                "--phase",
                "prompt-tune",
                "--prompt-init",
                "random",
                "--prompt",
                p,
            ],
            "'--prompt-init <PROMPT_INIT>' cannot be used with '--prompt <PATH>'",
        ),
    ];
    for (file, extra, needle) in more {
        let mut args = train_args(file, &out, "2");
        args.extend(["--model", "tiny"]);
        args.extend(extra);
        let (code, stderr) = wafersim(&args);
        assert_eq!(code, 2, "{extra:?}: {stderr}");
        assert!(stderr.contains(needle), "{extra:?}: {stderr}");
        assert!(!out.exists());
    }
    let short = tmp.path().join("short.json");
    fs::write(&short, "[1, 2, 3]").unwrap();
    let mut args = train_args(&short, &out, "2");
    args.extend(["--model", "tiny", "--phase", "dense-finetune"]);
    let (code, stderr) = wafersim(&args);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("no sequence has 16 tokens"), "{stderr}");
}

/// The learning-rate schedule's short runs (src/training/schedule.rs), as `train.csv` logs them
/// at the default `--lr` 1e-3: a run no longer than its warm-up ends during it, with one
/// `warning:` line naming `--warmup`; a single step after warm-up runs at the floor, lr / 10.
#[test]
fn a_run_that_ends_during_warm_up_says_so_and_logs_its_rates() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tokens_file(tmp.path());
    let run = |name: &str, steps: &str, warmup: &str| {
        let out = tmp.path().join(name);
        let mut args = fast_finetune_args(&tokens, &out, steps);
        args.extend(["--warmup", warmup]);
        let (code, stderr) = wafersim(&args);
        assert_eq!(code, 0, "{stderr}");
        let lrs: Vec<f64> = csv_rows(&out.join("train.csv"))
            .iter()
            .map(|r| r[2])
            .collect();
        (stderr, lrs)
    };
    let assert_close = |got: &[f64], want: &[f64]| {
        let close = got.len() == want.len()
            && got
                .iter()
                .zip(want)
                .all(|(g, w)| (g - w).abs() <= 1e-15 * w);
        assert!(close, "{got:?} vs {want:?}");
    };
    // Steps 2, warm-up 4: 1/4 and 2/4 of the peak; the last step's 5e-4 is named.
    let (stderr, lrs) = run("short", "2", "4");
    assert_close(&lrs, &[2.5e-4, 5e-4]);
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    for needle in [
        "warning: --warmup 4 is not shorter than --steps 2",
        "ends during warm-up",
        "lr 5.000e-4 (2/4 of --lr)",
    ] {
        assert!(warnings[0].contains(needle), "{needle:?} not in {stderr}");
    }
    // Steps 3, warm-up 2: 1/2 of the peak, the peak, then the last step at the floor; no warning.
    let (stderr, lrs) = run("one-after", "3", "2");
    assert_close(&lrs, &[5e-4, 1e-3, 1e-4]);
    assert!(!stderr.contains("warning"), "{stderr}");
}

/// Ctrl-C (SIGINT) after the second step: the run finishes the step in progress and writes
/// complete logs and a loadable checkpoint, exit code 0.
#[cfg(unix)]
#[test]
fn ctrl_c_ends_the_run_after_the_current_step_with_everything_written() {
    interrupt_a_run_with("-INT");
}

/// SIGTERM (what `kill` and job schedulers send) ends the run the same way.
#[cfg(unix)]
#[test]
fn sigterm_ends_the_run_after_the_current_step_with_everything_written() {
    interrupt_a_run_with("-TERM");
}

#[cfg(unix)]
fn interrupt_a_run_with(signal: &str) {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tokens_file(tmp.path());
    let out = tmp.path().join("out");
    let args = fast_finetune_args(&tokens, &out, "100000");
    let mut child = Command::new(env!("CARGO_BIN_EXE_wafersim"))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let started = Instant::now();
    for line in lines.by_ref() {
        if line.unwrap().starts_with("step 2/") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no progress");
    }
    let killed = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{rest:?}");
    let report = json(&out.join("train.json"));
    assert_eq!(report["interrupted"], true);
    let done = report["steps"]["done"].as_u64().unwrap();
    assert!((2..100_000).contains(&done), "{done} steps");
    assert_eq!(csv_rows(&out.join("train.csv")).len() as u64, done);
    assert!(load_checkpoint(&out.join("checkpoint")).is_ok());
}

#[cfg(unix)]
#[test]
fn a_run_whose_stdout_is_gone_still_writes_its_checkpoint() {
    // `wafersim train ... | true`: the reader is gone before the summary prints, and the process
    // dies of SIGPIPE at its first line, so everything must be written before it.
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tokens_file(tmp.path());
    let out = tmp.path().join("out");
    let args = fast_finetune_args(&tokens, &out, "2");
    let mut child = Command::new(env!("CARGO_BIN_EXE_wafersim"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the summary should have met a closed pipe"
    );
    assert_eq!(json(&out.join("train.json"))["steps"]["done"], 2);
    assert!(load_checkpoint(&out.join("checkpoint")).is_ok());
}

/// Prompt tuning from the CLI: the vectors are saved on their own, the weights are untouched,
/// `train.json` shows the weight-gradient work skipped, and `wafersim step --prompt` loads the
/// vectors and computes the reference's prompt loss.
#[test]
fn prompt_tuning_saves_its_vectors_and_step_loads_them() {
    use wafersim::model::GptConfig;
    use wafersim::model::checkpoint::read_params;
    use wafersim::reference::{self, Batch};
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tokens_file(tmp.path());
    let prompt_tune = |out: &Path, steps: &str, extra: &[&str]| {
        let mut args = train_args(&tokens, out, steps);
        args.extend([
            "--model",
            "tiny",
            "--phase",
            "prompt-tune",
            "--fidelity",
            "fast",
        ]);
        args.extend(extra);
        wafersim(&args)
    };
    let tune = |out: &Path, steps: &str, extra: &[&str]| {
        let args = [&["--prompt-len", "4", "--lr", "0.01"], extra].concat();
        prompt_tune(out, steps, &args)
    };
    let out = tmp.path().join("prompt");
    let (code, stderr) = tune(&out, "3", &[]);
    assert_eq!(code, 0, "{stderr}");
    let report = json(&out.join("train.json"));
    assert_eq!(report["prompt"]["len"], 4);
    // Each checkpoint holds its own step's vectors: `step-1/` those of a one-step run (the
    // first step's learning rate does not depend on the run's length).
    let (snapshots, one) = (tmp.path().join("snapshots"), tmp.path().join("one"));
    let (code, stderr) = tune(&snapshots, "3", &["--save-every", "1"]);
    assert_eq!(code, 0, "{stderr}");
    let (code, stderr) = tune(&one, "1", &[]);
    assert_eq!(code, 0, "{stderr}");
    let read = |p: PathBuf| fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let prompts = |dir: &Path| {
        ["step-1", "step-2", "checkpoint", "."]
            .map(|d| read(dir.join(d).join("prompt.safetensors")))
    };
    let [first, second, last, latest] = prompts(&snapshots);
    assert!(
        first == read(one.join("prompt.safetensors")),
        "step-1 is the first step's"
    );
    assert!(
        first != second && second != last,
        "each step moves the vectors"
    );
    assert!(last == latest && latest == read(out.join("prompt.safetensors")));
    // A dense model's prompt steps against dense prompt steps: no weight gradient in either.
    assert_eq!(report["totals"]["flops"], report["totals"]["dense_flops"]);
    // Skipped: every weight gradient of the dense tiny model over T = 2 x (16 + 4) = 40
    // positions: 2 T (2 layers x 12 x 64^2 + the head's 256 x 64) = 80 x 114,688 = 9,175,040.
    assert_eq!(report["prompt"]["savings"]["saved"]["flops"], 9_175_040);
    let saved = &report["prompt"]["savings"]["saved"]["cycles"];
    assert!(saved.as_u64().unwrap() > 0);
    let (config, trained) = load_checkpoint(&out.join("checkpoint")).unwrap();
    assert_eq!(
        trained,
        wafersim::model::init_params(&config, 0),
        "weights moved"
    );

    // Resuming from the saved vectors: their count comes from the file; a different
    // --prompt-len is refused.
    let saved_prompt = out.join("prompt.safetensors");
    let resumed = tmp.path().join("resumed");
    let (code, stderr) = prompt_tune(&resumed, "1", &["--prompt", path_str(&saved_prompt)]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(json(&resumed.join("train.json"))["prompt"]["len"], 4);
    let other = tmp.path().join("other");
    let with_len = ["--prompt", path_str(&saved_prompt), "--prompt-len", "5"];
    let (code, stderr) = prompt_tune(&other, "1", &with_len);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("the --prompt file holds 4 vectors"),
        "{stderr}"
    );

    // step --prompt: the reference's prompt loss on the saved weights and vectors.
    let batch_file = tmp.path().join("batch.json");
    fs::write(
        &batch_file,
        "[[116,104,101,32,113,117],[98,114,111,119,110,32]]",
    )
    .unwrap();
    let step_out = tmp.path().join("step");
    let prompt_file = out.join("prompt.safetensors");
    let ckpt = out.join("checkpoint");
    let args = [
        "step",
        "--checkpoint",
        path_str(&ckpt),
        "--tokens",
        path_str(&batch_file),
        "--prompt",
        path_str(&prompt_file),
        "--fabric",
        "4x4",
        "--out",
        path_str(&step_out),
    ];
    let (code, stderr) = wafersim(&args);
    assert_eq!(code, 0, "{stderr}");
    assert!(step_out.join("prompt_grad.safetensors").exists());
    assert!(!step_out.join("updated.safetensors").exists());
    let r = json(&step_out.join("report.json"));
    assert_eq!(
        (r["prompt_len"].as_u64(), r["seq"].as_u64()),
        (Some(4), Some(10))
    );
    // The FLOPs of the step that ran, no weight gradient, on the dense tiny model with T = 2 x
    // (4 + 6) positions: forward and input gradient, 9,482,240 worked out by hand in
    // `flops::tests::a_step_without_weight_gradients_by_hand`; its dense count is the same.
    let flops = &r["flops"];
    assert_eq!(flops["executed_matmul"], 9_482_240);
    assert_eq!(flops["analytic_matmul_sparse"], 9_482_240);
    assert_eq!(flops["analytic_matmul_dense"], 9_482_240);
    let tiny = GptConfig::preset("tiny").unwrap();
    let weights = read_params(&step_out.join("weights.safetensors"), &tiny).unwrap();
    let bytes = fs::read(&prompt_file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let data: Vec<f32> = st
        .tensor("prompt")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let prompt = wafersim::model::Matrix {
        rows: 4,
        cols: 64,
        data,
    };
    let batch = Batch::from_json(&tiny, &fs::read_to_string(&batch_file).unwrap()).unwrap();
    let (want, _) = reference::prompt_loss_and_grad(&tiny, &weights, &prompt, &batch).unwrap();
    let got = r["loss"].as_f64().unwrap();
    assert!(
        (got - f64::from(want)).abs() / f64::from(want) < 1e-5,
        "{got} vs {want}"
    );
}

/// `wafersim recipe` on the tiny preset: the JSON adds up and the dense recipe differs only in
/// pre-training. 1e6 tokens at the default step of 1 x 64 positions (the longest power of two
/// that fits 8 x 8) are ceil(1e6 / 64) = 15,625 steps.
#[test]
fn the_recipe_adds_up_its_phases() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("recipe.json");
    let args = [
        "recipe",
        "--model",
        "tiny",
        "--pretrain-tokens",
        "1e6",
        "--finetune-tokens",
        "1e5",
        "--prompt-tokens",
        "1e4",
        "--fabric",
        "8x8",
        "--json",
        path_str(&path),
    ];
    let (code, stderr) = wafersim(&args);
    assert_eq!(code, 0, "{stderr}");
    let r = json(&path);
    assert_eq!(r["step"]["seq"], 64);
    assert_eq!(r["sparse"]["phases"][0]["steps"], 15_625);
    for side in ["sparse", "dense"] {
        let phases = r[side]["phases"].as_array().unwrap();
        let sum: f64 = phases.iter().map(|p| p["flops"].as_f64().unwrap()).sum();
        assert_eq!(r[side]["total"]["flops"].as_f64(), Some(sum));
    }
    assert_eq!(r["sparse"]["phases"][1], r["dense"]["phases"][1]);
    let ratio = r["dense"]["total"]["flops"].as_f64().unwrap()
        / r["sparse"]["total"]["flops"].as_f64().unwrap();
    assert_eq!(r["savings"]["flops"].as_f64(), Some(ratio));
    assert!(ratio > 1.0);
    let (code, stderr) = wafersim(&["recipe", "--model", "tiny", "--fabric", "8x8"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("at least one phase"), "{stderr}");
}

/// The same seed and data write the same bytes: the per-step log, the weights and the plot
/// (`train.json` differs only in the host's wall time).
#[test]
fn the_same_seed_writes_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tokens_file(tmp.path());
    let run = |name: &str, seed: &str| {
        let out = tmp.path().join(name);
        let mut args = train_args(&tokens, &out, "3");
        args.extend([
            "--model",
            "tiny",
            "--phase",
            "sparse-pretrain",
            "--sparsity",
            "0.5",
        ]);
        args.extend(["--seed", seed]);
        let (code, stderr) = wafersim(&args);
        assert_eq!(code, 0, "{stderr}");
        out
    };
    let (a, b) = (run("a", "4"), run("b", "4"));
    // Another seed draws other weights, masks and batches: the bytes must change.
    let other = run("other", "5");
    for file in ["train.csv", "checkpoint/model.safetensors"] {
        assert_ne!(
            fs::read(a.join(file)).unwrap(),
            fs::read(other.join(file)).unwrap(),
            "{file} ignores the seed"
        );
    }
    for file in [
        "train.csv",
        "loss.svg",
        "checkpoint/model.safetensors",
        "checkpoint/config.json",
    ] {
        assert_eq!(
            fs::read(a.join(file)).unwrap(),
            fs::read(b.join(file)).unwrap(),
            "{file}"
        );
    }
}

/// The names in `dir` and below, sorted, as paths relative to it.
fn tree(dir: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.strip_prefix(dir).unwrap().display().to_string();
        if path.is_dir() {
            names.extend(tree(&path).into_iter().map(|n| format!("{name}/{n}")));
        }
        names.push(name);
    }
    names.sort();
    names
}

/// A file or folder in the way of anything the run writes (the checkpoint, its files, the prompt,
/// a `step-K/` that `--save-every` will write) is refused before the first step, with exit code
/// 2 and nothing created (robustness audit 7, item 2). Before, it was found after the steps ran.
#[test]
fn anything_in_the_way_of_a_checkpoint_is_refused_before_the_first_step() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tokens_file(tmp.path());
    let file = |p: &Path| fs::write(p, "in the way").unwrap();
    let folder = |p: &Path| fs::create_dir_all(p).unwrap();
    type Obstacle<'a> = (&'a str, &'a dyn Fn(&Path), &'a str, &'a [&'a str]);
    let dense: &[&str] = &["--phase", "dense-finetune", "--save-every", "2"];
    let prompt: &[&str] = &["--phase", "prompt-tune"];
    let cases: [Obstacle<'_>; 7] = [
        ("checkpoint", &file, "checkpoint is not a folder", dense),
        (
            "checkpoint/model.safetensors",
            &folder,
            "model.safetensors is a folder",
            dense,
        ),
        (
            "checkpoint/config.json",
            &folder,
            "config.json is a folder",
            dense,
        ),
        (
            "prompt.safetensors",
            &folder,
            "prompt.safetensors is a folder",
            prompt,
        ),
        (
            "checkpoint/prompt.safetensors",
            &folder,
            "prompt.safetensors is a folder",
            prompt,
        ),
        // --steps 5 --save-every 2 writes step-2/ and step-4/.
        ("step-4", &file, "step-4 is not a folder", dense),
        (
            "step-2/config.json",
            &folder,
            "config.json is a folder",
            dense,
        ),
    ];
    for (i, (obstacle, make, needle, extra)) in cases.into_iter().enumerate() {
        let out = tmp.path().join(format!("out-{i}"));
        fs::create_dir(&out).unwrap();
        make(&out.join(obstacle));
        let before = tree(&out);
        let mut args = train_args(&tokens, &out, "5");
        args.extend(["--model", "tiny", "--fidelity", "fast"]);
        args.extend(extra);
        let (code, stderr) = wafersim(&args);
        assert_eq!(code, 2, "{obstacle}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{obstacle}: nothing may run: {stderr}");
        assert!(lines[0].starts_with("error: --out "), "{}", lines[0]);
        assert!(lines[0].contains(needle), "{obstacle}: {}", lines[0]);
        assert_eq!(tree(&out), before, "{obstacle}: something was created");
    }
    // What the run does not write is no obstacle: the last step's `step-5` (its checkpoint is
    // `checkpoint/`), a step --save-every skips, a prompt outside prompt tuning.
    let out = tmp.path().join("free");
    for name in ["step-5", "step-3", "prompt.safetensors"] {
        folder(&out.join(name).join("model.safetensors"));
    }
    let mut args = fast_finetune_args(&tokens, &out, "5");
    args.extend(["--save-every", "2"]);
    let (code, stderr) = wafersim(&args);
    assert_eq!(code, 0, "{stderr}");
}

/// `--save-every` writes no `step-N/` at the last step, and says so in its help; `step-K/`
/// folders of an earlier, longer run in the same `--out` (and the prompt files of an earlier
/// prompt-tuning run) are named on stderr, as `step` names its stale files (robustness audit 7,
/// item 3).
#[test]
fn what_an_earlier_longer_run_left_in_out_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tokens_file(tmp.path());
    let out = tmp.path().join("out");
    let mut long = train_args(&tokens, &out, "7");
    long.extend([
        "--model",
        "tiny",
        "--phase",
        "prompt-tune",
        "--fidelity",
        "fast",
    ]);
    long.extend(["--save-every", "2"]);
    let (code, stderr) = wafersim(&long);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("note:"), "{stderr}");
    let mut short = fast_finetune_args(&tokens, &out, "4");
    short.extend(["--save-every", "2"]);
    let (code, stderr) = wafersim(&short);
    assert_eq!(code, 0, "{stderr}");
    let notes: Vec<String> = stderr
        .lines()
        .filter(|l| l.starts_with("note:"))
        .map(|l| l.replace(path_str(&out), "OUT"))
        .collect();
    // The short run wrote step-2/ and checkpoint/ (its last step, 4); the long one step-2/,
    // step-4/, step-6/ and prompts in each and in OUT.
    let stale = |p: &str| format!("note: {p} is from an earlier run (this run did not write it)");
    assert_eq!(
        notes,
        [
            stale("OUT/step-4"),
            stale("OUT/step-6"),
            stale("OUT/prompt.safetensors"),
            stale("OUT/checkpoint/prompt.safetensors"),
            stale("OUT/step-2/prompt.safetensors"),
        ],
        "{stderr}"
    );
    let help = Command::new(env!("CARGO_BIN_EXE_wafersim"))
        .args(["train", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        help.contains("none at the last step, whose checkpoint is `checkpoint/`"),
        "{help}"
    );
}

/// A checkpoint whose gradients overflow (an MLP input weight scaled by 1e21: its pre-activations
/// reach 1e20, whose square overflows f32 in GELU's derivative, so the backward pass is NaN while
/// the loss stays finite) is refused naming the gradient, not blamed on the learning rate
/// (robustness audit 7, item 5).
#[test]
fn non_finite_gradients_are_named_as_gradients() {
    use wafersim::model::checkpoint::save_checkpoint;
    use wafersim::model::{GptConfig, init_params};
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tokens_file(tmp.path());
    let config = GptConfig::preset("tiny").unwrap();
    let mut params = init_params(&config, 0);
    for w in &mut params.blocks[1].fc.weight.data {
        *w *= 1e21;
    }
    let ckpt = tmp.path().join("ckpt");
    fs::create_dir(&ckpt).unwrap();
    save_checkpoint(&ckpt, &config, &params).unwrap();
    let out = tmp.path().join("out");
    for (phase, gradient) in [
        ("dense-finetune", "the gradient of `"),
        ("prompt-tune", "the gradient of the prompt"),
    ] {
        let mut args = train_args(&tokens, &out, "1");
        args.extend(["--checkpoint", path_str(&ckpt), "--phase", phase]);
        let (code, stderr) = wafersim(&args);
        assert_eq!(code, 1, "{stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(lines[0].starts_with("error: step 1: "), "{}", lines[0]);
        assert!(lines[0].contains(gradient), "{}", lines[0]);
        assert!(
            lines[0].contains("is not finite (NaN at flat index"),
            "{}",
            lines[0]
        );
        assert!(!lines[0].contains("--lr"), "{}", lines[0]);
        assert!(!out.exists());
    }
}

/// `train --dtype fp16` streams fp16 and scales the loss: with one sequence of 16 tokens per
/// step, 15 positions are predicted, so `auto` is 8 (the largest power of two not above 15).
/// The first step's gradients stay within the fp16 tolerance of the CPU reference (2e-2), the
/// run is recorded as fp16 with its scale, and a scale that is not a power of two is refused.
#[test]
fn an_fp16_run_scales_its_loss_and_records_it() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tokens_file(tmp.path());
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec!["train", "--model", "tiny", "--phase", "sparse-pretrain"];
        args.extend(["--tokens", path_str(&tokens), "--out", path_str(out)]);
        args.extend([
            "--steps", "2", "--batch", "1", "--seq", "16", "--fabric", "8x8",
        ]);
        args.extend(extra);
        wafersim(&args)
    };
    let out = tmp.path().join("out");
    let (code, stderr) = run(&out, &["--sparsity", "0.5", "--dtype", "fp16"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    let report = json(&out.join("train.json"));
    assert_eq!(report["dtype"], "fp16");
    assert_eq!(report["loss_scale"], 8.0);
    let check = &report["reference_check"];
    assert_eq!(check["within_tolerance"], true);
    assert!(check["gradient_relative_l2"].as_f64().unwrap() < 2e-2);

    let (code, stderr) = run(&tmp.path().join("bad"), &["--loss-scale", "3"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--loss-scale"), "{stderr}");
}
