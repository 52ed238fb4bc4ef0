//! A sweep's outputs say what ran: `sweep.json` carries the model's shape, the fabric, the
//! storage precision and the seed under the key names of `step`'s `report.json`, and the terminal
//! header names the precision as `step`'s does.

mod common;

use std::fs;
use std::path::Path;

use common::{path_str, wafersim};
use serde_json::{Value, json};

/// The shared flags of the sweeps and the step below: the tiny preset on an 8 x 6 fabric (not
/// square, so a swapped width and height would show), a non-default seed, fast fidelity.
const SETUP: [&str; 12] = [
    "--model",
    "tiny",
    "--fabric",
    "8x6",
    "--batch",
    "1",
    "--seq",
    "8",
    "--seed",
    "7",
    "--fidelity",
    "fast",
];

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn sweep_json_names_the_model_fabric_dtype_and_seed_as_step_does() {
    let tmp = tempfile::tempdir().unwrap();
    let (sweep_dir, step_dir) = (tmp.path().join("sweep"), tmp.path().join("step"));
    let mut args = vec![
        "sweep",
        "--sparsity",
        "0,0.5",
        "--no-numerics",
        "--dtype",
        "fp16",
    ];
    args.extend(SETUP);
    args.extend(["--out", path_str(&sweep_dir)]);
    let run = wafersim(&args);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let sweep = read_json(&sweep_dir.join("sweep.json"));

    // The tiny preset: 2 blocks of width 64, 4 heads, FFN 4 x 64 = 256, a byte vocabulary of
    // 256 and 64 positions (src/model/config.rs); the fabric `8x6` is named as given, 8 PEs
    // wide and 6 high, at the default 1100 MHz clock.
    let model = json!({
        "n_layer": 2, "n_embd": 64, "n_head": 4, "n_inner": 256, "vocab_size": 256, "n_positions": 64,
    });
    let fabric = json!({ "name": "8x6", "width": 8, "height": 6, "clock_mhz": 1100 });
    assert_eq!(sweep["model"], model);
    assert_eq!(sweep["fabric"], fabric);
    assert_eq!(sweep["dtype"], "fp16");
    assert_eq!(sweep["seed"], 7);

    // The same keys, with the same values, as `step`'s report.json of the same setup.
    let mut args = vec![
        "step",
        "--sparsity",
        "0.5",
        "--no-numerics",
        "--dtype",
        "fp16",
    ];
    args.extend(SETUP);
    args.extend(["--out", path_str(&step_dir)]);
    let run = wafersim(&args);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let step = read_json(&step_dir.join("report.json"));
    for key in ["model", "fabric", "dtype", "seed", "batch", "seq"] {
        assert_eq!(sweep[key], step[key], "{key}");
    }
}

#[test]
fn the_sweep_header_names_the_dtype() {
    let header = |dtype: &str| {
        let mut args = vec![
            "sweep",
            "--sparsity",
            "0.5",
            "--no-numerics",
            "--dtype",
            dtype,
        ];
        args.extend(SETUP);
        let run = wafersim(&args);
        assert_eq!(run.code, 0, "{}", run.stderr);
        run.stdout.lines().next().unwrap_or_default().to_string()
    };
    for dtype in ["fp16", "fp32"] {
        let line = header(dtype);
        let want = format!("tokens, {dtype} on 8x6 (8 x 6 PEs at 1100 MHz)");
        assert!(line.contains(&want), "{want:?} not in {line:?}");
    }
}
