//! `wafersim sweep --out` writes the SVG plots (issue 5: "the SVGs open in a browser and show
//! labelled axes"): every plot is an SVG document with its title and axis labels as text, the
//! heatmap says which fidelity it reads, and the sweep's figures are the ones plotted.

use std::fs;
use std::path::Path;
use std::process::Command;

fn sweep(out: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "sweep",
        "--batch",
        "1",
        "--seq",
        "8",
        "--fabric",
        "8x8",
        "--sparsity",
        "0,0.5,0.9",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let run = Command::new(env!("CARGO_BIN_EXE_wafersim"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    String::from_utf8(run.stdout).unwrap()
}

/// The text of every `<text>` element, trimmed.
fn texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| {
            t.split_once('>')
                .and_then(|(_, rest)| rest.split_once("</text>"))
        })
        .map(|(inner, _)| inner.trim().to_string())
        .collect()
}

fn plot(dir: &Path, name: &str) -> (String, Vec<String>) {
    let svg = fs::read_to_string(dir.join(name)).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "{name}"
    );
    let t = texts(&svg);
    (svg, t)
}

fn has(texts: &[String], needle: &str) -> bool {
    texts.iter().any(|t| t.contains(needle))
}

#[test]
fn a_fast_sweep_writes_four_labelled_plots() {
    let tmp = tempfile::tempdir().unwrap();
    sweep(tmp.path(), &["--fidelity", "fast", "--no-numerics"]);
    let (_, t) = plot(tmp.path(), "reduction.svg");
    for needle in [
        "sparsity (fraction of weights pruned)",
        "reduction vs the dense step (x)",
        "ideal 1 / (1 - s)",
        "FLOP reduction",
        "cycle reduction",
        "fast fidelity",
    ] {
        assert!(has(&t, needle), "reduction.svg lacks {needle:?}: {t:?}");
    }
    let (_, t) = plot(tmp.path(), "cycles_by_op.svg");
    for needle in [
        "cycles per step",
        "sparsity",
        "s = 0",
        "s = 0.9",
        "fc_proj",
        "attention",
    ] {
        assert!(has(&t, needle), "cycles_by_op.svg lacks {needle:?}");
    }
    let (_, t) = plot(tmp.path(), "gap_by_cause.svg");
    for needle in [
        "FLOP reduction - cycle reduction (x)",
        "per-nonzero overhead",
        "reductions and other communication",
        "load imbalance",
        "fill and drain",
        "dense operations",
        "measured gap",
        "s = 0.5",
    ] {
        assert!(has(&t, needle), "gap_by_cause.svg lacks {needle:?}");
    }
    assert!(!t.iter().any(|x| x == "s = 0"), "no bar for the dense step");
    let (svg, t) = plot(tmp.path(), "utilisation.svg");
    for needle in [
        "PE row",
        "PE column (per-entry tasks of the cost model)",
        "s = 0.9",
    ] {
        assert!(has(&t, needle), "utilisation.svg lacks {needle:?}");
    }
    // One cell per PE of the 8 x 8 region (plus the 20 steps of the colour scale and the
    // background and frame rectangles).
    let filled = svg.matches("<rect").count();
    assert!(filled >= 64 + 20, "{filled} rectangles");
}

#[test]
fn an_exact_sweep_plots_simulated_busy_cycles() {
    let tmp = tempfile::tempdir().unwrap();
    sweep(tmp.path(), &["--no-numerics"]);
    let (_, t) = plot(tmp.path(), "utilisation.svg");
    assert!(has(&t, "PE column (simulated busy cycles)"), "{t:?}");
    assert!(has(&t, "exact fidelity") || has(&t, "weight-streamed"));
    let (_, t) = plot(tmp.path(), "reduction.svg");
    assert!(has(&t, "exact fidelity"));
}

/// The losses of a fast sweep come from the CPU reference only with `--losses`; without it, the
/// steps are costed without weights and `loss` is null, with the same cycles.
#[test]
fn a_fast_sweep_reports_losses_only_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let (plain, with) = (tmp.path().join("plain"), tmp.path().join("with"));
    sweep(&plain, &["--fidelity", "fast"]);
    sweep(&with, &["--fidelity", "fast", "--losses"]);
    let runs = |dir: &Path| -> Vec<serde_json::Value> {
        let text = fs::read_to_string(dir.join("sweep.json")).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        json["runs"].as_array().unwrap().clone()
    };
    let (a, b) = (runs(&plain), runs(&with));
    assert_eq!(a.len(), 3);
    for (x, y) in a.iter().zip(&b) {
        assert!(x["loss"].is_null());
        let loss = y["loss"].as_f64().unwrap();
        // Near ln(256) = 5.545 for the freshly initialised tiny model.
        assert!((loss - 5.545).abs() < 0.2, "{loss}");
        assert_eq!(x["cycles"], y["cycles"]);
    }
}
