//! `wafersim train --loss-scale dynamic`, driven as a user would: an exact fp16 run that really
//! overflows on the fabric skips exactly the steps it must, leaves their weights and moments
//! bit for bit as they were, halves the scale until a step is clean, trains, grows the scale
//! after its window and overflows again; a run stopped inside it and resumed writes the bytes of
//! the run never stopped; the fast fidelity takes the flag as a no-op; a replaced weights file
//! is refused on resume.
//!
//! Where the first clean step comes from (worked out apart from the run): every window of the
//! token file is the same 16 tokens, so every batch is the same two sequences (30 predicted
//! positions), and a skipped step leaves the weights as they were, so every step until the
//! first clean one computes the same gradients at a scale halved each time. The step overflows
//! when a gradient stored in fp16 reaches 65520 (it rounds to infinity). Measured with
//! `scripts/overflow_margin.py` (PyTorch float64 on the run's initial weights, the tiny preset
//! at seed 0): the largest activation gradient of the unscaled mean loss is 9.65e-2 (the
//! residual stream's at the embedding's output, amplified by the LayerNorm backwards), the
//! logits' is 3.32e-2 (1/30, the `L / N` bound). So 2^20 overflows (2^20 x 9.65e-2 = 101,216)
//! although `L / N` alone (2^20 / 30 = 34,953) would pass it, and 2^19 is clean (50,608 <
//! 65,520). From 2^24 the run skips steps 1 to 5 (2^24, 2^23, 2^22, 2^21, 2^20) and step 6 at
//! 2^19 is the first applied. With window 2, steps 6 and 7 are clean and the scale doubles to
//! 2^20 after step 7; step 8 runs at 2^20 on weights that two updates at a learning rate below
//! 1e-3 moved by about 1e-3 each, far too little to win back the factor 1.5 of margin, so it
//! overflows and is skipped, and the scale is 2^19 again.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{assert_fails, path_str, run_ok, wafersim};
use serde_json::Value;

/// A token file whose every window (of 16) is the same: 8 copies of one 16-token sequence.
fn same_windows(dir: &Path) -> PathBuf {
    let window: Vec<u32> = "the quick brown ".bytes().map(u32::from).collect();
    assert_eq!(window.len(), 16);
    let path = dir.join("same.json");
    fs::write(&path, serde_json::to_string(&vec![window; 8]).unwrap()).unwrap();
    path
}

/// A dense fine-tuning run of the tiny preset, batch 2 x 16 on 8 x 8 PEs, one thread.
fn run_args(tokens: &Path, out: &Path, steps: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "train",
        "--model",
        "tiny",
        "--phase",
        "dense-finetune",
        "--tokens",
        "",
        "--out",
        "",
        "--steps",
        steps,
        "--batch",
        "2",
        "--seq",
        "16",
        "--fabric",
        "8x8",
        "--warmup",
        "1",
        "--threads",
        "1",
    ]
    .map(String::from)
    .to_vec();
    args[6] = path_str(tokens).into();
    args[8] = path_str(out).into();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn read(path: PathBuf) -> Vec<u8> {
    fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn json(path: PathBuf) -> Value {
    serde_json::from_slice(&read(path)).unwrap()
}

/// `train.csv`'s rows, every field as written.
fn csv_rows(out: &Path) -> Vec<Vec<String>> {
    let text = fs::read_to_string(out.join("train.csv")).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("step,loss,lr,flops,cycles,loss_scale,skipped")
    );
    lines
        .map(|l| l.split(',').map(String::from).collect())
        .collect()
}

const EXACT_FP16: [&str; 6] = [
    "--dtype",
    "fp16",
    "--loss-scale",
    "dynamic:16777216",
    "--loss-scale-window",
    "2",
];

