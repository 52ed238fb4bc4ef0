//! Every input path of every command, driven wrong on purpose through the built binary.
//!
//! The contract (issue 7): invalid input gives exactly one stderr line starting with `error:`
//! that names the flag or file, the field and the reason, and exit code 2; a run that cannot
//! finish (does not fit, cycle limit, non-finite result) exit code 1; never a panic, even with
//! `RUST_BACKTRACE=1`; and no output left behind. Every case here is refused before anything is
//! simulated, except the few that must run to fail (they use the tiny model on an 8 x 8 fabric,
//! about a second each).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use wafersim::model::GptConfig;
use wafersim::model::checkpoint::{CONFIG_FILE, WEIGHTS_FILE, hf_named_tensors};
use wafersim::model::init_params;

mod common;
use common::{Run, path_str as s, wafersim};

/// Runs `args`, expecting a refusal: exit code `code` and exactly one stderr line, `error: ...`,
/// containing every needle (see [`common::assert_fails`]).
#[track_caller]
fn assert_fails(args: &[&str], code: i32, needles: &[&str]) -> Run {
    let run = wafersim(args);
    // Shown with a failure: which command it was.
    eprintln!("wafersim {}", args.join(" "));
    common::assert_fails(&run, code, needles);
    run
}

/// The names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("folder exists")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn tiny() -> GptConfig {
    GptConfig::preset("tiny").unwrap()
}

// ---------------------------------------------------------------------------------------------
// Flags

#[test]
fn usage_errors_are_one_line_naming_the_argument() {
    let cases: &[(&[&str], &[&str])] = &[
        (&["presets", "extra"], &["'extra'"]),
        (&["step", "--model", "tiny", "--out", "x"], &["--fabric"]),
        (
            &[
                "gemm", "--m", "abc", "--k", "4", "--n", "4", "--fabric", "4x4",
            ],
            &["--m", "abc"],
        ),
        (
            &["step", "--batch", "two", "--fabric", "4x4", "--out", "x"],
            &["--batch", "two"],
        ),
        (
            &[
                "gemm", "--m", "4", "--k", "4", "--n", "4", "--fabric", "4x4", "--phase", "up",
            ],
            &["--phase", "up"],
        ),
        (
            &[
                "step",
                "--model",
                "tiny",
                "--checkpoint",
                "c",
                "--fabric",
                "4x4",
                "--out",
                "x",
            ],
            &["--checkpoint", "--model"],
        ),
        (&["flops"], &["--model", "--config"]),
        (&["init", "--out", "never"], &["--model", "--config"]),
        (
            &["flops", "--model", "tiny", "--seq", "1"],
            &["--seq", "below 2"],
        ),
        (
            &["sweep", "--sparsity", "0.5,0.5"],
            &["--sparsity", "0.5 is listed twice"],
        ),
        (
            &["sweep", "--sparsity", "-0,0"],
            &["--sparsity", "0 is listed twice"],
        ),
        (&["frobnicate"], &["frobnicate"]),
    ];
    for (args, needles) in cases {
        assert_fails(args, 2, needles);
    }
}

#[test]
fn help_and_version_still_go_to_stdout_with_exit_code_0() {
    let run = wafersim(&["--version"]);
    assert_eq!(run.code, 0);
    assert!(run.stdout.starts_with("wafersim "), "{}", run.stdout);
    let run = wafersim(&["step", "--help"]);
    assert_eq!(run.code, 0);
    assert!(run.stdout.contains("--fabric"), "{}", run.stdout);
}

