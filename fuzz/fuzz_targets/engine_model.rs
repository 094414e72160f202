//! Fuzz target `engine_model`: see `fuzz/checks.rs`, `check_engine`.
#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check_engine(data));
