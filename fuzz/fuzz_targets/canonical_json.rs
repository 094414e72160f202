//! Fuzz target `canonical_json`: see `fuzz/checks.rs`, `check_canonical_json`.
#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check_canonical_json(data));
