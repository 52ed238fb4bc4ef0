//! `wafersim step --trace PATH --trace-region X,Y,W,H --trace-cycles A..B` (issue 5, item 6): a
//! trace of a tiny step holds events inside the window only, on the traced PEs only, with the
//! events of every track nesting (overlapping fabric ops on lanes of their own), and the options
//! are refused with one line when they are wrong or the fidelity is fast.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

#[path = "../sim/tests/common/trace_nesting.rs"]
mod trace_nesting;
use trace_nesting::{cycles, partial_overlaps};

struct Run {
    code: i32,
    stderr: String,
}

fn step(out: &Path, extra: &[&str]) -> Run {
    let mut args = vec![
        "step",
        "--model",
        "tiny",
        "--fabric",
        "4x4",
        "--batch",
        "1",
        "--seq",
        "8",
        "--sparsity",
        "0.5",
        "--no-dense-baseline",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = Command::new(env!("CARGO_BIN_EXE_wafersim"))
        .args(&args)
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Exit code 2 and one stderr line naming every needle.
fn assert_refused(run: &Run, needles: &[&str]) {
    assert_eq!(run.code, 2, "{}", run.stderr);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{:?}", run.stderr);
    for n in needles {
        assert!(lines[0].contains(n), "{n:?} not in {}", lines[0]);
    }
}

#[test]
fn a_trace_of_a_tiny_step_has_events_in_its_window_only() {
    let tmp = tempfile::tempdir().unwrap();
    let trace = tmp.path().join("trace.json");
    // Cycles 2000..6000 of the step: past the embedding, inside the first layer's kernels.
    let run = step(
        &tmp.path().join("out"),
        &[
            "--trace",
            trace.to_str().unwrap(),
            "--trace-region",
            "1,1,2,3",
            "--trace-cycles",
            "2000..6000",
        ],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let events = v["traceEvents"].as_array().unwrap();
    let spans: Vec<&Value> = events.iter().filter(|e| e["ph"] == "X").collect();
    assert!(spans.len() > 10, "{} events", spans.len());
    let tasks = spans.iter().filter(|e| e["tid"] == 0).count();
    assert!(tasks > 0, "no core task in the window");
    for e in &spans {
        // 1 cycle = 1 ns: ts and dur in microseconds.
        let start = cycles(&e["ts"]);
        let dur = cycles(&e["dur"]);
        assert!(
            start < 6000 && start + dur.max(1) > 2000,
            "{e} outside 2000..6000"
        );
        // pid = y * 100000 + x: columns 1-2, rows 1-3.
        let pid = e["pid"].as_u64().unwrap();
        let (x, y) = (pid % 100_000, pid / 100_000);
        assert!(
            (1..=2).contains(&x) && (1..=3).contains(&y),
            "PE ({x}, {y})"
        );
    }
    // Every traced PE has its name.
    let names = events
        .iter()
        .filter(|e| e["name"] == "process_name")
        .count();
    assert!((1..=6).contains(&names), "{names} PEs named");
    // On every track the events nest, so Perfetto shows them all, though the window's fabric
    // ops overlap (a PE needs a second lane for them).
    let overlaps = partial_overlaps(events);
    assert!(overlaps.is_empty(), "{overlaps:#?}");
    assert!(
        events.iter().any(|e| e["args"]["name"] == "fabric ops 2"),
        "no PE had two fabric ops in flight at once"
    );
}

#[test]
fn wrong_trace_options_are_refused_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let trace = tmp.path().join("t.json");
    let t = trace.to_str().unwrap();
    let cases: [(&[&str], &[&str]); 6] = [
        (
            &[
                "--trace",
                t,
                "--trace-region",
                "0,0,1,1",
                "--trace-cycles",
                "0..10",
                "--fidelity",
                "fast",
            ],
            &["--trace", "--fidelity exact"],
        ),
        (
            &[
                "--trace",
                t,
                "--trace-region",
                "0,0,1",
                "--trace-cycles",
                "0..10",
            ],
            &["--trace-region 0,0,1", "X,Y,W,H"],
        ),
        (
            &[
                "--trace",
                t,
                "--trace-region",
                "3,0,2,1",
                "--trace-cycles",
                "0..10",
            ],
            &["--trace-region", "past the 4 x 4 fabric"],
        ),
        (
            &[
                "--trace",
                t,
                "--trace-region",
                "0,0,1,1",
                "--trace-cycles",
                "10..10",
            ],
            &["--trace-cycles 10..10", "after the start"],
        ),
        (
            &[
                "--trace",
                t,
                "--trace-region",
                "0,0,1,1",
                "--trace-cycles",
                "ten..20",
            ],
            &["--trace-cycles", "not a whole number"],
        ),
        (
            &["--trace", t, "--trace-cycles", "0..10"],
            &["--trace-region"],
        ),
    ];
    for (extra, needles) in cases {
        let run = step(&out, extra);
        assert_refused(&run, needles);
    }
    assert!(!trace.exists() && !out.exists(), "nothing ran");
}

/// A trace named like a file `--out` writes, in that folder, is refused before the step runs;
/// a window after the step's end writes an empty trace and says so.
#[test]
fn a_trace_neither_replaces_an_output_nor_comes_back_empty_silently() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let clash = out.join("report.json");
    let window = ["--trace-region", "0,0,1,1", "--trace-cycles"];
    let run = step(
        &out,
        &[
            &["--trace", clash.to_str().unwrap()][..],
            &window,
            &["0..10"],
        ]
        .concat(),
    );
    assert_refused(
        &run,
        &["--trace", "report.json", "--out writes a file of that name"],
    );
    assert!(!out.exists());

    let late = tmp.path().join("late.json");
    let far = "100000000..100000010";
    let run = step(
        &out,
        &[&["--trace", late.to_str().unwrap()][..], &window, &[far]].concat(),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains("holds no event") && run.stderr.contains(far),
        "{}",
        run.stderr
    );
    assert!(late.exists());
}

/// A window whose PE-cycles overflow 64 bits (4 x 4 PEs x 2^60 cycles = 2^64, which wraps to 0)
/// is refused like any window over the cap, before the step runs (robustness audit 7, item 1).
#[test]
fn a_window_too_large_for_64_bits_is_refused_before_the_step_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let trace = tmp.path().join("t.json");
    let run = step(
        &out,
        &[
            "--trace",
            trace.to_str().unwrap(),
            "--trace-region",
            "0,0,4,4",
            "--trace-cycles",
            "0..1152921504606846976",
        ],
    );
    assert_refused(
        &run,
        &[
            "--trace-region/--trace-cycles",
            "18446744073709551616 PE-cycles, more than 200000000",
        ],
    );
    assert!(!trace.exists() && !out.exists(), "nothing ran");
}