/// Standard output on a full device (Linux's `/dev/full`): one error line, exit code 1, not a
/// panic in `println!`.
#[cfg(target_os = "linux")]
#[test]
fn a_full_stdout_is_one_error_line() {
    for args in [vec!["presets"], vec!["flops", "--model", "tiny"]] {
        let full = fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_wafersim"))
            .args(&args)
            .env("RUST_BACKTRACE", "1")
            .stdout(full)
            .output()
            .unwrap();
        let run = Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::new(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        common::assert_fails(
            &run,
            1,
            &["cannot write to standard output", "No space left on device"],
        );
    }
}

#[test]
fn bad_sparsities_are_refused_by_every_command() {
    for bad in ["NaN", "nan", "-0.5", "1", "1.5", "inf", "x"] {
        let gemm = [
            "gemm", "--m", "4", "--k", "4", "--n", "4", "--fabric", "4x4",
        ];
        let list = format!("0,{bad}");
        let commands: [Vec<&str>; 4] = [
            [&gemm[..], &["--sparsity", bad]].concat(),
            vec![
                "step",
                "--fabric",
                "8x8",
                "--out",
                "never",
                "--sparsity",
                bad,
            ],
            vec!["sweep", "--sparsity", &list],
            vec!["flops", "--model", "tiny", "--sparsity", &list],
        ];
        for args in &commands {
            let run = assert_fails(args, 2, &["--sparsity"]);
            assert!(run.stdout.is_empty(), "{args:?} printed {}", run.stdout);
        }
    }
    assert!(!Path::new("never").exists());
}

#[test]
fn a_sparsity_that_prunes_every_weight_of_a_gemm_is_refused() {
    // round(0.99 x 16) = 16 of 16 weights: no FLOP reduction is defined.
    let args = [
        "gemm",
        "--m",
        "4",
        "--k",
        "4",
        "--n",
        "4",
        "--fabric",
        "4x4",
        "--sparsity",
        "0.99",
    ];
    assert_fails(&args, 2, &["--sparsity", "prunes all 16 weights"]);
}

/// The model's commands refuse a sparsity that empties the smallest sparse matrices (tiny's
/// 64 x 64: round(0.9999 x 4096) = 4096), as `gemm` does, instead of reporting null ratios.
#[test]
fn a_sparsity_that_prunes_every_weight_of_a_model_matrix_is_refused() {
    let needles = [
        "--sparsity",
        "prunes every weight of the 64 x 64 `q` matrices",
    ];
    for args in [
        &[
            "step",
            "--model",
            "tiny",
            "--fabric",
            "8x8",
            "--out",
            "never",
            "--sparsity",
            "0.9999",
        ][..],
        &["sweep", "--fabric", "8x8", "--sparsity", "0.5,0.9999"],
        &["flops", "--model", "tiny", "--sparsity", "0.9999"],
        &[
            "recipe",
            "--model",
            "tiny",
            "--fabric",
            "8x8",
            "--pretrain-tokens",
            "1000",
            "--sparsity",
            "0.9999",
        ],
    ] {
        assert_fails(args, 2, &needles);
    }
    assert!(!Path::new("never").exists());
}

#[test]
fn impossible_fabric_specs_name_the_field() {
    let cases: &[(&str, &[&str])] = &[
        ("0x0", &["--fabric", "width", "0 is outside 1..=4096"]),
        ("8x0", &["--fabric", "height"]),
        ("5000x5000", &["--fabric", "width", "5000"]),
        ("99999999999x2", &["--fabric", "unknown fabric"]),
        ("-1x3", &["--fabric", "unknown fabric"]),
        ("wse9", &["--fabric", "wse9"]),
        ("", &["--fabric"]),
    ];
    for (spec, needles) in cases {
        assert_fails(
            &[
                "gemm",
                "--m",
                "4",
                "--k",
                "4",
                "--n",
                "4",
                &format!("--fabric={spec}"),
            ],
            2,
            needles,
        );
        assert_fails(&["sweep", &format!("--fabric={spec}")], 2, needles);
    }
}

#[test]
fn batch_and_sequence_flags_are_checked_before_tokens_are_drawn() {
    let max = usize::MAX.to_string();
    let cases: &[(&[&str], &[&str])] = &[
        (&["--batch", "0"], &["--batch/--seq", "batch size is 0"]),
        (&["--seq", "1"], &["--batch/--seq", "below 2"]),
        (&["--seq", "0"], &["--batch/--seq", "below 2"]),
        (&["--seq", "65"], &["--batch/--seq", "65", "n_positions 64"]),
        (&["--batch", &max, "--seq", "8"], &["--batch/--seq", "2^64"]),
    ];
    for (flags, needles) in cases {
        let step = [&["step", "--fabric", "8x8", "--out", "never"], *flags].concat();
        assert_fails(&step, 2, needles);
        let sweep = [&["sweep"], *flags].concat();
        assert_fails(&sweep, 2, needles);
    }
    assert_fails(
        &["flops", "--model", "tiny", "--batch", "0"],
        2,
        &["--batch"],
    );
    assert_fails(&["flops", "--model", "tiny", "--seq", "65"], 2, &["--seq"]);
    assert!(!Path::new("never").exists());
}

#[test]
fn learning_rates_must_be_finite_and_non_negative() {
    for lr in ["NaN", "-1", "inf"] {
        let args = ["step", "--fabric", "8x8", "--out", "never", "--lr", lr];
        assert_fails(&args, 2, &["--lr", "lr"]);
    }
    assert!(!Path::new("never").exists());
}

#[test]
fn gemm_sizes_and_regions_are_checked_before_allocating() {
    fn gemm<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        [&["gemm", "--fabric", "4x4"], extra].concat()
    }
    assert_fails(&gemm(&["--m", "0", "--k", "4", "--n", "4"]), 2, &["--m"]);
    assert_fails(&gemm(&["--m", "4", "--k", "0", "--n", "4"]), 2, &["--k"]);
    assert_fails(
        &gemm(&["--m", "4", "--k", "4", "--n", "4", "--region", "0x2"]),
        2,
        &["--region", "0x2"],
    );
    assert_fails(
        &gemm(&["--m", "4", "--k", "4", "--n", "4", "--region", "8x8"]),
        2,
        &["--region", "4 x 4 fabric"],
    );
    // 10^8 x 10^5 inputs would be 40 TB of host memory: refused at once, exit code 1 (a valid
    // request that does not fit), naming the bytes.
    let huge = gemm(&["--m", "100000000", "--k", "100000", "--n", "100000"]);
    assert_fails(&huge, 1, &["does not fit", "49152"]);
    let overflow = gemm(&["--m", "4611686018427387904", "--k", "8", "--n", "8"]);
    assert_fails(&overflow, 1, &["does not fit"]);
    let small = ["--m", "4", "--k", "4", "--n", "4"];
    assert_fails(
        &gemm(&[&small[..], &["--cycle-limit", "0"]].concat()),
        2,
        &["--cycle-limit", "at least 1"],
    );
    assert_fails(
        &gemm(&[&small[..], &["--cycle-limit", "10", "--fidelity", "fast"]].concat()),
        2,
        &["--cycle-limit", "the fast one simulates nothing"],
    );
}

#[test]
fn unknown_presets_list_the_known_ones() {
    assert_fails(
        &["flops", "--model", "gpt5"],
        2,
        &["--model", "gpt5", "tiny"],
    );
    assert_fails(
        &["init", "--model", "gpt5", "--out", "never"],
        2,
        &["--model", "gpt5"],
    );
    assert_fails(
        &[
            "step", "--model", "gpt5", "--fabric", "8x8", "--out", "never",
        ],
        2,
        &["--model"],
    );
    assert_fails(&["sweep", "--model", "gpt5"], 2, &["--model"]);
}

