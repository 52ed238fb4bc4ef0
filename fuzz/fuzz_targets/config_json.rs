//! `GptConfig::from_hf_json` on any text: a config or an error, never a panic; an accepted config
//! is valid and survives a round trip through `to_hf_json`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wafersim::model::GptConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = GptConfig::from_hf_json(text) {
        assert!(config.validate().is_ok());
        let again = GptConfig::from_hf_json(&config.to_hf_json()).expect("round trip");
        assert_eq!(again, config);
    }
});
