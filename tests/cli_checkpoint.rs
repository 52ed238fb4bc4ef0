//! `wafersim init` and `wafersim inspect` driven as a user would: the built binary, real folders.
//!
//! Every bad input must end with exit code 2 (1 for a failure while writing), exactly one stderr
//! line starting with `error:` that names the problem, no panic, and no partial output.

use std::fs;
use std::path::Path;

use wafersim::model::checkpoint::{
    CONFIG_FILE, F32Tensor, WEIGHTS_FILE, hf_named_tensors, load_checkpoint, save_checkpoint,
    write_safetensors_atomic,
};

mod common;
use common::{assert_fails, path_str, wafersim};

/// The names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("folder exists")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A fresh `tiny` checkpoint in `dir/name` written by `wafersim init`.
fn init_tiny(dir: &Path, name: &str, seed: &str) -> std::path::PathBuf {
    let out = dir.join(name);
    let run = wafersim(&[
        "init",
        "--model",
        "tiny",
        "--seed",
        seed,
        "--out",
        path_str(&out),
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    out
}

/// Rewrites the weights of `ckpt` with `edit` applied to the HF tensor list.
fn rewrite_weights(ckpt: &Path, edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>)) {
    let (_, params) = load_checkpoint(ckpt).expect("valid checkpoint");
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = hf_named_tensors(&params)
        .into_iter()
        .map(|(n, s, d)| (n, s, d.into_owned()))
        .collect();
    edit(&mut tensors);
    let borrowed: Vec<F32Tensor<'_>> = tensors
        .iter()
        .map(|(n, s, d)| (n.clone(), s.clone(), &d[..]))
        .collect();
    write_safetensors_atomic(&ckpt.join(WEIGHTS_FILE), &borrowed).expect("write");
}

#[test]
fn init_then_inspect_round_trips_and_shows_sparsity() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = init_tiny(tmp.path(), "ckpt", "1");
    assert_eq!(listing(&ckpt), [CONFIG_FILE, WEIGHTS_FILE]);

    // Same seed, same bytes; another seed, other bytes.
    let again = init_tiny(tmp.path(), "again", "1");
    let other = init_tiny(tmp.path(), "other", "2");
    let weights = |d: &Path| fs::read(d.join(WEIGHTS_FILE)).unwrap();
    assert_eq!(weights(&ckpt), weights(&again));
    assert_ne!(weights(&ckpt), weights(&other));

    // Zero exactly half of layer 0's Q (2048 of 64 x 64) and all of layer 1's c_fc.
    let (config, mut params) = load_checkpoint(&ckpt).unwrap();
    params.blocks[0].q.weight.data[..2048].fill(0.0);
    params.blocks[1].fc.weight.data.fill(0.0);
    save_checkpoint(&ckpt, &config, &params).unwrap();

    let run = wafersim(&["inspect", "--checkpoint", path_str(&ckpt)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let out = &run.stdout;
    assert!(
        out.contains("2 layers, d 64, 4 heads, d_ffn 256, seq 64, vocab 256"),
        "{out}"
    );
    // tiny: 256*64 + 64*64 + 2*(12*64^2 + 13*64) + 2*64 = 120,576; sparsifiable 2*12*64^2.
    assert!(out.contains("120576 total"), "{out}");
    assert!(out.contains("98304 in sparsifiable"), "{out}");
    let row = |label: &str| {
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(label))
            .unwrap_or_else(|| panic!("no row {label} in {out}"))
            .split_whitespace()
            .skip(1)
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    // Columns q, k, v, attn_proj, fc, fc_proj.
    assert_eq!(
        row("0"),
        ["0.5000", "0.0000", "0.0000", "0.0000", "0.0000", "0.0000"]
    );
    assert_eq!(
        row("1"),
        ["0.0000", "0.0000", "0.0000", "0.0000", "1.0000", "0.0000"]
    );
    // Over both layers: q 2048 / 8192, fc 16384 / 32768.
    assert_eq!(
        row("all"),
        ["0.2500", "0.0000", "0.0000", "0.0000", "0.5000", "0.0000"]
    );
    // 2048 + 16384 = 18432 zeros of 98304 = 0.1875.
    assert!(
        out.contains("18432 of 98304 sparsifiable weights are zero (0.1875)"),
        "{out}"
    );
}

#[test]
fn a_truncated_weights_file_is_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = init_tiny(tmp.path(), "ckpt", "1");
    let path = ckpt.join(WEIGHTS_FILE);
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let run = wafersim(&["inspect", "--checkpoint", path_str(&ckpt)]);
    assert_fails(
        &run,
        2,
        &["model.safetensors", "not a valid safetensors file"],
    );
}

#[test]
fn a_missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = init_tiny(tmp.path(), "ckpt", "1");
    rewrite_weights(&ckpt, |t| {
        t.retain(|(n, _, _)| n != "transformer.h.1.ln_2.bias")
    });
    let run = wafersim(&["inspect", "--checkpoint", path_str(&ckpt)]);
    assert_fails(
        &run,
        2,
        &[
            "model.safetensors",
            "missing tensor `transformer.h.1.ln_2.bias`",
        ],
    );
}

