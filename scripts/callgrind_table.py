#!/usr/bin/env python3
"""Instructions per operation from pairs of callgrind runs (scripts/bench-cpu.sh).

Each workload ran twice under `valgrind --tool=callgrind`, with n1 and n2 operations after the
same setup. The self cost of every function in the n2 run minus the n1 run, divided by n2 - n1,
is that function's cost per operation in steady state: setup, shutdown and process start cancel
out. Functions are grouped by what they do (SQLite, hashing, allocation, ...).

Usage: callgrind_table.py OUT.md OUT.csv [--baseline CSV] RUN...
where RUN is workload:n1:file1:written1:n2:file2:written2.
"""

import csv
import re
import subprocess
import sys
from collections import defaultdict

# (group, test on "function [object]" text); first match wins.
GROUPS = [
    ("hashing (SHA-256)", r"^(sha2::|digest::|<sha2::|<digest::|idempotency_rs::fingerprint::|idempotency_rs::key::.*record_id)"),
    ("SQLite: WAL, pager, files", r"^(wal|sqlite3Wal|sqlite3Pager|pager|sqlite3Pcache|pcache|unix|sqlite3Os|robust_|seekAndWrite|posix)"),
    ("SQLite: B-tree", r"^(sqlite3Btree|btree|balance|insertCell|dropCell|fillInCell|allocateSpace|decodeFlags|moveTo|getAndInit|freePage|allocateBtreePage|defragmentPage|rebuildPage|editPage|computeCellSize|cellSize|pageInsertArray|pageFreeArray|populateCellCache|cachedCellSize|copyNodeContent|assemblePage|clearCell|accessPayload|fetchPayload|getCellInfo|btreeParseCell|sqlite3VdbeRecordCompare|vdbeRecordCompare|sqlite3GetVarint|sqlite3PutVarint|getOverflowPage|freeSpace|saveCursor|restoreCursor|releasePage|sqlite3VdbeIdxKey)"),
    ("SQLite: VM, statements, API", r"^(sqlite3|vdbe|Vdbe|releaseMemArray|serialGet|columnMem|bindText|valueToText|applyAffinity|createTableStmt|exprCode|walker|resolve|sqlite3_|blob|parse|yy|lookaside|measureAllocationSize|mallocWithAlarm|dbMalloc|dbReallocFinish|pcache1)"),
    ("rusqlite (statement cache, binding, rows)", r"^(rusqlite::|<rusqlite::|hashlink::|<hashlink::)"),
    ("allocation (malloc, free)", r"^(malloc|free|realloc|calloc|_int_malloc|_int_free|_int_realloc|cfree|__libc_malloc|__libc_free|__libc_realloc|__libc_calloc|malloc_consolidate|unlink_chunk|tcache|__rust_alloc|__rust_dealloc|__rust_realloc|__rdl_|alloc::alloc::|<alloc::alloc::|_mid_memalign|__posix_memalign|arena_get2|sysmalloc)"),
    ("memcpy, memcmp, memset", r"^(__mem|mem(cpy|move|set|cmp)|__strlen|strlen|__str|str)"),
    ("channels, locks, wake-ups", r"^(crossbeam_channel::|<crossbeam_channel::|crossbeam_utils::|oneshot::|<oneshot::|parking_lot|<parking_lot|lock_api::|std::sync::|<std::sync::|std::thread::|std::sys::(sync|thread|pal::unix::futex|pal::unix::thread)|futex|__lll_|pthread_|___pthread|syscall|__futex|sched_yield|__GI___pthread|core::sync::atomic)"),
    ("tokio", r"^(tokio::|<tokio::)"),
    ("HTTP stack (axum, hyper, http, tower)", r"^(axum::|<axum::|axum_core::|<axum_core::|hyper::|<hyper::|http::|<http::|http_body|<http_body|tower::|<tower::|matchit::|<matchit::|bytes::|<bytes::|futures_util::|<futures_util::|serde_urlencoded|percent_encoding)"),
    ("JSON (serde_json)", r"^(serde_json::|<serde_json::|ryu::|itoa::|<&mut serde_json)"),
    ("encoding (postcard)", r"^(postcard::|<postcard::|<&mut postcard|idempotency_rs::response::encode)"),
    ("the layers (axum, contract)", r"^(idempotency_rs::(axum_integration|contract|shims)|<idempotency_rs::(axum_integration|contract|shims))"),
    ("tracing, metrics", r"^(tracing::|<tracing::|tracing_core::|<tracing_core::|metrics::|<metrics::)"),
    ("the engine (idempotency_rs)", r"^(idempotency_rs::|<idempotency_rs::|<alloc::sync::Arc<idempotency_rs|core::ptr::drop_in_place<idempotency_rs|core::ptr::drop_in_place<.*idempotency_rs)"),
    ("the bench driver", r"^(cpu::|<cpu::|core::ptr::drop_in_place<cpu)"),
    ("kernel entry, clocks (user side)", r"^(clock_gettime|__clock_gettime|__vdso|_dl_|__GI___clock|time|gettimeofday|__write|__pwrite|__pread|write|pwrite|pread|read|__libc_|fdatasync|fsync|__GI_)"),
]
COMPILED = [(g, re.compile(p)) for g, p in GROUPS]
OTHER = "other (std, core, libc)"