// ---------------------------------------------------------------------------------------------
// Model config.json

/// The tiny preset's config.json with `key` set to `value` (`None`: removed).
fn tiny_config_with(key: &str, value: Option<serde_json::Value>) -> String {
    let mut config: serde_json::Value = serde_json::from_str(&tiny().to_hf_json()).unwrap();
    let fields = config.as_object_mut().unwrap();
    assert!(fields.contains_key(key), "{key} not in the tiny config");
    match value {
        Some(v) => fields.insert(key.into(), v),
        None => fields.remove(key),
    };
    config.to_string()
}

fn config_cases() -> Vec<(&'static str, String, Vec<&'static str>)> {
    use serde_json::json;
    let with = |key, value| tiny_config_with(key, Some(value));
    vec![
        (
            "truncated",
            tiny().to_hf_json()[..40].to_string(),
            vec!["EOF"],
        ),
        ("not-json", "layers: 2".into(), vec!["expected value"]),
        ("empty", String::new(), vec!["EOF"]),
        ("array", "[1, 2]".into(), vec!["invalid type"]),
        (
            "no-layers",
            tiny_config_with("n_layer", None),
            vec!["missing field `n_layer`"],
        ),
        (
            "zero-layers",
            with("n_layer", json!(0)),
            vec!["n_layer", "at least 1"],
        ),
        ("negative", with("n_embd", json!(-64)), vec!["-64"]),
        (
            "string",
            with("n_head", json!("4")),
            vec!["invalid type: string"],
        ),
        (
            "heads",
            with("n_head", json!(3)),
            vec!["n_head", "divisible"],
        ),
        (
            "absurd-layers",
            with("n_layer", json!(1_000_000_000u64)),
            vec!["n_layer", "limit 1024"],
        ),
        (
            "absurd-width",
            with("n_embd", json!(1u64 << 32)),
            vec!["n_embd", "limit"],
        ),
        (
            "absurd-positions",
            with("n_positions", json!(u64::MAX)),
            vec!["n_positions", "limit"],
        ),
        (
            "absurd-vocab",
            with("vocab_size", json!(1u64 << 40)),
            vec!["vocab_size", "limit"],
        ),
        (
            "relu",
            with("activation_function", json!("relu")),
            vec!["activation_function", "relu"],
        ),
        (
            "untied",
            with("tie_word_embeddings", json!(false)),
            vec!["tie_word_embeddings"],
        ),
        (
            "epsilon",
            with("layer_norm_epsilon", json!(-1.0)),
            vec!["layer_norm_epsilon"],
        ),
        (
            "other-model",
            with("model_type", json!("llama")),
            vec!["model_type", "llama"],
        ),
    ]
}

#[test]
fn bad_config_json_names_the_file_and_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, text, needles) in config_cases() {
        let path = tmp.path().join(format!("{name}.json"));
        fs::write(&path, text).unwrap();
        let out = tmp.path().join(format!("{name}-out"));
        let file = [s(&path)];
        let needles: Vec<&str> = [&file[..], &needles].concat();
        assert_fails(&["flops", "--config", s(&path)], 2, &needles);
        assert_fails(
            &["init", "--config", s(&path), "--out", s(&out)],
            2,
            &needles,
        );
        assert!(!out.exists(), "{name}: init left {}", out.display());
    }
    let missing = tmp.path().join("missing.json");
    assert_fails(
        &["flops", "--config", s(&missing)],
        2,
        &["--config", "missing.json", "No such file"],
    );
}

// ---------------------------------------------------------------------------------------------
// Fabric config files

#[test]
fn bad_fabric_files_name_the_file_and_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "truncated.toml",
            "base = \"8x8\"\nqueue_depth = ",
            &["TOML parse error"],
        ),
        ("truncated.json", "{\"base\": \"8x8\"", &["EOF"]),
        ("binary.toml", "\u{0}\u{1}\u{2}", &["TOML parse error"]),
        (
            "unknown.toml",
            "base = \"8x8\"\nqeueu_depth = 2\n",
            &["qeueu_depth", "unknown field"],
        ),
        (
            "zero.toml",
            "base = \"8x8\"\nwidth = 0\n",
            &["width", "0 is outside"],
        ),
        ("zero-base.toml", "base = \"0x0\"\n", &["width"]),
        (
            "absurd.json",
            "{\"width\": 100000, \"height\": 100000}",
            &["width", "100000"],
        ),
        (
            "overflow.toml",
            "width = 4294967296\n",
            &["width", "4294967296"],
        ),
        (
            "negative.json",
            "{\"base\": \"8x8\", \"height\": -1}",
            &["height", "-1"],
        ),
        ("type.toml", "colors = \"many\"\n", &["colors"]),
        ("float.toml", "clock_mhz = 1e9\n", &["clock_mhz"]),
        ("base.toml", "base = 3\n", &["base"]),
        ("array.json", "[1, 2]", &["table"]),
        (
            "queue.toml",
            "base = \"8x8\"\nqueue_depth = 0\n",
            &["queue_depth"],
        ),
        (
            "simd.toml",
            "base = \"8x8\"\n[simd]\nmax = 0\n",
            &["simd.max"],
        ),
        (
            "sram.toml",
            "base = \"8x8\"\nsram_bytes = 6\n",
            &["sram_bytes"],
        ),
    ];
    for (name, text, needles) in cases {
        let path = tmp.path().join(name);
        fs::write(&path, text).unwrap();
        let flag = format!("--fabric {}", s(&path));
        let needles: Vec<&str> = [&[flag.as_str()][..], needles].concat();
        assert_fails(
            &[
                "gemm",
                "--m",
                "4",
                "--k",
                "4",
                "--n",
                "4",
                "--fabric",
                s(&path),
            ],
            2,
            &needles,
        );
        assert_fails(&["sweep", "--fabric", s(&path)], 2, &needles);
    }
    let missing = tmp.path().join("missing.toml");
    assert_fails(
        &["sweep", "--fabric", s(&missing)],
        2,
        &["missing.toml", "No such file"],
    );
}

