#!/usr/bin/env python3
"""Medians of repeated `nvseal perf --ab --json` runs (perf/run-nvmf.sh): one row per
(workload, subsystem) with plaintext (a) and encrypted (b) IOPS, MB/s, p50/p99/p99.9 latency and
the b/a ratio of the median run, and the target's reactor busy % and CPU us per I/O when the
runs were made with `--target-rpc`.

After the table it checks the project's performance goals (docs/perf.md, "Goals") against the
medians and prints each as met or missed, with the measured value.

Usage: report_nvmf.py RUN.json... [--json OUT.json]
"""
import json
import os
import re
import statistics
import sys


# (what, workload, subsystem, measure, minimum): measure is "plain_iops", "plain_gbps" or "ratio".
GOALS = [
    ("plaintext 4 KiB randread QD32 on null", "randread-4k", "null", "plain_iops", 900e3),
    ("plaintext 128 KiB read QD8 on null", "read-128k", "null", "plain_gbps", 7.0),
] + [
    (f"encrypted/plaintext {w} on {sub}", w, sub, "ratio", m)
    for w, m in (("randread-4k", 0.85), ("randwrite-4k", 0.85), ("read-128k", 0.78),
                 ("write-128k", 0.78))
    for sub in ("null", "malloc")
]

KEYS = ("iops", "mb_per_s", "p50_us", "p99_us", "p99_9_us", "perf_busy_pct", "target_busy_pct",
        "target_cpu_us_per_io")


def main(argv):
    out_json = None
    files = []
    it = iter(argv)
    for a in it:
        if a == "--json":
            out_json = next(it)
        else:
            files.append(a)
    groups = {}
    for f in sorted(files):
        m = re.match(r"(.+)-(null|malloc)-(\d+)\.json$", os.path.basename(f))
        if not m:
            continue
        with open(f) as fh:
            groups.setdefault((m.group(1), m.group(2)), []).append(json.load(fh))
    rows = []
    for (name, sub), runs in sorted(groups.items()):
        def side(r, label):
            j = next(j for j in r["jobs"] if j["jobname"] == label)
            t = j["total"]
            pct = t["clat_ns"]["percentile"]
            return {
                "iops": t["iops"],
                "mb_per_s": t["bw_bytes"] / 1e6,
                "p50_us": pct["50.000000"] / 1e3,
                "p99_us": pct["99.000000"] / 1e3,
                "p99_9_us": pct["99.900000"] / 1e3,
                "perf_busy_pct": j.get("reactor_busy_pct", 0.0),
                "target_busy_pct": j.get("target_busy_pct", float("nan")),
                "target_cpu_us_per_io": j.get("target_cpu_us_per_io", float("nan")),
            }
        ratios = sorted(runs, key=lambda r: r["ratio_b_over_a"]["iops"])
        median_run = ratios[len(ratios) // 2]
        rows.append({
            "workload": name,
            "subsystem": sub,
            "runs": len(runs),
            "plaintext": {k: statistics.median(side(r, "a")[k] for r in runs) for k in KEYS},
            "encrypted": {k: statistics.median(side(r, "b")[k] for r in runs) for k in KEYS},
            "ratio_encrypted_over_plaintext": statistics.median(r["ratio_b_over_a"]["iops"] for r in runs),
            "ratio_of_median_run": median_run["ratio_b_over_a"],
        })
    goals = []
    for what, name, sub, measure, minimum in GOALS:
        row = next((r for r in rows if r["workload"] == name and r["subsystem"] == sub), None)
        if row is None:
            value = None
        elif measure == "plain_iops":
            value = row["plaintext"]["iops"]
        elif measure == "plain_gbps":
            value = row["plaintext"]["mb_per_s"] / 1e3
        else:
            value = row["ratio_encrypted_over_plaintext"]
        goals.append({"goal": what, "minimum": minimum, "measured": value,
                      "met": value is not None and value >= minimum})
    if out_json:
        with open(out_json, "w") as fh:
            json.dump({"rows": rows, "goals": goals}, fh, indent=2)
            fh.write("\n")
    print(f"{'workload':<14}{'subsys':>7}{'n':>3}{'plain IOPS':>12}{'enc IOPS':>12}{'plain MB/s':>11}{'enc MB/s':>10}{'ratio':>7}"
          f"{'p50 us p/e':>15}{'p99 us p/e':>16}{'p99.9 us p/e':>18}{'tgt busy% p/e':>15}{'tgt us/io p/e':>16}")
    for r in rows:
        p, e = r["plaintext"], r["encrypted"]
        print(f"{r['workload']:<14}{r['subsystem']:>7}{r['runs']:>3}{p['iops']:>12.0f}{e['iops']:>12.0f}{p['mb_per_s']:>11.0f}{e['mb_per_s']:>10.0f}"
              f"{r['ratio_encrypted_over_plaintext']:>7.3f}{p['p50_us']:>8.1f}/{e['p50_us']:<6.1f}{p['p99_us']:>8.1f}/{e['p99_us']:<7.1f}"
              f"{p['p99_9_us']:>9.1f}/{e['p99_9_us']:<8.1f}"
              f"{p['target_busy_pct']:>8.1f}/{e['target_busy_pct']:<6.1f}{p['target_cpu_us_per_io']:>8.2f}/{e['target_cpu_us_per_io']:<7.2f}")

    print()
    print("goals (docs/perf.md):")
    for g in goals:
        v = g["measured"]
        shown = "not run" if v is None else (f"{v:,.0f}" if v >= 1000 else f"{v:.3f}")
        print(f"  {'met   ' if g['met'] else 'MISSED'} {g['goal']:<46} {shown:>10}  (>= {g['minimum']:g})")
    print(f"  {sum(g['met'] for g in goals)} of {len(goals)} met")


if __name__ == "__main__":
    main(sys.argv[1:])
