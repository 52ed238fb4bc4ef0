//! Same inputs and seed, same bytes: every file the commands write is compared between a run on
//! one thread and a run on two (`RAYON_NUM_THREADS`), byte for byte. The only field allowed to
//! differ is the host wall time under `host` in `report.json`.
//!
//! Each comparison also runs a different seed (or sparsity) and checks the bytes change, so a
//! writer that ignored its inputs could not pass.

use std::fs;
use std::path::Path;
use std::process::Command;

/// Runs the binary with `threads` rayon threads; returns its stdout, asserting success.
fn wafersim(threads: usize, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_wafersim"))
        .args(args)
        .env("RAYON_NUM_THREADS", threads.to_string())
        .output()
        .expect("the wafersim binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "wafersim {args:?}: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

/// `report.json` without its host wall time, which is the one field that may differ.
fn report_without_host(dir: &Path) -> String {
    let text = fs::read_to_string(dir.join("report.json")).unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    let host = value["host"].as_object().expect("a host section");
    let keys: Vec<&String> = host.keys().collect();
    assert_eq!(keys, ["wall_seconds"], "host holds only the wall time");
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains("\"wall_seconds\""))
        .collect();
    assert_eq!(
        kept.len() + 1,
        text.lines().count(),
        "one wall_seconds line"
    );
    kept.join("\n")
}

/// A step whose 16 x 16 region (256 PEs) is large enough for the engine to split it between two
/// threads (it keeps at least 128 PEs per thread), so the parallel engine itself is compared.
/// `extra` may add `--threads`.
fn step(threads: usize, out: &Path, seed: &str, extra: &[&str]) -> String {
    let args = [
        "step",
        "--model",
        "tiny",
        "--fabric",
        "16x16",
        "--batch",
        "1",
        "--seq",
        "16",
        "--sparsity",
        "0.5",
        "--no-dense-baseline",
        "--seed",
        seed,
        "--out",
        s(out),
    ];
    wafersim(threads, &[&args[..], extra].concat())
}

#[test]
fn a_step_writes_the_same_bytes_on_one_and_two_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two, other) = (
        tmp.path().join("one"),
        tmp.path().join("two"),
        tmp.path().join("other"),
    );
    let stdout_one = step(1, &one, "3", &[]);
    let stdout_two = step(2, &two, "3", &[]);
    step(1, &other, "4", &[]);
    assert_eq!(stdout_one, stdout_two);
    // `--threads` overrides RAYON_NUM_THREADS, with the same result.
    let flag = tmp.path().join("flag");
    step(1, &flag, "3", &["--threads", "2"]);
    assert_eq!(report_without_host(&one), report_without_host(&flag));
    for name in [
        "weights.safetensors",
        "grads.safetensors",
        "updated.safetensors",
    ] {
        let a = fs::read(one.join(name)).unwrap();
        assert!(a == fs::read(two.join(name)).unwrap(), "{name} differs");
        assert!(
            a != fs::read(other.join(name)).unwrap(),
            "{name} ignores the seed"
        );
    }
    assert_eq!(report_without_host(&one), report_without_host(&two));
    assert_ne!(report_without_host(&one), report_without_host(&other));
}

fn sweep(threads: usize, out: &Path, sparsities: &str) -> String {
    wafersim(
        threads,
        &[
            "sweep",
            "--fabric",
            "8x8",
            "--batch",
            "1",
            "--seq",
            "8",
            "--sparsity",
            sparsities,
            "--out",
            s(out),
        ],
    )
}

#[test]
fn a_sweep_writes_the_same_bytes_on_one_and_two_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two, other) = (
        tmp.path().join("one"),
        tmp.path().join("two"),
        tmp.path().join("other"),
    );
    let table_one = sweep(1, &one, "0.75,0,0.5");
    let table_two = sweep(2, &two, "0.75,0,0.5");
    sweep(2, &other, "0.75,0,0.6");
    assert_eq!(table_one, table_two);
    for name in ["sweep.csv", "sweep.json"] {
        let a = fs::read(one.join(name)).unwrap();
        assert!(a == fs::read(two.join(name)).unwrap(), "{name} differs");
        assert!(
            a != fs::read(other.join(name)).unwrap(),
            "{name} ignores the sparsities"
        );
    }
    // Points come out in ascending order (the command sorts its list; asked 0.75, 0, 0.5),
    // whatever order the threads finished in.
    let csv = fs::read_to_string(one.join("sweep.csv")).unwrap();
    let order: Vec<&str> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap())
        .collect();
    assert_eq!(order, ["0", "0.5", "0.75"]);
}

#[test]
fn gemm_and_flops_json_are_the_same_bytes_on_one_and_two_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let gemm = |threads, name: &str, seed: &str| {
        let path = tmp.path().join(name);
        wafersim(
            threads,
            &[
                "gemm",
                "--m",
                "12",
                "--k",
                "10",
                "--n",
                "9",
                "--sparsity",
                "0.6",
                "--fabric",
                "3x4",
                "--dtype",
                "fp16",
                "--seed",
                seed,
                "--json",
                s(&path),
            ],
        );
        fs::read(path).unwrap()
    };
    let g1 = gemm(1, "g1.json", "1");
    assert!(g1 == gemm(2, "g2.json", "1"), "gemm JSON differs");
    assert!(g1 != gemm(1, "g3.json", "2"), "gemm JSON ignores the seed");

    let flops = |threads, name: &str| {
        let path = tmp.path().join(name);
        wafersim(
            threads,
            &[
                "flops",
                "--model",
                "gpt2-small",
                "--sparsity",
                "0,0.5,0.9",
                "--json",
                s(&path),
            ],
        );
        fs::read(path).unwrap()
    };
    assert!(
        flops(1, "f1.json") == flops(2, "f2.json"),
        "flops JSON differs"
    );
}
