//! `wafersim train --resume DIR`, driven as a user would: THE LAW of resumable runs and the
//! refusals of state files and flags that do not fit.
//!
//! The law: `train --steps N` writes the same bytes (`model.safetensors`, `train_state.json`,
//! `train_state.safetensors`, the prompt, `train.csv`, `loss.svg`) as `train --steps N
//! --save-every K` resumed from its `step-K/` with `train --resume out/step-K`, and the resumed
//! run logs the uninterrupted run's losses for steps K+1..N. A run started afresh from the same
//! `step-K/` with `--checkpoint` (AdamW, the schedule and the batch order restarted) does not:
//! the comparison can fail.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{assert_fails, path_str, run_ok, wafersim};

/// A token file of a repeated sentence (bytes of the tiny preset's vocabulary), and another.
fn tokens_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let ids: Vec<u32> = text.repeat(20).bytes().map(u32::from).collect();
    let path = dir.join(name);
    fs::write(&path, serde_json::to_string(&ids).unwrap()).unwrap();
    path
}

const SENTENCE: &str = "the quick brown fox jumps over the lazy dog. ";

/// The flags of a new run of the tiny preset, batch 2 x 16 on 8 x 8 PEs, `steps` in all.
fn new_run(tokens: &Path, out: &Path, steps: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "train", "--tokens", "", "--out", "", "--steps", steps, "--batch", "2", "--seq", "16",
        "--fabric", "8x8", "--warmup", "1",
    ]
    .map(String::from)
    .to_vec();
    args[2] = path_str(tokens).into();
    args[4] = path_str(out).into();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// `train.csv` as rows of text (every field as written).
fn csv_rows(out: &Path) -> Vec<String> {
    let text = fs::read_to_string(out.join("train.csv")).unwrap();
    text.lines().skip(1).map(String::from).collect()
}

fn read(path: PathBuf) -> Vec<u8> {
    fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The files that must be the same bytes after a resume.
fn compared_files(prompt: bool) -> Vec<&'static str> {
    let mut files = vec![
        "checkpoint/model.safetensors",
        "checkpoint/config.json",
        "checkpoint/train_state.json",
        "checkpoint/train_state.safetensors",
        "train.csv",
        "loss.svg",
    ];
    if prompt {
        files.extend(["checkpoint/prompt.safetensors", "prompt.safetensors"]);
    }
    files
}

/// THE LAW for one phase and fidelity: 4 steps straight (`--save-every 2`, which writes
/// `step-2/` on the way and changes nothing else), then a resume from `step-2/`. With `plain`,
/// also a run of 4 steps without `--save-every`, and a fresh run from `step-2/` that must differ.
fn assert_the_law(phase: &[&str], fidelity: &str, plain: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tokens_file(tmp.path(), "tokens.json", SENTENCE);
    let prompt = phase.contains(&"prompt-tune");
    let extra = [phase, &["--fidelity", fidelity]].concat();
    let straight = tmp.path().join("straight");
    let with_saves = [&extra[..], &["--save-every", "2"]].concat();
    run_ok(&new_run(&tokens, &straight, "4", &with_saves));
    let step2 = straight.join("step-2");
    let resumed = tmp.path().join("resumed");
    let stderr = run_ok(&[
        "train".into(),
        "--resume".into(),
        path_str(&step2).into(),
        "--tokens".into(),
        path_str(&tokens).into(),
        "--out".into(),
        path_str(&resumed).into(),
    ]);
    // Only steps 3 and 4 ran.
    let progress: Vec<&str> = stderr.lines().filter(|l| l.starts_with("step ")).collect();
    assert_eq!(progress.len(), 2, "{stderr}");
    assert!(progress[0].starts_with("step 3/4: "), "{stderr}");
    for file in compared_files(prompt) {
        assert!(
            read(straight.join(file)) == read(resumed.join(file)),
            "{phase:?} {fidelity}: {file} differs after the resume"
        );
    }
    // The resumed run's rows of steps 3 and 4 are the straight run's (and it carries 1 and 2).
    let (a, b) = (csv_rows(&straight), csv_rows(&resumed));
    assert_eq!(b.len(), 4);
    assert_eq!(a[2..], b[2..]);
    let report: serde_json::Value =
        serde_json::from_slice(&read(resumed.join("train.json"))).unwrap();
    assert_eq!(report["resumed_from"]["step"], 2);
    let fp16 = phase.contains(&"fp16");
    assert_eq!(report["dtype"], if fp16 { "fp16" } else { "fp32" });
    assert_eq!(report["steps"]["done"], 4);
    if fidelity == "exact" {
        // The first step's reference check travels with the state.
        assert_eq!(report["reference_check"]["within_tolerance"], true);
        assert_eq!(report["loss_scale"], if fp16 { 8.0 } else { 1.0 });
    }
    if !plain {
        return;
    }
    let plain_run = tmp.path().join("plain");
    run_ok(&new_run(&tokens, &plain_run, "4", &extra));
    for file in compared_files(prompt) {
        assert!(
            read(plain_run.join(file)) == read(resumed.join(file)),
            "{phase:?} {fidelity}: {file} of the run without --save-every differs"
        );
    }
    // A new run from step-2/ restarts AdamW, the schedule and the batch order: other weights.
    let fresh = tmp.path().join("fresh");
    let mut args = new_run(&tokens, &fresh, "2", &["--checkpoint", path_str(&step2)]);
    let phase_only: Vec<&str> = phase
        .iter()
        .copied()
        .filter(|f| !["--model", "tiny", "--sparsity", "0.5"].contains(f))
        .collect();
    args.extend(phase_only.iter().map(|s| s.to_string()));
    args.extend(["--fidelity".into(), fidelity.into()]);
    if prompt {
        args.extend([
            "--prompt".into(),
            path_str(&step2.join("prompt.safetensors")).into(),
        ]);
        args.retain(|a| a != "--prompt-len" && a != "4");
    }
    run_ok(&args);
    let weights = if prompt {
        "prompt.safetensors"
    } else {
        "checkpoint/model.safetensors"
    };
    assert!(
        read(fresh.join(weights)) != read(resumed.join(weights)),
        "{phase:?} {fidelity}: a fresh run from step-2 should differ from the resumed one"
    );
}

