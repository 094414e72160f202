//! Fuzz target `key_header`: see `fuzz/checks.rs`, `check_key_header`.
#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check_key_header(data));
