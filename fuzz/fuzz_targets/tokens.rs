//! The token-file parser (`Batch::from_json`) on any text, against the `tiny` preset: a batch or
//! an error, never a panic; an accepted batch is valid.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wafersim::model::GptConfig;
use wafersim::reference::Batch;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = GptConfig::preset("tiny").expect("tiny exists");
    if let Ok(batch) = Batch::from_json(&config, text) {
        assert!(batch.validate(&config).is_ok());
        assert_eq!(batch.tokens.len(), batch.batch * batch.seq);
    }
});