const SPARSE: &[&str] = &[
    "--model",
    "tiny",
    "--phase",
    "sparse-pretrain",
    "--sparsity",
    "0.5",
    "--lr",
    "3e-3",
];
const DENSE: &[&str] = &["--model", "tiny", "--phase", "dense-finetune"];
const PROMPT: &[&str] = &[
    "--model",
    "tiny",
    "--phase",
    "prompt-tune",
    "--prompt-len",
    "4",
    "--lr",
    "3e-2",
];

#[test]
fn the_law_sparse_pretrain_fast() {
    assert_the_law(SPARSE, "fast", true);
}

/// At the exact fidelity in fp16 with a loss scale of 8: the dtype and the scale are the run's.
#[test]
fn the_law_sparse_pretrain_exact_fp16() {
    let fp16 = [SPARSE, &["--dtype", "fp16", "--loss-scale", "8"]].concat();
    assert_the_law(&fp16, "exact", false);
}

#[test]
fn the_law_prompt_tune_fast() {
    assert_the_law(PROMPT, "fast", true);
}

#[test]
fn the_law_prompt_tune_exact() {
    assert_the_law(PROMPT, "exact", false);
}

#[test]
fn the_law_dense_finetune_fast() {
    assert_the_law(DENSE, "fast", true);
}

/// A sparse fast run of 3 steps with `step-1/` and `step-2/`, for the refusals.
fn finished_run(tmp: &Path, tokens: &Path) -> PathBuf {
    let out = tmp.join("run");
    let extra = [SPARSE, &["--fidelity", "fast", "--save-every", "1"]].concat();
    run_ok(&new_run(tokens, &out, "3", &extra));
    out
}

fn resume_args<'a>(
    dir: &'a Path,
    tokens: &'a Path,
    out: &'a Path,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "train",
        "--resume",
        path_str(dir),
        "--tokens",
        path_str(tokens),
        "--out",
        path_str(out),
    ];
    args.extend(extra);
    args
}

