//! `wafersim flops` end to end: the built binary's table, JSON and errors.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn wafersim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wafersim"))
        .args(args)
        .output()
        .expect("the wafersim binary runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A fresh path in the test scratch folder.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cli_flops");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    path
}

fn read_json(path: &PathBuf) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `numel - round(s numel)`: the nonzeros a matrix keeps.
fn nnz(numel: u64, s: f64) -> u64 {
    numel - (s * numel as f64).round() as u64
}

/// The tiny preset (L 2, d 64, 4 heads, d_ffn 256, V 256) with batch 2, seq 32, by formula:
/// `(matmul dense, matmul sparse)` of a step at sparsity `s`.
fn tiny_matmul_flops(s: f64) -> (u64, u64) {
    let (l, d, f, h, v, b, seq) = (2u64, 64u64, 256u64, 4u64, 256u64, 2u64, 32u64);
    let t = b * seq;
    let attention = 2 * 2 * b * h * seq * seq * (d / h); // Q K^T and A V, forward
    let lm_head = 2 * t * d * v;
    let fixed = 3 * (l * attention + lm_head);
    let dense = 3 * l * 2 * t * (4 * d * d + 2 * d * f) + fixed;
    let sparse = 3 * l * 2 * t * (4 * nnz(d * d, s) + 2 * nnz(d * f, s)) + fixed;
    (dense, sparse)
}

#[test]
fn the_table_shows_one_row_per_sparsity_and_the_breakdown() {
    let out = wafersim(&[
        "flops",
        "--model",
        "tiny",
        "--sparsity",
        "0,0.5",
        "--batch",
        "2",
        "--seq",
        "32",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    // Dense 47,185,920 (= PyTorch's count) = 4.7186e7; at 0.5 sparse 28,311,552 = 2.8312e7, 1.667x.
    let (dense, sparse) = tiny_matmul_flops(0.5);
    let (dense, sparse) = (
        format!("{:.4e}", dense as f64),
        format!("{:.4e}", sparse as f64),
    );
    assert_eq!((dense.as_str(), sparse.as_str()), ("4.7186e7", "2.8312e7"));
    let rows: Vec<&str> = text.lines().filter(|l| l.contains(&dense)).collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert!(
        rows[0].trim_start().starts_with("0 ") && rows[0].contains("1.000x"),
        "{text}"
    );
    assert!(rows[1].trim_start().starts_with("0.5 "), "{text}");
    assert!(
        rows[1].contains(&sparse) && rows[1].contains("1.667x"),
        "{text}"
    );
    for op in [
        "fc_proj",
        "attn_scores",
        "lm_head",
        "softmax",
        "cross_entropy",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(op)),
            "{op} missing:\n{text}"
        );
    }
}

