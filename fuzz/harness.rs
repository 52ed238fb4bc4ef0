// The fuzzing entry points, shared by the fuzz targets (`fuzz_targets/*.rs`) and by the replay of
// the regression inputs in the main workspace (`tests/fuzz_regressions.rs`), which both
// `include!` this file, so a crash found by a fuzzer is replayed by `cargo test` through exactly
// the code that found it.
//
// Each entry point feeds arbitrary bytes to one parser of untrusted input. The contract: any input
// gives a value or an error, never a panic (overflow checks are on in both builds), never an
// allocation far beyond the input (libFuzzer's -rss_limit_mb), never a hang (-timeout); and an
// accepted value is one the rest of the program can use.

/// `GptConfig::from_hf_json`: an accepted config is valid, survives a `to_hf_json` round trip,
/// and its parameter and FLOP counts are computed without overflow or huge allocation.
#[allow(dead_code)]
fn harness_config_json(data: &[u8]) {
    use wafersim::flops::{FlopOptions, NnzSource, StepShape, step_flops};
    use wafersim::model::GptConfig;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = GptConfig::from_hf_json(text) else {
        return;
    };
    assert!(config.validate().is_ok());
    let again = GptConfig::from_hf_json(&config.to_hf_json()).expect("round trip");
    assert_eq!(again, config);
    let _ = config.total_params();
    let shape = StepShape {
        batch: 1,
        seq: config.n_positions,
    };
    let _ = step_flops(
        &config,
        shape,
        &NnzSource::dense(&config),
        FlopOptions::default(),
    );
}

/// `FabricConfig::from_file_text` (TOML or JSON) and `FabricConfig::from_spec`, chosen by the
/// first byte: an accepted config is valid and survives a JSON round trip.
#[allow(dead_code)]
fn harness_fabric_config(data: &[u8]) {
    use wafersim_sim::FabricConfig;
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let parsed = match selector % 3 {
        0 => FabricConfig::from_file_text("fuzz.toml", text, false),
        1 => FabricConfig::from_file_text("fuzz.json", text, true),
        _ => FabricConfig::from_spec(text),
    };
    if let Ok(config) = parsed {
        assert!(config.validate().is_ok());
        let json = serde_json::to_string(&config).expect("a config serialises");
        let again = FabricConfig::from_file_text("again.json", &json, true).expect("round trip");
        assert_eq!(again, config);
    }
}

/// The config the checkpoint entry point reads against: 1 layer, d 4, 2 heads, 4 positions,
/// vocabulary 5, FFN 8, small enough that a fuzzer builds whole valid files.
#[allow(dead_code)]
fn harness_checkpoint_config() -> wafersim::model::GptConfig {
    wafersim::model::GptConfig {
        n_layer: 1,
        n_embd: 4,
        n_head: 2,
        n_positions: 4,
        vocab_size: 5,
        n_inner: 8,
        layer_norm_epsilon: 1e-5,
        scale_attn_weights: true,
    }
}

/// `params_from_safetensors` (the checkpoint reader): accepted parameters have the config's
/// shapes and are finite.
#[allow(dead_code)]
fn harness_checkpoint(data: &[u8]) {
    use wafersim::model::checkpoint::params_from_safetensors;
    let config = harness_checkpoint_config();
    let path = std::path::Path::new("fuzz.safetensors");
    if let Ok(params) = params_from_safetensors(path, data, &config) {
        assert_eq!(params.blocks.len(), config.n_layer);
        assert_eq!(params.wte.data.len(), config.vocab_size * config.n_embd);
        for (_, tensor) in params.tensors() {
            assert!(tensor.iter().all(|v| v.is_finite()));
        }
    }
}

/// `Batch::from_json` (the token-file parser) against the `tiny` preset: an accepted batch is
/// valid.
#[allow(dead_code)]
fn harness_tokens(data: &[u8]) {
    use wafersim::model::GptConfig;
    use wafersim::reference::Batch;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = GptConfig::preset("tiny").expect("tiny exists");
    if let Ok(batch) = Batch::from_json(&config, text) {
        assert!(batch.validate(&config).is_ok());
        assert_eq!(batch.tokens.len(), batch.batch * batch.seq);
    }
}
