#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/*.rs) on the stable toolchain.
#
#   scripts/fuzz.sh            # every target for 60 s (FUZZ_SECONDS to change)
#   scripts/fuzz.sh key_header # one target
#   FUZZ_CMIN=1 scripts/fuzz.sh  # then minimise each corpus (cargo fuzz cmin)
#
# cargo-fuzz needs nightly-only flags (-Zsanitizer, sancov passes); RUSTC_BOOTSTRAP=1 lets the
# stable rustc accept them. -s none: the crate forbids unsafe code, so AddressSanitizer only
# slows the run down (SQLite's C code is not instrumented either way); -a turns on debug
# assertions and overflow checks. New coverage is kept in fuzz/corpus/<target>/, which
# tests/fuzz_corpus.rs replays on every `cargo test`. A crash is written to
# fuzz/artifacts/<target>/: copy it into the corpus once fixed.
set -euo pipefail

cd "$(dirname "$0")/../fuzz"
export RUSTC_BOOTSTRAP=1
seconds="${FUZZ_SECONDS:-60}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz from crates.io" >&2
    cargo install cargo-fuzz --locked
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

cargo fuzz build -s none -a
status=0
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    extra=()
    # The engine target spells out command sequences: let inputs grow past libFuzzer's
    # slow default length ramp.
    if [ "$target" = engine_model ]; then
        extra+=(-max_len=512 -len_control=0)
    fi
    echo "== fuzzing $target for ${seconds}s" >&2
    if ! cargo fuzz run -s none -a "$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 "${extra[@]}"; then
        echo "== $target FAILED: see fuzz/artifacts/$target/" >&2
        status=1
    fi
    if [ "${FUZZ_CMIN:-0}" = 1 ]; then
        cargo fuzz cmin -s none -a "$target"
    fi
done
exit "$status"
