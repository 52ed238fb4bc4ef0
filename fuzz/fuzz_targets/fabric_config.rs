//! `FabricConfig::from_file_text` (TOML or JSON, chosen by the first byte) and
//! `FabricConfig::from_spec` on any text: a config or an error, never a panic; an accepted config
//! is valid and survives a JSON round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wafersim_sim::FabricConfig;

fuzz_target!(|data: &[u8]| {
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
});
