# Every target installs what it needs on a fresh machine (Rust toolchain, gcc, Python 3, git).
CARGO ?= cargo

.PHONY: test run example lint coverage fuzz bench bench-compare bench-metrics bench-cpu doc ci

## The whole suite: unit, integration (Axum, Actix, Tonic), model, crash, fault, fuzz-corpus, doc and PostgreSQL tests; the latter on $IDEMPOTENCY_TEST_PG_URL, or on a throwaway PostgreSQL started (installed if missing) when none answers there (scripts/pg.sh).
test:
	CARGO='$(CARGO)' bash scripts/test.sh

## The main example: the orders service behind the Axum layer on 127.0.0.1:3000.
run example:
	$(CARGO) run --example axum_server --features axum-integration

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings

## Line coverage with cargo-tarpaulin (installed from crates.io if missing); HTML in target/coverage/.
coverage:
	command -v cargo-tarpaulin >/dev/null 2>&1 || $(CARGO) install cargo-tarpaulin --locked
	$(CARGO) tarpaulin --workspace --all-features --engine ptrace --out Html --out Stdout --output-dir target/coverage --skip-clean

## Every fuzz target for 60 s (cargo-fuzz on the stable toolchain; see fuzz/README.md).
fuzz:
	bash scripts/fuzz.sh

## Criterion benches of the engine against the naive design and the raw SQLite ceiling.
bench:
	$(CARGO) bench --bench engine

## Engine vs naive SQLite vs raw ceiling vs Redis vs HTTP end to end, in one run (see BENCHMARKS.md).
bench-compare:
	bash scripts/bench-compare.sh

## What the `metrics` feature costs: each engine case of bench-compare beside the same case with a Prometheus recorder installed.
bench-metrics:
	$(CARGO) bench --bench compare --features metrics -- --only engine-full,engine-normal,engine-metrics --skip-growth --no-latest

## Instructions per operation (callgrind over every thread, installed if missing) for fresh claims, replays and the Axum layer, by what they are spent on, and bytes written per operation; then native user and kernel CPU time and context switches per operation; BASELINE=bench-results/cpu-X.csv adds ratios to an earlier run.
bench-cpu:
	CARGO='$(CARGO)' bash scripts/bench-cpu.sh $(if $(BASELINE),--baseline $(BASELINE))

doc:
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps --all-features

ci:
	bash .ci/run