/// A trace that cannot be written fails the step with nothing of it written: the trace is staged
/// with the other outputs (robustness audit 7, item 4). `/dev/full` takes no byte, and stays the
/// device it was (a rename over it would have replaced it).
#[test]
fn a_trace_that_cannot_be_written_leaves_every_output_as_it_was() {
    let full = Path::new("/dev/full");
    if !full.exists() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let window = ["--trace-region", "0,0,1,1", "--trace-cycles", "0..100"];
    let run = step(&out, &[&["--trace", "/dev/full"][..], &window].concat());
    assert_eq!(run.code, 1, "{}", run.stderr);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{:?}", run.stderr);
    assert!(
        lines[0].starts_with("error: writing the trace /dev/full") && lines[0].contains("space"),
        "{}",
        lines[0]
    );
    assert!(!out.exists(), "report.json and the weights were written");
    let kind = std::fs::metadata(full).unwrap().file_type();
    assert!(!kind.is_file(), "/dev/full was replaced by a file");

    // An existing trace and the outputs of an earlier step stay as they were.
    let trace = tmp.path().join("t.json");
    let first = step(
        &out,
        &[&["--trace", trace.to_str().unwrap()][..], &window].concat(),
    );
    assert_eq!(first.code, 0, "{}", first.stderr);
    let (report, old_trace) = (
        std::fs::read(out.join("report.json")).unwrap(),
        std::fs::read(&trace).unwrap(),
    );
    let again = step(&out, &[&["--trace", "/dev/full"][..], &window].concat());
    assert_eq!(again.code, 1, "{}", again.stderr);
    assert_eq!(std::fs::read(out.join("report.json")).unwrap(), report);
    assert_eq!(std::fs::read(&trace).unwrap(), old_trace);
}

/// `--out new --trace new/t.json`: the step creates `new`, so the trace may go into it
/// (robustness audit 7, item 4).
#[test]
fn a_trace_may_go_into_the_out_folder_the_step_creates() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("new");
    let trace = out.join("t.json");
    let window = ["--trace-region", "0,0,1,1", "--trace-cycles", "0..100"];
    let run = step(
        &out,
        &[&["--trace", trace.to_str().unwrap()][..], &window].concat(),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    assert!(v["traceEvents"].as_array().is_some_and(|e| !e.is_empty()));
    assert!(out.join("report.json").exists());
    // A folder nobody creates is still refused.
    let elsewhere = tmp.path().join("missing").join("t.json");
    let run = step(
        &tmp.path().join("out2"),
        &[&["--trace", elsewhere.to_str().unwrap()][..], &window].concat(),
    );
    assert_refused(&run, &["--trace", "missing", "does not exist"]);
}
