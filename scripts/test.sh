#!/usr/bin/env bash
# `make test`: the whole suite (cargo test --workspace --all-features), the PostgreSQL suites
# included. They use the server at $IDEMPOTENCY_TEST_PG_URL (default
# postgres://postgres@127.0.0.1:5432/test) when it answers; otherwise scripts/pg.sh starts a private
# throwaway PostgreSQL (installing Debian's postgresql package first if needed), which is stopped
# and removed on exit. Without a PostgreSQL the script fails; it never skips those suites.
#
# Usage: scripts/test.sh [more cargo test arguments, e.g. --test integration_tests -- --nocapture]
#   CARGO=...   the cargo command (default cargo; make passes $(CARGO))
set -euo pipefail

cd "$(dirname "$0")/.."

# shellcheck source=scripts/pg.sh
source scripts/pg.sh
trap stop_postgres EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ensure_postgres || exit 1

read -r -a cargo <<<"${CARGO:-cargo}"
"${cargo[@]}" test --workspace --all-features "$@"
