#!/usr/bin/env python3
"""Merges `nvseal bdevperf --ab --json` reports into one JSON file and one table.

Usage: report.py RUN.json... [--json OUT.json]
Each row: workload, io size, QD, backend bdev, reactors, plaintext and encrypted IOPS, MB/s,
p50/p99/p99.9 latency (us), reactor busy %, and the encrypted/plaintext ratios.
"""
import json
import os
import sys


def main(argv):
    out_json = None
    files = []
    it = iter(argv)
    for a in it:
        if a == "--json":
            out_json = next(it)
        else:
            files.append(a)
    rows = []
    for f in sorted(files):
        with open(f) as fh:
            r = json.load(fh)
        sides = {s["label"]: s for s in r["sides"]}
        p, e = sides.get("plaintext"), sides.get("encrypted")
        if p is None or e is None:
            print(f"{f}: not an --ab report, skipped", file=sys.stderr)
            continue
        ratio = r.get("ratio_encrypted_over_plaintext") or {}
        rows.append({
            "file": os.path.basename(f),
            "workload": r["workload"],
            "io_size": r["io_size"],
            "queue_depth": r["queue_depth"],
            "bdev": p["bdev"],
            "reactors": r["reactors"],
            "xts_tier": r.get("xts_tier"),
            "plaintext": {k: p[k] for k in ("iops", "mb_per_s", "latency_us", "reactor_busy_pct", "cpu_us_per_io")},
            "encrypted": {k: e[k] for k in ("iops", "mb_per_s", "latency_us", "reactor_busy_pct", "cpu_us_per_io")},
            "ratio": ratio,
        })
    if out_json:
        with open(out_json, "w") as fh:
            json.dump({"runs": rows}, fh, indent=2)
            fh.write("\n")
    hdr = f"{'workload':<10}{'size':>7}{'QD':>4}{'bdev':>8}{'R':>3}{'plain IOPS':>12}{'enc IOPS':>12}{'ratio':>7}" \
          f"{'plain MB/s':>11}{'enc MB/s':>10}{'p99 us p/e':>16}{'p99.9 us p/e':>18}{'busy% p/e':>12}"
    print(hdr)
    for r in rows:
        p, e = r["plaintext"], r["encrypted"]
        size = f"{r['io_size'] // 1024}k"
        print(f"{r['workload']:<10}{size:>7}{r['queue_depth']:>4}{r['bdev'][:7]:>8}{r['reactors']:>3}"
              f"{p['iops']:>12.0f}{e['iops']:>12.0f}{r['ratio'].get('iops', 0):>7.3f}"
              f"{p['mb_per_s']:>11.0f}{e['mb_per_s']:>10.0f}"
              f"{p['latency_us']['p99']:>8.1f}/{e['latency_us']['p99']:<7.1f}"
              f"{p['latency_us']['p99_9']:>9.1f}/{e['latency_us']['p99_9']:<8.1f}"
              f"{p['reactor_busy_pct']:>6.0f}/{e['reactor_busy_pct']:<5.0f}")


if __name__ == "__main__":
    main(sys.argv[1:])