#[test]
fn an_overflowing_fp16_run_skips_until_clean_then_trains_and_resumes_to_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = same_windows(tmp.path());
    let out = tmp.path().join("straight");
    let extra = [&EXACT_FP16[..], &["--save-every", "1"]].concat();
    let stderr = run_ok(&run_args(&tokens, &out, "8", &extra));

    // The scales and skips worked out in the module's comment.
    let rows = csv_rows(&out);
    let scales: Vec<&str> = rows.iter().map(|r| r[5].as_str()).collect();
    let skipped: Vec<&str> = rows.iter().map(|r| r[6].as_str()).collect();
    let p = |e: u32| (1u64 << e).to_string();
    let want_scales = [p(24), p(23), p(22), p(21), p(20), p(19), p(19), p(20)];
    assert_eq!(scales, want_scales);
    assert_eq!(skipped, ["1", "1", "1", "1", "1", "0", "0", "1"]);
    // Steps 1 to 6 ran the same batch on the same weights: the same loss, to the bit.
    assert!(rows[..6].iter().all(|r| r[1] == rows[0][1]), "{rows:?}");
    // A skipped step still cost what the fabric ran: every step's cycles are in the totals.
    let cycles: u64 = rows.iter().map(|r| r[4].parse::<u64>().unwrap()).sum();
    let report = json(out.join("train.json"));
    assert_eq!(report["totals"]["cycles"].as_u64(), Some(cycles));
    assert_eq!(report["steps"]["skipped"], 6);
    assert_eq!(report["loss_scale"], 16_777_216.0);
    let scaling = &report["loss_scaling"];
    assert_eq!(scaling["policy"], "dynamic");
    assert_eq!(
        scaling["skipped_steps"],
        serde_json::json!([1, 2, 3, 4, 5, 8])
    );
    assert_eq!(scaling["next_scale"], 524_288.0);
    // The progress lines say which steps were skipped; the reference check is step 6's.
    let progress: Vec<&str> = stderr.lines().filter(|l| l.starts_with("step ")).collect();
    for (i, line) in progress.iter().filter(|l| l.contains("/8:")).enumerate() {
        let skip = i < 5 || i == 7;
        assert_eq!(line.contains("SKIPPED"), skip, "{line}");
    }
    assert!(
        stderr.contains("step 6 checked against the CPU reference"),
        "{stderr}"
    );
    assert_eq!(report["reference_check"]["within_tolerance"], true);

    // A skipped step changes no weight and no moment: step-K's files are step-(K-1)'s, and
    // step-1's weights are the initial ones (`init` of the same preset and seed).
    let init = tmp.path().join("init");
    let made = wafersim(&[
        "init",
        "--model",
        "tiny",
        "--seed",
        "0",
        "--out",
        path_str(&init),
    ]);
    assert_eq!(made.code, 0, "{}", made.stderr);
    let file = |dir: &str, name: &str| read(out.join(dir).join(name));
    let weights = |dir: &str| file(dir, "model.safetensors");
    let moments = |dir: &str| file(dir, "train_state.safetensors");
    assert!(weights("step-1") == read(init.join("model.safetensors")));
    for k in 2..=5 {
        let (this, before) = (format!("step-{k}"), format!("step-{}", k - 1));
        assert!(
            weights(&this) == weights(&before),
            "{this}: weights changed"
        );
        assert!(
            moments(&this) == moments(&before),
            "{this}: moments changed"
        );
    }
    assert!(weights("step-6") != weights("step-5"));
    assert!(weights("step-7") != weights("step-6"));
    assert!(weights("checkpoint") == weights("step-7"));
    assert!(moments("checkpoint") == moments("step-7"));
    // AdamW took 2 updates in 8 steps; the scale is back at 2^19, nothing counted.
    let state = json(out.join("checkpoint/train_state.json"));
    assert_eq!(state["optimizer"]["t"], 2);
    assert_eq!(state["steps_done"], 8);
    assert_eq!(
        state["dynamic_loss_scale"],
        serde_json::json!({"window": 2, "scale": 524288, "clean_steps": 0})
    );
    assert_eq!(
        json(out.join("step-6/train_state.json"))["dynamic_loss_scale"]["clean_steps"],
        1
    );

    // Stopped after step 6 (one clean step counted towards the window) and resumed: steps 7
    // and 8 again, to the same bytes.
    let resumed = tmp.path().join("resumed");
    let stderr = run_ok(&[
        "train".into(),
        "--resume".into(),
        path_str(&out.join("step-6")).into(),
        "--tokens".into(),
        path_str(&tokens).into(),
        "--out".into(),
        path_str(&resumed).into(),
    ]);
    let progress: Vec<&str> = stderr.lines().filter(|l| l.starts_with("step ")).collect();
    assert_eq!(progress.len(), 2, "{stderr}");
    assert!(progress[1].starts_with("step 8/8: ") && progress[1].contains("SKIPPED"));
    for name in [
        "checkpoint/model.safetensors",
        "checkpoint/train_state.json",
        "checkpoint/train_state.safetensors",
        "train.csv",
        "loss.svg",
    ] {
        assert!(
            read(out.join(name)) == read(resumed.join(name)),
            "{name} differs after the resume"
        );
    }
}

