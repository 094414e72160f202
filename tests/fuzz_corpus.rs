//! Replays every committed fuzz corpus file (`fuzz/corpus/<target>/*`) through the same check
//! functions the fuzz targets run (`fuzz/checks.rs`), as ordinary tests on stable Rust. An input
//! that once found a crash or new coverage is checked on every `cargo test`, so a fixed bug
//! cannot come back unnoticed. Fuzzing itself: `scripts/fuzz.sh` (see RELIABILITY.md).

#[path = "../fuzz/checks.rs"]
mod checks;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `check` on every corpus file of `target`; fails naming each file that panics.
fn replay(target: &str, check: fn(&[u8])) {
    let files = corpus(target);
    assert!(
        !files.is_empty(),
        "fuzz/corpus/{target} is empty: the corpus must be committed"
    );
    let failed: Vec<String> = files
        .iter()
        .filter(|path| {
            let data = std::fs::read(path).unwrap();
            catch_unwind(AssertUnwindSafe(|| check(&data))).is_err()
        })
        .map(|path| path.display().to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} {target} corpus files fail: {failed:#?}",
        failed.len(),
        files.len()
    );
}

#[test]
fn key_header_corpus() {
    replay("key_header", checks::check_key_header);
}

#[test]
fn decode_headers_corpus() {
    replay("decode_headers", checks::check_decode_headers);
}

#[test]
fn canonical_json_corpus() {
    replay("canonical_json", checks::check_canonical_json);
}

#[test]
fn engine_model_corpus() {
    replay("engine_model", checks::check_engine);
}

/// Hand-picked inputs that take each check down its longest path (a list that decodes, a
/// document with nested objects and escapes, quoted keys of both policies).
#[test]
fn checks_run_their_full_path() {
    checks::check_decode_headers(&[1, 1, b'a', 2, 0, 255]);
    checks::check_canonical_json(br#"{"b":[1,{"y":null,"x":"\u00e9"}],"a":-0.5e3}"#);
    checks::check_key_header(b"\"0B6F5A3E-9A7C-4C1E-8F2A-2D8B4F1E6C3A\"");
    checks::check_key_header(br#""a \"q\" \\ b""#);
}
