#!/usr/bin/env bash
# `make bench-cpu`: instructions per operation, counted by callgrind over every thread of the
# process (benches/cpu.rs has the workloads), with a breakdown by what the instructions do, and
# bytes written per operation. Deterministic where wall-clock ratios on a shared machine are
# not: the same code gives the same counts within ~1%.
#
# Usage: scripts/bench-cpu.sh [--baseline CSV] [--only w1,w2] [--quick] [--native-reps N]
#   --baseline CSV  also print each figure as a ratio to that earlier run's CSV
#   --only          a subset of: fresh-1 fresh-64 raw-64 replay-1 axum-bare-64 axum-fresh-64
#                   axum-replay-64
#   --quick         fewer operations per run (noisier: ~2%)
#   --page-size N   the engine's database created with N-byte pages (EngineConfig::page_size)
#   --native-reps N pairs of native runs for the CPU-time table (default 5; 0: none)
#
# Writes bench-results/cpu-<date>.{md,csv} and bench-results/cpu-latest.{md,csv}.
#
# Then each workload runs natively too (scripts/native_cpu.py): user and kernel CPU time and
# context switches per operation, from the process's rusage, medians of --native-reps pairs.
# Natively most of a durable claim's CPU is in the kernel, which the instruction counts miss.
#
# What callgrind cannot see: time in the kernel (fdatasync, pwrite, futex waits, loopback TCP)
# and what valgrind hides from the program: its CPUID reports no SHA extensions, so SHA-256 runs
# in the software implementation here, where a real run on a CPU with SHA-NI uses it (the
# hashing row overstates what hashing costs natively, by ~5x on such CPUs).
set -euo pipefail
cd "$(dirname "$0")/.."

command="scripts/bench-cpu.sh${*:+ $*}"
baseline=()
only="fresh-1,fresh-64,raw-64,replay-1,axum-bare-64,axum-fresh-64,axum-replay-64"
scale=1
native_reps=5
while [[ $# -gt 0 ]]; do
    case "$1" in
        --baseline) baseline=(--baseline "$2"); shift 2 ;;
        --only) only="$2"; shift 2 ;;
        --quick) scale=0; shift ;;
        --page-size) export CPU_BENCH_PAGE_SIZE="$2"; shift 2 ;;
        --native-reps) native_reps="$2"; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done

if ! command -v valgrind >/dev/null 2>&1 || ! command -v callgrind_annotate >/dev/null 2>&1; then
    echo "bench-cpu: installing valgrind (Debian package)" >&2
    if [[ $(id -u) -ne 0 ]]; then sudo=sudo; else sudo=; fi
    $sudo apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq valgrind >/dev/null
fi

CARGO=${CARGO:-cargo}
# The bench profile: optimized, with line tables, so callgrind names every function.
bin=$($CARGO bench --bench cpu --features axum-integration --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cpu" and m.get("executable"):
        print(m["executable"])' | tail -1)
if [[ -z "$bin" ]]; then
    $CARGO bench --bench cpu --features axum-integration --no-run >&2
    echo "bench-cpu: could not find the bench binary" >&2
    exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Operations per run: (n1, n2). The difference is what is measured.
ops() {
    case "$1" in
        fresh-1) echo "1000 3000" ;;
        replay-1) echo "10000 30000" ;;
        *) echo "2000 8000" ;;
    esac
}

runs=()
IFS=, read -r -a list <<<"$only"
for w in "${list[@]}"; do
    read -r n1 n2 < <(ops "$w")
    if [[ $scale == 0 ]]; then n1=$((n1 / 2)); n2=$((n2 / 2)); fi
    spec="$w"
    for n in "$n1" "$n2"; do
        out="$work/$w.$n.cg"
        echo "bench-cpu: $w, $n operations" >&2
        line=$(TMPDIR="$work" valgrind --tool=callgrind --callgrind-out-file="$out" \
            "$bin" "$w" "$n" 2>"$work/$w.$n.log" | tail -1) || {
            cat "$work/$w.$n.log" >&2
            exit 1
        }
        written=${line##*written=}
        spec="$spec:$n:$out:$written"
    done
    runs+=("$spec")
done

# Native operations per run: (n1, n2), more than under valgrind (~50x faster).
native_ops() {
    case "$1" in
        fresh-1) echo "1000 5000" ;;
        *) echo "8000 40000" ;;
    esac
}

mkdir -p bench-results
stamp=$(date -u +%Y-%m-%dT%H%M%SZ)
{
    echo "# make bench-cpu, $stamp"
    echo
    echo "- command: $command; code: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (modified)')"
    echo "- page size: ${CPU_BENCH_PAGE_SIZE:-4096 (default)}; $(valgrind --version); machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
    echo
} >"$work/head.md"
python3 scripts/callgrind_table.py "$work/table.md" "bench-results/cpu-$stamp.csv" "${baseline[@]}" "${runs[@]}" >/dev/null
parts=("$work/head.md" "$work/table.md")
if [[ $native_reps -gt 0 ]]; then
    specs=()
    for w in "${list[@]}"; do
        read -r n1 n2 < <(native_ops "$w")
        if [[ $scale == 0 ]]; then n1=$((n1 / 2)); n2=$((n2 / 2)); fi
        specs+=("$w:$n1:$n2")
    done
    python3 scripts/native_cpu.py "$bin" "$work/native.md" "bench-results/cpu-$stamp.csv" \
        "$native_reps" "${specs[@]}"
    printf '\n' >"$work/gap.md"
    parts+=("$work/gap.md" "$work/native.md")
fi
cat "${parts[@]}" >"bench-results/cpu-$stamp.md"
cp "bench-results/cpu-$stamp.md" bench-results/cpu-latest.md
cp "bench-results/cpu-$stamp.csv" bench-results/cpu-latest.csv
cat bench-results/cpu-latest.md