/// Flags that contradict the resumed run, or only start a run, are refused on one line with
/// exit code 2 and nothing created; flags that repeat the run's values are accepted.
#[test]
fn contradicting_flags_are_refused_on_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tokens_file(tmp.path(), "tokens.json", SENTENCE);
    let other = tokens_file(
        tmp.path(),
        "other.json",
        "a different text, the same vocabulary. ",
    );
    let run = finished_run(tmp.path(), &tokens);
    let step1 = run.join("step-1");
    let out = tmp.path().join("out");
    let cases: [(&[&str], &[&str]); 9] = [
        (
            &["--steps", "5"],
            &[
                "--steps: 5, but the resumed run has 3 steps in all",
                "train_state.json",
            ],
        ),
        (
            &["--lr", "0.5"],
            &[
                "--lr: 0.5 contradicts the resumed run's 0.003",
                "omit it or give the same",
            ],
        ),
        (
            &["--seed", "9"],
            &["--seed: 9 contradicts the resumed run's 0"],
        ),
        (
            &["--batch", "4"],
            &["--batch: 4 contradicts the resumed run's 2"],
        ),
        (
            &["--fidelity", "exact"],
            &["--fidelity: exact contradicts the resumed run's fast"],
        ),
        (
            &["--phase", "dense-finetune"],
            &["--phase: dense-finetune contradicts the resumed run's sparse-pretrain"],
        ),
        (
            &["--fabric", "4x4"],
            &["--fabric: 4x4 is not the resumed run's fabric"],
        ),
        (
            &["--model", "tiny"],
            &["'--resume <DIR>' cannot be used with '--model <PRESET>'"],
        ),
        (
            &["--sparsity", "0.5"],
            &["'--resume <DIR>' cannot be used with '--sparsity <S>'"],
        ),
    ];
    for (extra, needles) in cases {
        let r = wafersim(&resume_args(&step1, &tokens, &out, extra));
        assert_fails(&r, 2, needles);
        assert!(!out.exists(), "{extra:?}");
    }
    let r = wafersim(&resume_args(&step1, &other, &out, &[]));
    assert_fails(
        &r,
        2,
        &["--tokens", "not the resumed run's token file", "fnv1a64:"],
    );
    let r = wafersim(&resume_args(&run.join("checkpoint"), &tokens, &out, &[]));
    assert_fails(
        &r,
        2,
        &["the run is complete (3 of 3 steps", "nothing to resume"],
    );
    assert!(!out.exists());
    // The run's own values are accepted.
    let same = [
        "--steps",
        "3",
        "--lr",
        "3e-3",
        "--fabric",
        "8x8",
        "--fidelity",
        "fast",
    ];
    let r = wafersim(&resume_args(&step1, &tokens, &out, &same));
    assert_eq!(r.code, 0, "{}", r.stderr);
    // In place, with --save-every: the run's own earlier step-1/ is no stale output, and the
    // rewritten step-2/ and checkpoint/ are the bytes they were.
    let before = read(run.join("checkpoint/train_state.safetensors"));
    let r = wafersim(&resume_args(&step1, &tokens, &run, &["--save-every", "1"]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stderr.contains("note:"), "{}", r.stderr);
    assert!(read(run.join("checkpoint/train_state.safetensors")) == before);
    assert!(
        read(out.join("checkpoint/model.safetensors"))
            == read(run.join("checkpoint/model.safetensors"))
    );
}

/// A copy of the checkpoint folder `from` in `to`, with `edit` applied to it.
fn broken_copy(from: &Path, to: &Path, edit: impl FnOnce(&Path)) -> PathBuf {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
    edit(to);
    to.to_path_buf()
}