#[test]
fn a_wrong_shape_names_tensor_expected_and_got() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = init_tiny(tmp.path(), "ckpt", "1");
    rewrite_weights(&ckpt, |t| {
        let wpe = t
            .iter_mut()
            .find(|(n, _, _)| n == "transformer.wpe.weight")
            .unwrap();
        wpe.1 = vec![32, 64];
        wpe.2.truncate(32 * 64);
    });
    let run = wafersim(&["inspect", "--checkpoint", path_str(&ckpt)]);
    assert_fails(
        &run,
        2,
        &[
            "transformer.wpe.weight",
            "shape [32, 64], expected [64, 64]",
        ],
    );
}

#[test]
fn a_nan_weight_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = init_tiny(tmp.path(), "ckpt", "1");
    rewrite_weights(&ckpt, |t| {
        let c_attn = t
            .iter_mut()
            .find(|(n, _, _)| n == "transformer.h.0.attn.c_attn.weight")
            .unwrap();
        c_attn.2[100] = f32::NAN;
    });
    let run = wafersim(&["inspect", "--checkpoint", path_str(&ckpt)]);
    assert_fails(
        &run,
        2,
        &[
            "transformer.h.0.attn.c_attn.weight",
            "non-finite value (NaN) at flat index 100",
        ],
    );
}

#[test]
fn a_bad_config_json_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = init_tiny(tmp.path(), "ckpt", "1");
    let path = ckpt.join(CONFIG_FILE);
    let good = fs::read_to_string(&path).unwrap();

    fs::write(&path, &good[..good.len() / 2]).unwrap();
    let run = wafersim(&["inspect", "--checkpoint", path_str(&ckpt)]);
    assert_fails(&run, 2, &["config.json", "not a valid GPT-2 config"]);

    let untied = good.replace(
        "\"tie_word_embeddings\": true",
        "\"tie_word_embeddings\": false",
    );
    assert_ne!(untied, good);
    fs::write(&path, untied).unwrap();
    let run = wafersim(&["inspect", "--checkpoint", path_str(&ckpt)]);
    assert_fails(&run, 2, &["config.json", "tie_word_embeddings"]);

    // The same file given to `init --config` is refused the same way, and nothing is written.
    let out = tmp.path().join("from-config");
    let run = wafersim(&["init", "--config", path_str(&path), "--out", path_str(&out)]);
    assert_fails(&run, 2, &["--config", "config.json", "tie_word_embeddings"]);
    assert!(!out.exists());
}

#[test]
fn init_from_a_config_json_takes_its_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-tiny");
    let out = tmp.path().join("ckpt");
    let config = fixture.join(CONFIG_FILE);
    let run = wafersim(&[
        "init",
        "--config",
        path_str(&config),
        "--out",
        path_str(&out),
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let (c, p) = load_checkpoint(&out).unwrap();
    assert_eq!(
        (c.n_layer, c.n_embd, c.vocab_size, p.numel()),
        (2, 16, 64, 8128)
    );
}

#[test]
fn a_missing_checkpoint_folder_is_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let run = wafersim(&["inspect", "--checkpoint", path_str(&missing)]);
    assert_fails(&run, 2, &["nope/config.json", "No such file"]);
}

