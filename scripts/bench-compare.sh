#!/usr/bin/env bash
# `make bench-compare`: the engine against naive SQLite, the raw SQLite ceiling and Redis (without
# persistence, and with appendonly yes + appendfsync always), in one run, plus the engine on a
# pre-filled table (10k, 1M, 5M records), then HTTP end to end (benches/http.rs: the same Axum
# handler bare and behind the layer, and the axum_server example itself on a growing table, with
# its peak memory), then several instances on PostgreSQL (benches/postgres.rs: the engine on
# PostgreSQL against one autocommit statement per step on a 16-connection pool and a raw batched
# ceiling, and the engine in 1, 2 and 3 processes). Writes bench-results/compare-<date>.{md,csv}
# (+ http-<date>.csv, postgres-<date>.{md,csv}) and bench-results/compare-latest.{md,csv}; the
# HTTP and PostgreSQL tables are appended to the compare-*.md report.
#
# Usage: scripts/bench-compare.sh [--quick] [--no-redis] [options for benches/compare.rs]
#   --quick        1 s per case, growth with 10k and 1M records only (a few minutes; the
#                  PostgreSQL part about a minute)
#   --no-redis     do not install or start Redis; the Redis rows are skipped
#   --skip-postgres
#                  no PostgreSQL part
#   --slow-fsync-us N
#                  experiment: every fsync/fdatasync of the bench and of the Redis servers takes
#                  N microseconds longer (an LD_PRELOAD shim built here with gcc), to see each
#                  system on a disk with slow flushes; writes compare-<date>.* only, not -latest
#   --skip-5m      growth without the 5M-record case
#   --skip-growth  no growth cases (the HTTP part runs the example on an empty table only)
#   --skip-http    no HTTP end-to-end part
#   --secs S, --warmup S, --callers 1,8,64, --growth N,N,..., --dir DIR (where the databases go);
#                  --secs, --warmup and --callers apply to the PostgreSQL part too
#
# Redis: installs Debian's redis-server if it is missing (apt-get; needs root), starts two
# private instances on free loopback ports with their data in a temporary directory, and stops
# them (and removes the directory) on exit, whatever happens.
#
# PostgreSQL: scripts/pg.sh's ensure_postgres: the server at $IDEMPOTENCY_TEST_PG_URL (default
# postgres://postgres@127.0.0.1:5432/test) when it answers, else a private throwaway cluster
# (installing Debian's postgresql when missing; note that cluster runs with fsync=off, which the
# report's header shows), stopped on exit. The bench works in a schema of its own (bench_<pid>),
# dropped at its end.
set -euo pipefail

cd "$(dirname "$0")/.."

command="scripts/bench-compare.sh${*:+ $*}"
want_redis=1
want_http=1
want_pg=1
pg_pass=()
slow_us=""
http_secs=5
http_growth="0,1000000"
pass=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick)
            pass+=(--secs 1 --warmup 0.3 --growth 10000,1000000)
            pg_pass+=(--secs 1 --warmup 0.3)
            http_secs=2
            http_growth="0,100000"
            ;;
        --skip-postgres) want_pg=0 ;;
        --secs | --warmup | --callers)
            pass+=("$1" "${2:?$1 needs a value}")
            pg_pass+=("$1" "$2")
            shift
            ;;
        --no-redis) want_redis=0 ;;
        --skip-http) want_http=0 ;;
        --skip-growth)
            pass+=("$1")
            http_growth="0"
            ;;
        --slow-fsync-us)
            slow_us="${2:?--slow-fsync-us needs a number}"
            shift
            ;;
        *) pass+=("$1") ;;
    esac
    shift
done

tmp=""
pids=()
cleanup() {
    local pid
    if declare -F stop_postgres >/dev/null; then stop_postgres; fi
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n "$tmp" ]]; then rm -rf "$tmp"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# start_redis NAME extra-args... : starts one instance and sets $addr to its address.
# (Not run in a command substitution: the server must be a child of this shell.)
start_redis() {
    local name="$1"
    shift
    local port dir
    port="$(free_port)"
    dir="$tmp/$name"
    mkdir -p "$dir"
    "${preload[@]}" redis-server --bind 127.0.0.1 --port "$port" --protected-mode yes --daemonize no \
        --dir "$dir" --save "" --logfile "$dir/redis.log" "$@" </dev/null >/dev/null 2>&1 &
    pids+=("$!")
    for _ in $(seq 1 100); do
        if redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null | grep -q PONG; then
            addr="127.0.0.1:$port"
            return 0
        fi
        sleep 0.1
    done
    echo "redis-server ($name) did not start; its log:" >&2
    cat "$dir/redis.log" >&2 || true
    return 1
}

tmp="$(mktemp -d -t idempotency-bench-XXXXXX)"