/// A one-step dense fine-tuning of `tiny` on `fabric` (a token file written into `dir`) fails
/// with `code` and `needles` and leaves no `out`.
fn one_train_step_fails(dir: &Path, fabric: &str, code: i32, needles: &[&str]) {
    let tokens = dir.join("tokens.json");
    fs::write(&tokens, serde_json::to_string(&vec![1u32; 64]).unwrap()).unwrap();
    let out = dir.join("out-train");
    let args = [
        "train",
        "--model",
        "tiny",
        "--phase",
        "dense-finetune",
        "--steps",
        "1",
    ];
    let shape = ["--batch", "1", "--seq", "8", "--fabric", fabric];
    let paths = ["--tokens", s(&tokens), "--out", s(&out)];
    assert_fails(&[&args[..], &shape, &paths].concat(), code, needles);
    assert!(!out.exists());
}
#[test]
fn a_fabric_with_too_few_colors_is_refused_at_either_fidelity() {
    // The attention routes on colors 0-11 (K/V gather 0-3, dK/dV reduction 4-7, head sums
    // 8-11); one linear layer on 0-6 (the weight gradient's pattern, row and column chains).
    // Before this check the fast fidelity costed such steps as if the colors existed.
    let tmp = tempfile::tempdir().unwrap();
    let eleven = tmp.path().join("eleven.toml");
    fs::write(&eleven, "base = \"16x16\"\ncolors = 11\n").unwrap();
    let step_needles = ["--fabric", "11 colors", "route on 12"];
    for fidelity in ["exact", "fast"] {
        let out = tmp.path().join(format!("out-{fidelity}"));
        let step = ["step", "--fabric", s(&eleven), "--fidelity", fidelity];
        assert_fails(&[&step[..], &["--out", s(&out)]].concat(), 2, &step_needles);
        assert!(!out.exists());
        let sweep = ["sweep", "--fabric", s(&eleven), "--fidelity", fidelity];
        assert_fails(&sweep, 2, &step_needles);
    }
    let recipe = ["recipe", "--model", "tiny", "--pretrain-tokens", "1000"];
    assert_fails(
        &[&recipe[..], &["--sparsity", "0.5", "--fabric", s(&eleven)]].concat(),
        2,
        &step_needles,
    );
    // With --seq, recipe plans the step itself: the same fabric, the same verdict (it was exit
    // code 1, unnamed, before one rule served every command: robustness audit 7, item 8).
    let with_seq = ["--sparsity", "0.5", "--seq", "16", "--fabric", s(&eleven)];
    assert_fails(&[&recipe[..], &with_seq].concat(), 2, &step_needles);
    one_train_step_fails(tmp.path(), s(&eleven), 2, &step_needles);
    // Eleven colors are enough for one layer; six are not.
    let six = tmp.path().join("six.toml");
    fs::write(&six, "base = \"16x16\"\ncolors = 6\n").unwrap();
    let gemm = [
        "gemm",
        "--m",
        "16",
        "--k",
        "16",
        "--n",
        "16",
        "--fidelity",
        "fast",
    ];
    assert_fails(
        &[&gemm[..], &["--fabric", s(&six)]].concat(),
        2,
        &["--fabric", "6 colors", "route on 7"],
    );
    let run = wafersim(&[&gemm[..], &["--fabric", s(&eleven)]].concat());
    assert_eq!(run.code, 0, "{}", run.stderr);
}

// ---------------------------------------------------------------------------------------------
// Checkpoints

