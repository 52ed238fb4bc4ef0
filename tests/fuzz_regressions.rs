//! Replays every input the fuzzers found (`tests/fuzz_regressions/<target>/`) and their seed
//! corpora (`fuzz/seeds/<target>/`) through the fuzzing entry points themselves
//! (`fuzz/harness.rs`, included here), so CI keeps every crash fixed without nightly or libFuzzer.
//!
//! A replayed input must not panic (overflow checks are on in the test profile), must not
//! allocate far beyond its size, and what it is accepted as must be usable (see the harness).
//! How the fuzzers were run, and what each regression input broke: `docs/robustness.md`.

use std::path::{Path, PathBuf};

include!("../fuzz/harness.rs");

/// The files of `dir`, sorted (an absent folder has none).
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("readable folder").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `harness` on every regression input and seed of `target`; returns how many ran.
fn replay(target: &str, harness: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = inputs(&root.join("tests/fuzz_regressions").join(target));
    files.extend(inputs(&root.join("fuzz/seeds").join(target)));
    for file in &files {
        let data = std::fs::read(file).expect("readable input");
        // Printed only if the harness panics: names the input that broke.
        println!("replaying {}", file.display());
        harness(&data);
    }
    files.len()
}

#[test]
fn config_json_inputs_replay_cleanly() {
    assert!(replay("config_json", harness_config_json) > 0);
}

#[test]
fn fabric_config_inputs_replay_cleanly() {
    assert!(replay("fabric_config", harness_fabric_config) > 0);
}

#[test]
fn checkpoint_inputs_replay_cleanly() {
    assert!(replay("checkpoint", harness_checkpoint) > 0);
}

#[test]
fn token_inputs_replay_cleanly() {
    assert!(replay("tokens", harness_tokens) > 0);
}
