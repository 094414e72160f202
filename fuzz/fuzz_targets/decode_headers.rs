//! Fuzz target `decode_headers`: see `fuzz/checks.rs`, `check_decode_headers`.
#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check_decode_headers(data));