/// One tensor of a hand-made safetensors file: name, dtype, shape, little-endian bytes.
type RawTensor = (String, &'static str, Vec<usize>, Vec<u8>);

/// The tensors of a valid tiny checkpoint (seed 0), as f32.
fn tiny_tensors() -> Vec<RawTensor> {
    let params = init_params(&tiny(), 0);
    hf_named_tensors(&params)
        .into_iter()
        .map(|(name, shape, data)| (name, "F32", shape, f32_bytes(&data)))
        .collect()
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A safetensors file built by hand (so dtypes, shapes and sizes can be anything consistent).
fn safetensors_bytes(tensors: &[RawTensor]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
    }
    let header = serde_json::to_vec(&header).unwrap();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    for (_, _, _, bytes) in tensors {
        out.extend_from_slice(bytes);
    }
    out
}

fn edit(mut tensors: Vec<RawTensor>, name: &str, f: impl FnOnce(&mut RawTensor)) -> Vec<RawTensor> {
    let t = tensors
        .iter_mut()
        .find(|t| t.0 == name)
        .unwrap_or_else(|| panic!("no tensor {name}"));
    f(t);
    tensors
}

fn set_f32(t: &mut RawTensor, index: usize, value: f32) {
    t.3[4 * index..4 * index + 4].copy_from_slice(&value.to_le_bytes());
}

/// `(case, weights file bytes, what the error must say)`.
fn checkpoint_cases() -> Vec<(&'static str, Vec<u8>, Vec<&'static str>)> {
    let valid = safetensors_bytes(&tiny_tensors());
    let not_safetensors = vec!["model.safetensors", "is not a valid safetensors file"];
    let mut huge_header = u64::MAX.to_le_bytes().to_vec();
    huge_header.extend_from_slice(b"{}");
    let extra = {
        let mut t = tiny_tensors();
        t.push((
            "transformer.h.9.mlp.c_fc.weight".into(),
            "F32",
            vec![1],
            vec![0; 4],
        ));
        t
    };
    let missing: Vec<RawTensor> = tiny_tensors()
        .into_iter()
        .filter(|t| t.0 != "transformer.ln_f.bias")
        .collect();
    vec![
        (
            "truncated",
            valid[..valid.len() / 2].to_vec(),
            not_safetensors.clone(),
        ),
        (
            "header-only",
            valid[..100].to_vec(),
            not_safetensors.clone(),
        ),
        ("empty", Vec::new(), not_safetensors.clone()),
        (
            "garbage",
            b"certainly not a tensor file".to_vec(),
            not_safetensors.clone(),
        ),
        ("huge-header", huge_header, not_safetensors),
        (
            "missing",
            safetensors_bytes(&missing),
            vec!["missing tensor `transformer.ln_f.bias`"],
        ),
        (
            "extra",
            safetensors_bytes(&extra),
            vec!["unexpected tensor `transformer.h.9.mlp.c_fc.weight`"],
        ),
        (
            "shape",
            safetensors_bytes(&edit(tiny_tensors(), "transformer.wpe.weight", |t| {
                t.2 = vec![32, 64];
                t.3.truncate(32 * 64 * 4);
            })),
            vec!["`transformer.wpe.weight`", "[32, 64]", "expected [64, 64]"],
        ),
        (
            "dtype",
            safetensors_bytes(&edit(tiny_tensors(), "transformer.ln_f.bias", |t| {
                t.1 = "I32"
            })),
            vec!["`transformer.ln_f.bias`", "dtype I32"],
        ),
        (
            "f64",
            safetensors_bytes(&edit(tiny_tensors(), "transformer.ln_f.bias", |t| {
                t.1 = "F64";
                t.3 = [t.3.clone(), t.3.clone()].concat();
            })),
            vec!["`transformer.ln_f.bias`", "dtype F64"],
        ),
        (
            "nan",
            safetensors_bytes(&edit(
                tiny_tensors(),
                "transformer.h.1.mlp.c_proj.weight",
                |t| set_f32(t, 5, f32::NAN),
            )),
            vec!["`transformer.h.1.mlp.c_proj.weight`", "NaN", "index 5"],
        ),
        (
            "inf",
            safetensors_bytes(&edit(tiny_tensors(), "transformer.wte.weight", |t| {
                set_f32(t, 0, f32::NEG_INFINITY)
            })),
            vec!["`transformer.wte.weight`", "-inf", "index 0"],
        ),
    ]
}

/// A checkpoint folder `dir/name` with the tiny config and `weights` as its safetensors file.
fn checkpoint_dir(dir: &Path, name: &str, weights: &[u8]) -> PathBuf {
    let ckpt = dir.join(name);
    fs::create_dir(&ckpt).unwrap();
    fs::write(ckpt.join(CONFIG_FILE), tiny().to_hf_json()).unwrap();
    fs::write(ckpt.join(WEIGHTS_FILE), weights).unwrap();
    ckpt
}

#[test]
fn bad_checkpoints_name_the_file_and_the_tensor_in_every_command() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    for (name, weights, needles) in checkpoint_cases() {
        let ckpt = checkpoint_dir(tmp.path(), name, &weights);
        let needles: Vec<&str> = [&[name][..], &needles].concat();
        assert_fails(&["inspect", "--checkpoint", s(&ckpt)], 2, &needles);
        let step = [
            "step",
            "--checkpoint",
            s(&ckpt),
            "--fabric",
            "8x8",
            "--out",
            s(&out),
        ];
        assert_fails(&step, 2, &[&["--checkpoint"][..], &needles].concat());
        assert_fails(&["sweep", "--checkpoint", s(&ckpt)], 2, &needles);
        assert!(!out.exists(), "{name}: step left its output folder");
    }
}

#[test]
fn a_checkpoint_without_or_with_a_broken_config_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = safetensors_bytes(&tiny_tensors());
    let ckpt = checkpoint_dir(tmp.path(), "no-config", &weights);
    fs::remove_file(ckpt.join(CONFIG_FILE)).unwrap();
    assert_fails(
        &["inspect", "--checkpoint", s(&ckpt)],
        2,
        &["no-config/config.json", "No such file"],
    );
    let ckpt = checkpoint_dir(tmp.path(), "bad-config", &weights);
    fs::write(ckpt.join(CONFIG_FILE), "{\"n_layer\": 2").unwrap();
    assert_fails(
        &["sweep", "--checkpoint", s(&ckpt)],
        2,
        &["bad-config/config.json", "EOF"],
    );
    // A config that disagrees with the weights: the tensors are named with both shapes.
    let ckpt = checkpoint_dir(tmp.path(), "other-shape", &weights);
    fs::write(
        ckpt.join(CONFIG_FILE),
        tiny_config_with("n_positions", Some(serde_json::json!(32))),
    )
    .unwrap();
    assert_fails(
        &["inspect", "--checkpoint", s(&ckpt)],
        2,
        &["`transformer.wpe.weight`", "expected [32, 64]"],
    );
    let missing = tmp.path().join("missing");
    assert_fails(
        &[
            "step",
            "--checkpoint",
            s(&missing),
            "--fabric",
            "8x8",
            "--out",
            "never",
        ],
        2,
        &["--checkpoint", "missing"],
    );
}