LINE = re.compile(r"^\s*([\d,]+)\s+(?:\(\s*[\d.]+%\)\s+)?(.*)$")


def self_costs(path):
    """Self instructions per function name (inlined code attributed to its function)."""
    out = subprocess.run(
        ["callgrind_annotate", "--inclusive=no", "--threshold=100", "--auto=no", path],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    costs = defaultdict(int)
    total = None
    in_table = False
    for line in out.splitlines():
        if "PROGRAM TOTALS" in line:
            total = int(LINE.match(line).group(1).replace(",", ""))
            continue
        if line.startswith("Ir") and "file:function" in line:
            in_table = True
            continue
        if not in_table:
            continue
        m = LINE.match(line)
        if not m:
            continue
        rest = m.group(2)
        obj = ""
        om = re.search(r" \[([^\]]*)\]$", rest)
        if om:
            obj = om.group(1)
            rest = rest[: om.start()]
        # "file:function": the file part never holds a colon.
        func = rest.split(":", 1)[1] if ":" in rest else rest
        costs[(func, obj)] += int(m.group(1).replace(",", ""))
    return total, costs


def group_of(func, obj):
    name = func.lstrip("<")
    for g, rx in COMPILED:
        if rx.search(func) or rx.search(name):
            return g
    if "libsqlite3" in obj or "sqlite3" in func:
        return "SQLite: VM, statements, API"
    return OTHER


def main():
    args = sys.argv[1:]
    md_path, csv_path = args[0], args[1]
    args = args[2:]
    baseline = {}
    if args and args[0] == "--baseline":
        with open(args[1]) as f:
            for row in csv.DictReader(f):
                baseline[(row["workload"], row["what"])] = float(row["per_op"])
        args = args[2:]
    workloads = []
    per_group = {}
    per_func = {}
    totals = {}
    written = {}
    for run in args:
        w, n1, f1, w1, n2, f2, w2 = run.split(":")
        n1, n2 = int(n1), int(n2)
        t1, c1 = self_costs(f1)
        t2, c2 = self_costs(f2)
        d = n2 - n1
        workloads.append(w)
        totals[w] = (t2 - t1) / d
        written[w] = (int(w2) - int(w1)) / d
        groups = defaultdict(float)
        funcs = defaultdict(float)
        for key in set(c1) | set(c2):
            v = (c2.get(key, 0) - c1.get(key, 0)) / d
            groups[group_of(*key)] += v
            funcs[key[0]] += v
        # What the threshold hid, so that the groups add up to the total.
        groups[OTHER] += totals[w] - sum(groups.values())
        per_group[w] = groups
        per_func[w] = funcs

    names = [g for g, _ in GROUPS] + [OTHER]
    lines = []
    head = "| per operation | " + " | ".join(workloads) + " |"
    lines.append(head)
    lines.append("|---|" + "---:|" * len(workloads))

    def fmt(w, what, v):
        s = f"{v:,.0f}"
        b = baseline.get((w, what))
        if b:
            s += f" ({v / b:.2f}x)"
        return s

    lines.append(
        "| **instructions** | "
        + " | ".join("**" + fmt(w, "instructions", totals[w]) + "**" for w in workloads)
        + " |"
    )
    for g in names:
        if all(abs(per_group[w].get(g, 0)) < 50 for w in workloads):
            continue
        lines.append(
            f"| {g} | " + " | ".join(fmt(w, g, per_group[w].get(g, 0)) for w in workloads) + " |"
        )
    lines.append(
        "| **bytes written** | "
        + " | ".join(fmt(w, "bytes written", written[w]) for w in workloads)
        + " |"
    )
    md = ["## Instructions per operation (callgrind, every thread; user space only)", ""]
    md += lines
    md.append("")
    if baseline:
        md.append("(ratios: this run / the baseline CSV)")
        md.append("")
    for w in workloads:
        top = sorted(per_func[w].items(), key=lambda kv: -kv[1])[:15]
        md.append(f"### {w}: the 15 costliest functions, self instructions per operation")
        md.append("")
        md.append("| function | instructions | share |")
        md.append("|---|---:|---:|")
        for f, v in top:
            short = f if len(f) <= 90 else f[:87] + "..."
            short = short.replace("|", "\\|")
            md.append(f"| `{short}` | {v:,.0f} | {100 * v / totals[w]:.1f}% |")
        md.append("")
    text = "\n".join(md)
    with open(md_path, "w") as f:
        f.write(text + "\n")
    with open(csv_path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["workload", "what", "per_op"])
        for w in workloads:
            out.writerow([w, "instructions", f"{totals[w]:.1f}"])
            out.writerow([w, "bytes written", f"{written[w]:.1f}"])
            for g in names:
                out.writerow([w, g, f"{per_group[w].get(g, 0):.1f}"])
    print(text)


if __name__ == "__main__":
    main()