/// `train_state.safetensors` of `dir` rewritten with `edit` applied to each tensor's
/// (name, dtype, shape, bytes).
fn edit_tensors(
    dir: &Path,
    edit: impl Fn(&str, &mut safetensors::Dtype, &mut Vec<usize>, &mut Vec<u8>),
) {
    let path = dir.join("train_state.safetensors");
    let bytes = fs::read(&path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    for (name, dtype, shape, data) in &mut tensors {
        edit(name, dtype, shape, data);
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// Bad state files: one line naming the file and what is wrong, exit code 2, never a panic.
#[test]
fn bad_state_files_are_named_on_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tokens_file(tmp.path(), "tokens.json", SENTENCE);
    let run = finished_run(tmp.path(), &tokens);
    let step1 = run.join("step-1");
    let out = tmp.path().join("out");
    let case = |name: &str, edit: &dyn Fn(&Path), needles: &[&str]| {
        let dir = broken_copy(&step1, &tmp.path().join(name), edit);
        let r = wafersim(&resume_args(&dir, &tokens, &out, &[]));
        assert_fails(&r, 2, needles);
        assert!(!out.exists(), "{name}");
    };
    let json = |dir: &Path| dir.join("train_state.json");
    case(
        "no-json",
        &|d| fs::remove_file(json(d)).unwrap(),
        &["train_state.json: cannot read it"],
    );
    case(
        "no-tensors",
        &|d| fs::remove_file(d.join("train_state.safetensors")).unwrap(),
        &["train_state.safetensors: cannot read it"],
    );
    case(
        "schema",
        &|d| {
            let text = fs::read_to_string(json(d)).unwrap();
            fs::write(json(d), text.replace("train-state/v1", "train-state/v0")).unwrap();
        },
        &[
            "train_state.json: schema is \"wafersim.train-state/v0\", expected \"wafersim.train-state/v1\"",
        ],
    );
    case(
        "field",
        &|d| {
            let text = fs::read_to_string(json(d)).unwrap();
            fs::write(json(d), text.replace("\"seq\": 16", "\"seq\": \"16\"")).unwrap();
        },
        &["train_state.json: invalid type: string \"16\", expected usize"],
    );
    case(
        "fabric",
        &|d| {
            let text = fs::read_to_string(json(d)).unwrap();
            fs::write(json(d), text.replace("\"width\": 8,", "\"width\": 0,")).unwrap();
        },
        &["train_state.json: `fabric`: ", "width", "0 is outside 1..="],
    );
    case(
        "nan",
        &|d| {
            edit_tensors(d, |name, _, _, data| {
                if name == "exp_avg.transformer.h.1.mlp.c_fc.weight" {
                    data[12..16].copy_from_slice(&f32::NAN.to_le_bytes());
                }
            })
        },
        &[
            "AdamW's `exp_avg.*` tensors",
            "train_state.safetensors",
            "transformer.h.1.mlp.c_fc.weight",
            "non-finite value (NaN) at flat index 3",
        ],
    );
    case(
        "shape",
        &|d| {
            edit_tensors(d, |name, _, shape, _| {
                if name == "exp_avg_sq.transformer.wpe.weight" {
                    *shape = vec![shape.iter().product()];
                }
            })
        },
        &[
            "AdamW's `exp_avg_sq.*` tensors",
            "transformer.wpe.weight",
            "has shape",
        ],
    );
    case(
        "negative",
        &|d| {
            edit_tensors(d, |name, _, _, data| {
                if name == "exp_avg_sq.transformer.ln_f.bias" {
                    data[0..4].copy_from_slice(&(-1.0f32).to_le_bytes());
                }
            })
        },
        &[
            "train_state.safetensors",
            "exp_avg_sq.transformer.ln_f.bias",
            "negative second moment (-1) at flat index 0",
        ],
    );
    case(
        "mask",
        &|d| {
            edit_tensors(d, |name, _, _, data| {
                if name == "mask.h.0.fc" {
                    data[5] = 2;
                }
            })
        },
        &["train_state.safetensors: mask `mask.h.0.fc` holds the byte 2 at flat index 5"],
    );
    case(
        "mask-dtype",
        &|d| {
            edit_tensors(d, |name, dtype, _, _| {
                if name == "mask.h.1.q" {
                    *dtype = safetensors::Dtype::U8;
                }
            })
        },
        &["tensor `mask.h.1.q` is U8 [64, 64], expected BOOL [64, 64]"],
    );
    case(
        "extra",
        &|d| {
            let text = fs::read_to_string(json(d)).unwrap();
            fs::write(
                json(d),
                text.replace(
                    "\"phase\": \"sparse-pretrain\"",
                    "\"phase\": \"dense-finetune\"",
                ),
            )
            .unwrap();
        },
        &["unexpected tensor `mask.h.0.attn_proj` (not part of a dense-finetune run's state)"],
    );
}

/// The case `--resume` exists for: a run stopped with Ctrl-C writes its state in `checkpoint/`,
/// and resuming from it finishes the run with the bytes of a run that was never stopped.
#[cfg(unix)]
#[test]
fn a_run_stopped_by_ctrl_c_resumes_to_the_same_bytes() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tokens_file(tmp.path(), "tokens.json", SENTENCE);
    // Exact steps (a few tenths of a second each): the signal lands long before the last one.
    let extra = [SPARSE, &["--fidelity", "exact"]].concat();
    let stopped = tmp.path().join("stopped");
    let mut child = Command::new(env!("CARGO_BIN_EXE_wafersim"))
        .args(new_run(&tokens, &stopped, "4", &extra))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap().starts_with("step 1/") {
            break;
        }
    }
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert_eq!(child.wait().unwrap().code(), Some(0), "{rest:?}");
    let state: serde_json::Value =
        serde_json::from_slice(&read(stopped.join("checkpoint/train_state.json"))).unwrap();
    let done = state["steps_done"].as_u64().unwrap();
    assert!((1..4).contains(&done), "stopped after {done} of 4 steps");
    // Resumed in place, into the same --out.
    let stderr = run_ok(&[
        "train".into(),
        "--resume".into(),
        path_str(&stopped.join("checkpoint")).into(),
        "--tokens".into(),
        path_str(&tokens).into(),
        "--out".into(),
        path_str(&stopped).into(),
    ]);
    assert!(stderr.contains("step 4/4"), "{stderr}");
    let straight = tmp.path().join("straight");
    run_ok(&new_run(&tokens, &straight, "4", &extra));
    for file in compared_files(false) {
        assert!(
            read(straight.join(file)) == read(stopped.join(file)),
            "{file} differs after Ctrl-C and --resume"
        );
    }
}