// ---------------------------------------------------------------------------------------------
// Token files

#[test]
fn bad_token_files_name_the_file_and_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let long = format!("[[{}]]", vec!["1"; 65].join(","));
    let cases: &[(&str, &[u8], &[&str])] = &[
        ("truncated", b"[[1, 2", &["EOF"]),
        ("not-json", b"hello", &["expected value"]),
        ("object", b"{\"tokens\": [[1, 2]]}", &["invalid type: map"]),
        ("flat", b"[1, 2, 3]", &["invalid type: integer"]),
        (
            "ragged",
            b"[[1, 2, 3], [4, 5]]",
            &["sequence 1 has 2 tokens, sequence 0 has 3"],
        ),
        (
            "out-of-vocab",
            b"[[1, 2, 256]]",
            &["token id 256", "position 2", "vocabulary of 256"],
        ),
        ("negative", b"[[1, -2]]", &["-2"]),
        ("fraction", b"[[1.5, 2]]", &["1.5"]),
        ("too-big", b"[[1, 99999999999]]", &["99999999999"]),
        ("empty-batch", b"[]", &["batch size is 0"]),
        ("empty-sequence", b"[[]]", &["sequence length 0 is below 2"]),
        ("one-token", b"[[7]]", &["sequence length 1 is below 2"]),
        (
            "long",
            long.as_bytes(),
            &["sequence length 65", "n_positions 64"],
        ),
        ("binary", b"\xff\xfe\x00", &["UTF-8"]),
    ];
    let out = tmp.path().join("out");
    for (name, text, needles) in cases {
        let path = tmp.path().join(format!("{name}.json"));
        fs::write(&path, text).unwrap();
        let flag = format!("--tokens {}", s(&path));
        let needles: Vec<&str> = [&[flag.as_str()][..], needles].concat();
        let args = [
            "step",
            "--fabric",
            "8x8",
            "--out",
            s(&out),
            "--tokens",
            s(&path),
        ];
        assert_fails(&args, 2, &needles);
        assert!(!out.exists(), "{name}: step left its output folder");
    }
    let missing = tmp.path().join("missing.json");
    let args = [
        "step",
        "--fabric",
        "8x8",
        "--out",
        s(&out),
        "--tokens",
        s(&missing),
    ];
    assert_fails(&args, 2, &["--tokens", "missing.json", "No such file"]);
}

// ---------------------------------------------------------------------------------------------
// Output paths

#[test]
fn unwritable_output_paths_are_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    fs::write(&file, "keep").unwrap();
    let nested = tmp.path().join("missing").join("out");
    let nested_json = nested.join("g.json");
    let folder = tmp.path().join("a-folder");
    fs::create_dir_all(folder.join("report.json")).unwrap();
    fs::create_dir_all(folder.join("sweep.json")).unwrap();
    let gemm = [
        "gemm", "--m", "4", "--k", "4", "--n", "4", "--fabric", "4x4", "--json",
    ];
    let flops = ["flops", "--model", "tiny", "--json"];
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["step", "--fabric", "8x8", "--out", s(&nested)],
            vec!["--out", "does not exist"],
        ),
        (
            vec!["step", "--fabric", "8x8", "--out", s(&file)],
            vec!["--out", "a-file is not a folder"],
        ),
        (
            vec!["step", "--fabric", "8x8", "--out", s(&folder)],
            vec!["--out", "report.json is a folder"],
        ),
        (
            vec!["sweep", "--out", s(&nested)],
            vec!["--out", "does not exist"],
        ),
        (
            vec!["sweep", "--out", s(&file)],
            vec!["--out", "not a folder"],
        ),
        (
            vec!["sweep", "--out", s(&folder)],
            vec!["--out", "sweep.json is a folder"],
        ),
        (
            [&gemm[..], &[s(&folder)]].concat(),
            vec!["--json", "is a folder"],
        ),
        (
            [&gemm[..], &[s(&nested_json)]].concat(),
            vec!["--json", "does not exist"],
        ),
        (
            [&flops[..], &[s(&folder)]].concat(),
            vec!["--json", "is a folder"],
        ),
        (
            vec!["init", "--model", "tiny", "--out", s(&nested)],
            vec!["--out", "does not exist"],
        ),
    ];
    for (args, needles) in cases {
        let run = assert_fails(&args, 2, &needles);
        assert!(
            run.stdout.is_empty(),
            "{args:?} ran before refusing: {}",
            run.stdout
        );
    }
    assert_eq!(listing(tmp.path()), ["a-file", "a-folder"]);
    assert_eq!(listing(&folder), ["report.json", "sweep.json"]);
    assert_eq!(fs::read_to_string(&file).unwrap(), "keep");
}

// ---------------------------------------------------------------------------------------------
// Failures while running: exit code 1

