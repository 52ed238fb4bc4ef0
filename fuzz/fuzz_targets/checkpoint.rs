//! The checkpoint reader (`params_from_safetensors`) on any bytes, against a small GPT-2 config:
//! parameters or an error, never a panic; accepted parameters have the config's shapes and are
//! finite.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use wafersim::model::GptConfig;
use wafersim::model::checkpoint::params_from_safetensors;

/// 1 layer, d 4, 2 heads, 4 positions, vocabulary 5, FFN 8: small enough that a fuzzer can build
/// whole valid files, with every kind of tensor present.
fn config() -> GptConfig {
    GptConfig {
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

fuzz_target!(|data: &[u8]| {
    let config = config();
    if let Ok(params) = params_from_safetensors(Path::new("fuzz.safetensors"), data, &config) {
        assert_eq!(params.blocks.len(), config.n_layer);
        assert_eq!(params.wte.data.len(), config.vocab_size * config.n_embd);
        for (_, tensor) in params.tensors() {
            assert!(tensor.iter().all(|v| v.is_finite()));
        }
    }
});