/// The fast fidelity's numerics are the f32 CPU reference's and take no scale: `dynamic` is
/// accepted and does nothing, as a fixed scale (empty scale column, nothing skipped, the
/// state's scale still its start).
#[test]
fn the_fast_fidelity_takes_dynamic_scaling_as_a_no_op() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = same_windows(tmp.path());
    let out = tmp.path().join("fast");
    let extra = [
        "--fidelity",
        "fast",
        "--dtype",
        "fp16",
        "--loss-scale",
        "dynamic",
    ];
    run_ok(&run_args(&tokens, &out, "3", &extra));
    let rows = csv_rows(&out);
    assert!(
        rows.iter().all(|r| r[5].is_empty() && r[6] == "0"),
        "{rows:?}"
    );
    let report = json(out.join("train.json"));
    assert_eq!(report["loss_scale"], Value::Null);
    assert_eq!(report["loss_scaling"], Value::Null);
    let state = json(out.join("checkpoint/train_state.json"));
    assert_eq!(state["loss_scale"], "dynamic");
    // `auto` for 2 x 15 predicted positions in fp16 is 16; the default window is 50.
    assert_eq!(
        state["dynamic_loss_scale"],
        serde_json::json!({"window": 50, "scale": 16, "clean_steps": 0})
    );
    assert_eq!(state["optimizer"]["t"], 3);
}

#[test]
fn bad_scale_flags_are_refused_on_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = same_windows(tmp.path());
    let out = tmp.path().join("out");
    let fast = ["--fidelity", "fast"];
    let refused = |extra: &[&str], needles: &[&str]| {
        let args = run_args(&tokens, &out, "2", &[&fast[..], extra].concat());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_fails(&wafersim(&argv), 2, needles);
        assert!(!out.exists(), "{extra:?} created the output folder");
    };
    refused(
        &["--loss-scale-window", "5"],
        &[
            "--loss-scale-window",
            "only --loss-scale dynamic has a window (the run's scale is auto)",
        ],
    );
    refused(
        &["--loss-scale", "dynamic", "--loss-scale-window", "0"],
        &["--loss-scale-window", "must be at least 1"],
    );
    refused(
        &["--loss-scale", "dynamic:3"],
        &["--loss-scale", "dynamic or dynamic:L"],
    );
}