#[test]
fn a_step_that_does_not_fit_is_a_run_failure_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let args = [
        "step",
        "--model",
        "tiny",
        "--fabric",
        "1x1",
        "--out",
        s(&out),
    ];
    assert_fails(&args, 1, &["does not fit", "49152"]);
    assert!(!out.exists());
    assert_fails(&["sweep", "--fabric", "1x1"], 1, &["does not fit"]);
    let recipe = [
        "recipe",
        "--model",
        "tiny",
        "--pretrain-tokens",
        "1000",
        "--sparsity",
        "0.5",
    ];
    assert_fails(
        &[&recipe[..], &["--seq", "16", "--fabric", "1x1"]].concat(),
        1,
        &["does not fit"],
    );
    one_train_step_fails(tmp.path(), "1x1", 1, &["does not fit"]);
}

/// `sweep --losses` asks the fast fidelity for losses; the exact fidelity computes them anyway,
/// so the flag there is refused rather than silently ignored, as `--trace` is at the fast
/// fidelity (robustness audit 7, item 7).
#[test]
fn a_fast_only_flag_at_the_exact_fidelity_is_refused() {
    let sweep = [
        "sweep",
        "--fabric",
        "4x4",
        "--batch",
        "1",
        "--seq",
        "8",
        "--sparsity",
        "0",
    ];
    let run = assert_fails(
        &[&sweep[..], &["--losses"]].concat(),
        2,
        &["--losses", "only with --fidelity fast"],
    );
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    let fast = wafersim(&[&sweep[..], &["--losses", "--fidelity", "fast"]].concat());
    assert_eq!(fast.code, 0, "{}", fast.stderr);
}

#[test]
fn a_sweep_whose_attention_overflows_the_sram_is_refused_exactly_and_flagged_when_costed() {
    // tiny with one sequence of 64 tokens on one PE of 891,392 bytes: even in key blocks of
    // one row the attention backward needs 263,172 bytes beside the 629,248 kept (worked out
    // in tests/cli_step.rs, `ONE_PE`).
    let tmp = tempfile::tempdir().unwrap();
    let fabric = tmp.path().join("one.json");
    fs::write(
        &fabric,
        r#"{"name": "one", "width": 1, "height": 1, "sram_bytes": 891392}"#,
    )
    .unwrap();
    let long = [
        "sweep",
        "--batch",
        "1",
        "--seq",
        "64",
        "--fabric",
        s(&fabric),
    ];
    let needles = [
        "attention does not fit",
        "314372 B (backward), of which 263172 B come on top of the 629248 B of activations kept for the backward pass, of 891392 B",
    ];
    assert_fails(&long, 1, &needles);
    let out = tmp.path().join("out");
    let fast = [
        &long[..],
        &["--fidelity", "fast", "--sparsity", "0.5", "--out", s(&out)],
    ]
    .concat();
    let run = wafersim(&fast);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let warnings = run.stderr.lines().filter(|l| l.starts_with("warning:"));
    assert_eq!(
        warnings.filter(|l| l.contains(needles[1])).count(),
        1,
        "{}",
        run.stderr
    );
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("sweep.json")).unwrap()).unwrap();
    assert_eq!(
        json["region"]["attention"]["backward_bytes_per_pe"],
        314_372
    );
    assert_eq!(json["region"]["attention"]["fits"], false);
}

#[test]
fn a_cycle_limit_names_the_pe_the_task_and_the_color() {
    let args = [
        "gemm",
        "--m",
        "16",
        "--k",
        "16",
        "--n",
        "16",
        "--fabric",
        "4x4",
        "--cycle-limit",
        "30",
    ];
    assert_fails(
        &args,
        1,
        &[
            "cycle limit 30 reached",
            "PE (0, 0)",
            "color 0",
            "data task \"weight\"",
        ],
    );
}

#[test]
fn a_non_finite_result_is_a_run_failure_and_writes_nothing() {
    // lr 1e308 overflows the AdamW update (|m / sqrt(v)| is about 1): the updated weights would be
    // infinite, a checkpoint our own reader refuses.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let args = [
        "step",
        "--fabric",
        "8x8",
        "--batch",
        "1",
        "--seq",
        "8",
        "--no-dense-baseline",
        "--lr",
        "1e308",
        "--out",
        s(&out),
    ];
    assert_fails(
        &args,
        1,
        &[
            "updated weights",
            "--lr",
            "non-finite",
            "nothing was written",
        ],
    );
    assert!(!out.exists());
}

#[test]
fn thread_counts_out_of_range_are_refused() {
    for n in ["0", "100000"] {
        assert_fails(
            &["--threads", n, "presets"],
            2,
            &["--threads", n, "not between 1 and 256"],
        );
    }
    assert_fails(
        &["bench", "--cases", "gemm256", "--threads", "1,300"],
        2,
        &["--threads", "300 is not between 1 and 256"],
    );
}

/// `--threads` before `bench` is bench's list of thread counts, as after it (both helps say so);
/// given in both places, one would be dropped without a word, so that is refused before anything
/// runs (robustness audit 7, item 6).
#[test]
fn bench_thread_counts_given_twice_are_refused() {
    let run = assert_fails(
        &[
            "--threads",
            "2",
            "bench",
            "--threads",
            "1,4",
            "--cases",
            "gemm256",
        ],
        2,
        &["--threads", "given both before and after `bench`"],
    );
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    let help = |args: &[&str]| {
        let run = wafersim(args);
        assert_eq!(run.code, 0, "{}", run.stderr);
        run.stdout.split_whitespace().collect::<Vec<_>>().join(" ")
    };
    let global = help(&["--help"]);
    assert!(
        global.contains("For `bench`: the one thread count to measure"),
        "{global}"
    );
    let bench = help(&["bench", "--help"]);
    assert!(
        bench.contains("`wafersim --threads 4 bench` measures 4 threads alone"),
        "{bench}"
    );
}

