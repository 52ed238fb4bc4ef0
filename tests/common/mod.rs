//! What the end-to-end tests that drive the built binary share: running it, and the shape of a
//! refusal (one `error: ` line on stderr, the expected exit code, never a panic).
//!
//! Each test file that needs it says `mod common;`; not every file uses every helper.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// What a run of the binary left behind.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the `wafersim` binary with `args` (with backtraces on, so that a panic could not hide
/// behind a short message).
pub fn wafersim(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_wafersim"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("the wafersim binary runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `p` as a command-line argument.
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

/// Exit code `code`, one stderr line `error: ...` containing every `needle`, no panic.
#[track_caller]
pub fn assert_fails(run: &Run, code: i32, needles: &[&str]) {
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    assert!(!run.stderr.contains("backtrace"), "{}", run.stderr);
    assert_eq!(run.code, code, "stderr: {}", run.stderr);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line: {:?}", run.stderr);
    assert!(lines[0].starts_with("error: "), "{}", lines[0]);
    for needle in needles {
        assert!(lines[0].contains(needle), "{needle:?} not in {}", lines[0]);
    }
}

/// Runs `args`, expecting success (exit code 0); returns its stderr.
#[track_caller]
pub fn run_ok(args: &[String]) -> String {
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = wafersim(&argv);
    assert_eq!(run.code, 0, "{args:?}: {}", run.stderr);
    run.stderr
}