/// The state digests `model.safetensors`: a resume from a checkpoint whose weights file was
/// replaced (here by the run's later weights, a valid file of the same model) is refused.
#[test]
fn a_replaced_weights_file_is_refused_on_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = same_windows(tmp.path());
    let out = tmp.path().join("run");
    let extra = ["--fidelity", "fast", "--save-every", "1"];
    run_ok(&run_args(&tokens, &out, "3", &extra));
    let step1 = out.join("step-1");
    let digest = |dir: &Path| -> String {
        json(dir.join("train_state.json"))["weights_digest"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // The digest is FNV-1a 64 over the file's bytes (worked out here, apart from the library).
    let fnv = read(step1.join("model.safetensors"))
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    assert_eq!(digest(&step1), format!("fnv1a64:{fnv:016x}"));
    fs::copy(
        out.join("step-2/model.safetensors"),
        step1.join("model.safetensors"),
    )
    .unwrap();
    let resumed = tmp.path().join("resumed");
    let run = wafersim(&[
        "train",
        "--resume",
        path_str(&step1),
        "--tokens",
        path_str(&tokens),
        "--out",
        path_str(&resumed),
    ]);
    assert_fails(
        &run,
        2,
        &[
            "model.safetensors: digest fnv1a64:",
            &format!(
                "but the run's state was written with weights of digest {}",
                digest(&step1)
            ),
            "the weights file was replaced",
        ],
    );
    assert!(!resumed.exists());
}

/// An overflow at a scale of 1 has nothing lower to try: the run stops (exit 1, one line,
/// nothing written) instead of skipping on. The weights here overflow fp16 themselves: the
/// first block's MLP input weights scaled from a standard deviation of 0.02 to 200,000, beyond
/// fp16's largest finite value (65,504), so the fp16 weights streamed in are infinite wherever
/// `|w| > 0.0065`, and the step's loss is not finite at any loss scale.
#[test]
fn an_overflow_at_scale_one_stops_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = same_windows(tmp.path());
    let init = tmp.path().join("huge");
    let made = wafersim(&[
        "init",
        "--model",
        "tiny",
        "--seed",
        "0",
        "--out",
        path_str(&init),
    ]);
    assert_eq!(made.code, 0, "{}", made.stderr);
    scale_tensor(&init.join("model.safetensors"), "h.0.mlp.c_fc.weight", 1e7);
    let out = tmp.path().join("out");
    let mut args = run_args(&tokens, &out, "2", &["--dtype", "fp16"]);
    args.extend(["--loss-scale", "dynamic:1", "--checkpoint", path_str(&init)].map(String::from));
    // `--model tiny` starts a run from the preset; the checkpoint replaces it.
    args.drain(1..3);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = wafersim(&argv);
    assert_fails(
        &run,
        1,
        &[
            "step 1: ",
            "at loss scale 1, the floor of dynamic loss scaling",
        ],
    );
    assert!(!out.exists(), "a failed run wrote {}", out.display());
}

/// Multiplies the tensor whose name ends in `suffix` of the safetensors file at `path` by
/// `factor`, in place.
fn scale_tensor(path: &Path, suffix: &str, factor: f32) {
    let bytes = read(path.to_path_buf());
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let mut data = view.data().to_vec();
            if name.ends_with(suffix) {
                for chunk in data.chunks_exact_mut(4) {
                    let v = f32::from_le_bytes(chunk.try_into().unwrap()) * factor;
                    chunk.copy_from_slice(&v.to_le_bytes());
                }
            }
            (name, view.shape().to_vec(), data)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, d)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d);
            (n.clone(), view.unwrap())
        })
        .collect();
    fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// A state written before `weights_digest`, `dynamic_loss_scale` and the rows' `loss_scale` and
/// `skipped` existed (the same schema, `v1`) still resumes, to the bytes of the run never
/// stopped (whose state has the fields: the resumed run writes them again).
#[test]
fn a_state_without_the_newer_fields_still_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = same_windows(tmp.path());
    let out = tmp.path().join("run");
    let extra = ["--fidelity", "fast", "--save-every", "1"];
    run_ok(&run_args(&tokens, &out, "3", &extra));
    let state_path = out.join("step-1/train_state.json");
    let mut state = json(state_path.clone());
    let object = state.as_object_mut().unwrap();
    assert!(object.remove("weights_digest").is_some());
    for row in object["log"].as_array_mut().unwrap() {
        let row = row.as_object_mut().unwrap();
        assert!(row.remove("loss_scale").is_some() && row.remove("skipped").is_some());
    }
    fs::write(&state_path, serde_json::to_string_pretty(&state).unwrap()).unwrap();
    let resumed = tmp.path().join("resumed");
    run_ok(&[
        "train".into(),
        "--resume".into(),
        path_str(&out.join("step-1")).into(),
        "--tokens".into(),
        path_str(&tokens).into(),
        "--out".into(),
        path_str(&resumed).into(),
    ]);
    for name in [
        "checkpoint/model.safetensors",
        "checkpoint/train_state.json",
        "checkpoint/train_state.safetensors",
        "train.csv",
    ] {
        assert!(
            read(out.join(name)) == read(resumed.join(name)),
            "{name} differs after the resume"
        );
    }
}