preload=()
if [[ -n "$slow_us" ]]; then
    cat >"$tmp/slowfsync.c" <<'SHIM'
/* Every fsync/fdatasync takes SLOW_FSYNC_US microseconds longer (benchmark experiments). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>
static void slow(void) {
    const char *v = getenv("SLOW_FSYNC_US");
    long us = v ? atol(v) : 0;
    struct timespec ts = { us / 1000000, (us % 1000000) * 1000 };
    nanosleep(&ts, NULL);
}
int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    int r = real(fd);
    slow();
    return r;
}
int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    int r = real(fd);
    slow();
    return r;
}
SHIM
    gcc -O2 -shared -fPIC -o "$tmp/slowfsync.so" "$tmp/slowfsync.c" -ldl
    preload=(env "LD_PRELOAD=$tmp/slowfsync.so" "SLOW_FSYNC_US=$slow_us")
    pass+=(--no-latest)
    echo "slow fsync: +$slow_us us on every fsync/fdatasync (LD_PRELOAD shim)" >&2
fi

redis_args=()
if [[ "$want_redis" == 1 ]]; then
    if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
        echo "installing redis-server from Debian ..." >&2
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server
    fi
    start_redis plain --appendonly no
    plain="$addr"
    start_redis aof --appendonly yes --appendfsync always
    aof="$addr"
    echo "Redis: $plain (no persistence), $aof (appendfsync always)" >&2
    redis_args=(--redis-plain "$plain" --redis-aof "$aof")
fi

stamp="$(date -u +%Y-%m-%dT%H:%M:%SZ)${slow_us:+-slow-fsync-${slow_us}us}"
"${preload[@]}" cargo bench --bench compare -- "${redis_args[@]}" --stamp "$stamp" --command "$command" "${pass[@]}"

# Part 5: HTTP end to end. The example server is built in release mode and run as its own process.
if [[ "$want_http" == 1 ]]; then
    cargo build --release --example axum_server --features axum-integration
    target_dir="$(cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
    file_stamp="$(printf '%s' "$stamp" | sed 's/[^A-Za-z0-9]/-/g')"
    mkdir -p bench-results
    "${preload[@]}" env HTTP_BENCH_SECS="$http_secs" HTTP_BENCH_GROWTH="$http_growth" \
        HTTP_BENCH_SERVER="$target_dir/release/examples/axum_server" \
        HTTP_BENCH_MD="$tmp/http.md" HTTP_BENCH_CSV="bench-results/http-$file_stamp.csv" \
        cargo bench --bench http --features axum-integration
    targets=("bench-results/compare-$file_stamp.md")
    if [[ -z "$slow_us" ]]; then
        targets+=(bench-results/compare-latest.md)
        cp "bench-results/http-$file_stamp.csv" bench-results/http-latest.csv
    fi
    for f in "${targets[@]}"; do
        if [[ -f "$f" ]]; then
            printf '\n### Part 5: HTTP end to end (Axum, loopback)\n\n' >>"$f"
            cat "$tmp/http.md" >>"$f"
        fi
    done
    echo "appended the HTTP part to ${targets[*]}" >&2
fi

# Part 6: several instances on PostgreSQL (benches/postgres.rs, issue #15), on the server that
# scripts/pg.sh finds or starts.
if [[ "$want_pg" == 1 ]]; then
    # shellcheck source=scripts/pg.sh
    source scripts/pg.sh
    if ! ensure_postgres; then
        echo "no PostgreSQL for the PostgreSQL part (see above); rerun with --skip-postgres to leave it out" >&2
        exit 1
    fi
    file_stamp="$(printf '%s' "$stamp" | sed 's/[^A-Za-z0-9]/-/g')"
    pg_latest=()
    if [[ -n "$slow_us" ]]; then
        # The fsync shim would slow this bench's process only, not the server's flushes.
        pg_latest=(--no-latest)
    fi
    cargo bench --bench postgres --features postgres -- --url "$IDEMPOTENCY_TEST_PG_URL" \
        --stamp "$stamp" --command "$command" "${pg_latest[@]}" "${pg_pass[@]}" >"$tmp/postgres.md"
    targets=("bench-results/compare-$file_stamp.md")
    if [[ -z "$slow_us" ]]; then targets+=(bench-results/compare-latest.md); fi
    for f in "${targets[@]}"; do
        if [[ -f "$f" ]]; then
            printf '\n### Part 6: several instances on PostgreSQL\n\n' >>"$f"
            # The bench's own report, without its title, its sections one level down.
            sed -e '1d' -e '2{/^$/d}' -e 's/^### /#### /' "$tmp/postgres.md" >>"$f"
        fi
    done
    echo "appended the PostgreSQL part to ${targets[*]}" >&2
fi
