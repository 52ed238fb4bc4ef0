//! `GptConfig::from_hf_json` on any bytes. The checks are in `fuzz/harness.rs`, shared with the
//! replay of the regression inputs in `tests/fuzz_regressions.rs`.
#![no_main]

include!("../harness.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness_config_json(data));