#[test]
fn an_output_folder_that_cannot_exist_is_bad_input_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let nested = tmp.path().join("missing").join("ckpt");
    let run = wafersim(&["init", "--model", "tiny", "--out", path_str(&nested)]);
    assert_fails(&run, 2, &["--out", "missing", "does not exist"]);

    let file = tmp.path().join("a-file");
    fs::write(&file, "x").unwrap();
    let run = wafersim(&["init", "--model", "tiny", "--out", path_str(&file)]);
    assert_fails(&run, 2, &["--out", "a-file", "not a folder"]);
    assert_eq!(listing(tmp.path()), ["a-file"]);
}

#[test]
fn a_write_failure_exits_1_and_leaves_no_partial_file() {
    // model.safetensors is a folder: the weights cannot be placed (even for root).
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ckpt");
    fs::create_dir_all(out.join(WEIGHTS_FILE)).unwrap();
    let run = wafersim(&["init", "--model", "tiny", "--out", path_str(&out)]);
    assert_fails(&run, 1, &["cannot write checkpoint", "model.safetensors"]);
    assert_eq!(listing(&out), [WEIGHTS_FILE]);
    assert!(listing(&out.join(WEIGHTS_FILE)).is_empty());
}

#[test]
fn an_unwritable_folder_exits_1_and_keeps_the_old_checkpoint() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = init_tiny(tmp.path(), "ckpt", "1");
    let before = fs::read(ckpt.join(WEIGHTS_FILE)).unwrap();
    fs::set_permissions(&ckpt, fs::Permissions::from_mode(0o555)).unwrap();
    // root ignores permissions: then there is nothing to test here.
    let probe = fs::write(ckpt.join("probe"), "x");
    if probe.is_ok() {
        fs::remove_file(ckpt.join("probe")).unwrap();
    } else {
        let run = wafersim(&[
            "init",
            "--model",
            "tiny",
            "--seed",
            "2",
            "--out",
            path_str(&ckpt),
        ]);
        assert_fails(&run, 1, &["cannot write checkpoint", "temporary file"]);
        assert_eq!(fs::read(ckpt.join(WEIGHTS_FILE)).unwrap(), before);
        assert_eq!(listing(&ckpt), [CONFIG_FILE, WEIGHTS_FILE]);
    }
    fs::set_permissions(&ckpt, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A prompt step whose results are not finite (one MLP weight of 1e30 overflows the forward
/// pass) fails like any other step: exit 1 and nothing written, rather than NaN files.
#[test]
fn a_prompt_step_with_non_finite_results_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = init_tiny(tmp.path(), "ckpt", "1");
    rewrite_weights(&ckpt, |t| {
        let c_fc = t
            .iter_mut()
            .find(|(n, _, _)| n == "transformer.h.0.mlp.c_fc.weight")
            .unwrap();
        c_fc.2[0] = 1e30;
    });
    let prompt = tmp.path().join("prompt.safetensors");
    let values = vec![0.01f32; 4 * 64];
    write_safetensors_atomic(&prompt, &[("prompt".into(), vec![4, 64], &values[..])]).unwrap();
    let out = tmp.path().join("out");
    let run = wafersim(&[
        "step",
        "--checkpoint",
        path_str(&ckpt),
        "--prompt",
        path_str(&prompt),
        "--fabric",
        "8x8",
        "--batch",
        "1",
        "--seq",
        "8",
        "--no-dense-baseline",
        "--out",
        path_str(&out),
    ]);
    assert_fails(&run, 1, &["non-finite", "nothing was written"]);
    assert!(!out.exists());
}

/// A sweep whose gradients overflow (one MLP matrix scaled by 1e21: the loss stays finite, the
/// gradients do not) fails and writes nothing, rather than `null` distances in `sweep.json`.
#[test]
fn a_sweep_with_non_finite_gradients_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = init_tiny(tmp.path(), "ckpt", "1");
    rewrite_weights(&ckpt, |t| {
        let c_fc = t
            .iter_mut()
            .find(|(n, _, _)| n == "transformer.h.1.mlp.c_fc.weight")
            .unwrap();
        c_fc.2.iter_mut().for_each(|w| *w *= 1e21);
    });
    let out = tmp.path().join("out");
    let run = wafersim(&[
        "sweep",
        "--checkpoint",
        path_str(&ckpt),
        "--sparsity",
        "0.5",
        "--batch",
        "1",
        "--seq",
        "8",
        "--fabric",
        "8x8",
        "--out",
        path_str(&out),
    ]);
    assert_fails(&run, 1, &["not finite", "nothing was written"]);
    assert!(!out.exists());
}