#[test]
fn json_figures_match_the_formulas() {
    let path = scratch("tiny.json");
    let out = wafersim(&[
        "flops",
        "--model",
        "tiny",
        "--sparsity",
        "0,0.5,0.75,0.9",
        "--batch",
        "2",
        "--seq",
        "32",
        "--json",
        path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let doc = read_json(&path);
    assert_eq!(doc["schema"], "wafersim.flops/v1");
    assert!(
        doc["units"]["*_flops*"]
            .as_str()
            .unwrap()
            .contains("multiply-add = 2")
    );
    assert_eq!(
        (
            doc["batch"].as_u64(),
            doc["seq"].as_u64(),
            doc["tokens"].as_u64()
        ),
        (Some(2), Some(32), Some(64))
    );
    assert_eq!(doc["model"]["n_layer"], 2);
    assert_eq!(doc["model"]["vocab_size"], 256);
    let runs = doc["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4);
    for (run, s) in runs.iter().zip([0.0, 0.5, 0.75, 0.9]) {
        let (dense, sparse) = tiny_matmul_flops(s);
        assert_eq!(run["sparsity"].as_f64(), Some(s));
        assert_eq!(run["matmul_flops_dense"].as_u64(), Some(dense));
        assert_eq!(run["matmul_flops_sparse"].as_u64(), Some(sparse));
        assert_eq!(
            run["flop_reduction"].as_f64(),
            Some(dense as f64 / sparse as f64)
        );
        check_ops(run, s);
    }
}

/// The per-op entries add up to the run totals, and `q` is `2 T nnz` per phase.
fn check_ops(run: &Value, s: f64) {
    let ops = run["ops"].as_array().unwrap();
    let sum = |matmul: bool, key: &str| -> u64 {
        ops.iter()
            .filter(|o| o["is_matmul"].as_bool() == Some(matmul))
            .map(|o| o[key].as_u64().unwrap())
            .sum()
    };
    assert_eq!(
        Some(sum(true, "total_flops_dense")),
        run["matmul_flops_dense"].as_u64()
    );
    assert_eq!(
        Some(sum(true, "total_flops_sparse")),
        run["matmul_flops_sparse"].as_u64()
    );
    assert_eq!(
        Some(sum(false, "total_flops_dense")),
        run["non_matmul_flops"].as_u64()
    );
    let q = ops.iter().find(|o| o["op"] == "q").unwrap();
    // Two layers, T = 64: 2 x (2 x 64 x nnz).
    let want = 2 * 2 * 64 * nnz(64 * 64, s);
    for phase in ["forward", "input_grad", "weight_grad"] {
        assert_eq!(q[format!("{phase}_flops_sparse")].as_u64(), Some(want));
    }
}

#[test]
fn a_config_json_gives_the_same_figures_as_the_preset() {
    let config = scratch("config.json");
    let tiny = wafersim::model::GptConfig::preset("tiny").unwrap();
    std::fs::write(&config, tiny.to_hf_json()).unwrap();
    let (from_preset, from_config) = (scratch("preset.json"), scratch("from_config.json"));
    for (source, json) in [
        (["--model", "tiny"], &from_preset),
        (["--config", config.to_str().unwrap()], &from_config),
    ] {
        let out = wafersim(&[
            "flops",
            source[0],
            source[1],
            "--json",
            json.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let (a, b) = (read_json(&from_preset), read_json(&from_config));
    assert_eq!(a["runs"], b["runs"]);
    // Defaults: batch 1, seq = n_positions 64, the four sparsities.
    assert_eq!(
        (a["batch"].as_u64(), a["seq"].as_u64()),
        (Some(1), Some(64))
    );
    assert_eq!(a["runs"].as_array().unwrap().len(), 4);
}

#[test]
fn causal_halving_removes_half_the_attention_flops() {
    let (full, half) = (scratch("full.json"), scratch("half.json"));
    for (extra, json) in [(None, &full), (Some("--causal-halving"), &half)] {
        let mut args = vec![
            "flops",
            "--model",
            "tiny",
            "--sparsity",
            "0",
            "--batch",
            "2",
            "--seq",
            "32",
        ];
        args.extend(extra);
        args.extend(["--json", json.to_str().unwrap()]);
        assert!(wafersim(&args).status.success());
    }
    // Attention over the step: 3 x L x 2 x 2 B h S S head_dim = 3 x 2 x 2 x 2 x 2 x 4 x 32 x 32 x 16.
    let attention = 3 * 2 * 2 * 2 * 2 * 4 * 32 * 32 * 16u64;
    let dense = |doc: &Value| doc["runs"][0]["matmul_flops_dense"].as_u64().unwrap();
    assert_eq!(
        dense(&read_json(&full)) - dense(&read_json(&half)),
        attention / 2
    );
    assert_eq!(read_json(&half)["causal_halving"], true);
}

#[test]
fn bad_input_is_one_error_line_and_exit_code_2() {
    let cases: [(&[&str], &str); 8] = [
        (&["--model", "tiny", "--sparsity", "NaN"], "--sparsity"),
        (&["--model", "tiny", "--sparsity", "-0.1"], "--sparsity"),
        (&["--model", "tiny", "--sparsity", "1.0"], "--sparsity"),
        (&["--model", "tiny", "--sparsity", "0.5,x"], "--sparsity"),
        (&["--model", "tiny", "--seq", "65"], "--seq"),
        (&["--model", "tiny", "--batch", "0"], "--batch"),
        (&["--model", "gpt5"], "--model"),
        (&["--config", "/nonexistent/config.json"], "--config"),
    ];
    for (args, flag) in cases {
        let out = wafersim(&[&["flops"], args].concat());
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("error: ") && err.contains(flag),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert!(stdout(&out).is_empty(), "{args:?} printed a table");
    }
}

#[test]
fn a_json_path_in_a_missing_folder_is_bad_input_found_before_counting() {
    let out = wafersim(&[
        "flops",
        "--model",
        "tiny",
        "--json",
        "/nonexistent/dir/out.json",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.starts_with("error: --json /nonexistent/dir") && err.contains("does not exist"),
        "{err}"
    );
    assert!(
        stdout(&out).is_empty(),
        "the table was printed before the refusal"
    );
}
