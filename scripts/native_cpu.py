#!/usr/bin/env python3
"""Native CPU per operation of `benches/cpu.rs` workloads, kernel included.

What callgrind cannot count: the time the process spends in the kernel (WAL `pwrite`s, `fcntl`
locks, `fdatasync`, futex and eventfd wake-ups, context switches). Each workload runs natively
with n1 and n2 operations; the difference of the process's rusage (user and system CPU of every
thread, context switches), divided by n2 - n1, cancels setup and shutdown as in the callgrind
figures. Repeated `reps` times, alternating n1 and n2; the median of each figure is reported
(single pairs move by ~10% on a shared machine, medians of five by a few percent).

Usage: native_cpu.py BIN MARKDOWN_OUT CSV_APPEND REPS WORKLOAD:N1:N2 [...]
"""

import os
import statistics
import subprocess
import sys

FIELDS = [
    ("user", "user CPU, µs"),
    ("sys", "kernel CPU, µs"),
    ("total", "CPU, µs"),
    ("csw", "context switches"),
    ("wall", "wall clock, µs"),
]


def run(binary, workload, n):
    """rusage of one run: (user s, system s, context switches, wall s)."""
    start = os.times().elapsed
    proc = subprocess.Popen(
        [binary, workload, str(n)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = os.times().elapsed - start
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"native_cpu: {workload} {n} failed:\n{err}")
    return usage.ru_utime, usage.ru_stime, usage.ru_nvcsw + usage.ru_nivcsw, wall


def measure(binary, workload, n1, n2, reps):
    pairs = []
    for _ in range(reps):
        a = run(binary, workload, n1)
        b = run(binary, workload, n2)
        n = n2 - n1
        user = (b[0] - a[0]) / n * 1e6
        sys_ = (b[1] - a[1]) / n * 1e6
        pairs.append(
            {
                "user": user,
                "sys": sys_,
                "total": user + sys_,
                "csw": (b[2] - a[2]) / n,
                "wall": (b[3] - a[3]) / n * 1e6,
            }
        )
    return {k: statistics.median(p[k] for p in pairs) for k, _ in FIELDS}, pairs


def main():
    binary, md_out, csv_out, reps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    results = []
    for spec in sys.argv[5:]:
        workload, n1, n2 = spec.split(":")
        print(f"bench-cpu: {workload} natively, {reps} x ({n1}, {n2}) operations", file=sys.stderr)
        med, pairs = measure(binary, workload, int(n1), int(n2), reps)
        results.append((workload, med, pairs))
    lines = [
        "## Native CPU per operation (user and kernel, every thread)",
        "",
        f"Medians of {reps} pairs of native runs (rusage of the process); the kernel column is "
        "what callgrind cannot see. The range of the pairs is in brackets.",
        "",
        "| per operation | " + " | ".join(w for w, _, _ in results) + " |",
        "|---|" + "---:|" * len(results),
    ]
    for key, label in FIELDS:
        cells = []
        for _, med, pairs in results:
            lo = min(p[key] for p in pairs)
            hi = max(p[key] for p in pairs)
            fmt = "{:.2f}" if key == "csw" else "{:.1f}"
            cells.append(f"{fmt.format(med[key])} [{fmt.format(lo)}-{fmt.format(hi)}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    with open(md_out, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(csv_out, "a") as f:
        for workload, med, _ in results:
            for key, label in FIELDS:
                f.write(f'{workload},"native {label}",{med[key]:.3f}\n')


if __name__ == "__main__":
    main()