/// `bench` checks what it can before the first run: the `gemm256` region and the JSON path.
#[test]
fn bench_arguments_are_checked_before_anything_runs() {
    assert_fails(
        &["bench", "--cases", "gemm256", "--region", "64x64"],
        2,
        &["--region 64x64", "does not fit the 32 x 32 fabric"],
    );
    assert_fails(
        &["bench", "--cases", "gemm256", "--region", "1x1"],
        2,
        &["--region 1x1", "does not fit: a PE needs"],
    );
    assert_fails(
        &[
            "bench",
            "--cases",
            "gemm256",
            "--json",
            "/nonexistent-wafersim/b.json",
        ],
        2,
        &["--json", "does not exist"],
    );
}

#[test]
fn a_token_file_and_a_sequence_length_are_refused_together() {
    assert_fails(
        &[
            "step", "--fabric", "8x8", "--out", "never", "--tokens", "t.json", "--seq", "8",
        ],
        2,
        &["--tokens", "--seq"],
    );
    assert!(!Path::new("never").exists());
}

/// Output into a pipe whose reader has gone (`wafersim ... | head`) ends the process like other
/// Unix tools (SIGPIPE), never with a panic.
#[test]
fn a_closed_stdout_ends_the_run_without_a_panic() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wafersim"))
        .args(["flops", "--model", "gpt2-small", "--sparsity", "0,0.5,0.9"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the binary starts");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("the binary ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_ne!(out.status.code(), Some(101), "{stderr}");
}

#[test]
fn recipe_flags_are_named() {
    let recipe = |extra: &[&'static str]| -> Vec<&'static str> {
        [&["recipe", "--model", "tiny", "--fabric", "8x8"][..], extra].concat()
    };
    assert_fails(
        &recipe(&["--pretrain-tokens", "1000", "--batch", "0"]),
        2,
        &["--batch", "at least 1"],
    );
    assert_fails(
        &recipe(&["--pretrain-tokens", "0.5"]),
        2,
        &["--pretrain-tokens", "0.5 tokens: expected a whole number"],
    );
}

/// `--json` to a FIFO (as `/dev/stdout` often is) writes into it: a rename of a temporary file
/// over the target, as for regular files, would replace the FIFO (or a device) by a file. The
/// test holds the FIFO open for reading and writing, so the command's open does not wait for a
/// reader, and reads what was written only once the FIFO is known to be still there.
#[cfg(unix)]
#[test]
fn json_to_a_fifo_is_written_into_it() {
    use std::io::Read;
    use std::os::unix::fs::FileTypeExt;
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("figures.json");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let mut pipe = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    let run = wafersim(&[
        "flops",
        "--model",
        "tiny",
        "--sparsity",
        "0",
        "--json",
        s(&fifo),
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let kind = fs::symlink_metadata(&fifo).unwrap().file_type();
    assert!(kind.is_fifo(), "the FIFO was replaced by a file");
    let mut head = [0u8; 2];
    pipe.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"{\n");
}

/// `MemAvailable` of `/proc/meminfo` in bytes (`None` where it cannot be read).
fn available_memory() -> Option<u64> {
    let text = fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// An exact run of MediSwift-XL cannot fit a machine of CI's kind (24 GiB): the model's copies
/// alone that every exact step holds, worked out by hand, are 3 x 4 B x 1,315,723,264 parameters
/// (the weights, the fabric's gradients, the CPU reference's) = 15,788,679,168 B, 8 B x
/// 1,207,959,552 kept weights in streaming order (dense: 24 layers x (4 d^2 + 2 d f), d = 2048,
/// f = 8192) = 9,663,676,416 B, and the token table, 50257 x 2048 x 4 B = 411,705,344 B: 25.9 GB
/// (training adds AdamW's moments). So `step`, `sweep` and `train` refuse it before drawing a
/// weight (until this check, `step` grew for a minute until the kernel killed it), with exit
/// code 1, one line naming the fast fidelity, and no output folder. On a machine with more free
/// memory than that the runs would start, so the test says so and checks nothing.
#[test]
fn exact_runs_beyond_the_hosts_memory_are_refused_before_any_weight_is_drawn() {
    let floor: u64 = 15_788_679_168 + 9_663_676_416 + 411_705_344;
    match available_memory() {
        Some(available) if available < floor => {}
        other => {
            eprintln!("skipped: {other:?} bytes available, the exact XL runs would start");
            return;
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let tokens = tmp.path().join("tokens.json");
    let ids: Vec<u32> = (0..512).map(|i| i * 97 % 50257).collect();
    fs::write(&tokens, serde_json::to_string(&ids).unwrap()).unwrap();
    let xl = ["--model", "mediswift-xl", "--fabric", "wse2"];
    let shape = ["--batch", "1", "--seq", "128"];
    let step = [&["step"][..], &xl, &shape, &["--out", s(&out)]].concat();
    let sweep = [&["sweep"][..], &xl, &shape, &["--sparsity", "0.75"]].concat();
    let train_flags = [
        "--tokens",
        s(&tokens),
        "--steps",
        "1",
        "--phase",
        "sparse-pretrain",
        "--sparsity",
        "0.75",
        "--out",
        s(&out),
    ];
    let train = [&["train"][..], &xl, &shape, &train_flags].concat();
    for args in [step, sweep, train] {
        assert_fails(
            &args,
            1,
            &[
                "the exact fidelity",
                "--fidelity fast",
                "GiB of host memory",
            ],
        );
        assert!(!out.exists(), "{args:?} created its output folder");
    }
}
