#!/usr/bin/env python3
"""Compare nvseal builds (before vs after a change) on the same machine, in the same run.

Each build is `LABEL=BINARY[:CONFIG]`: CONFIG is the target config its `serve` runs for the
network workloads (default: configs/perf-target.yaml of this tree; give an older tree's own
copy when its schema differs). The first build is the baseline. For each round, every workload
runs once per build, builds interleaved (A B C A B C ...), so slow drift of a shared machine
hits all builds alike; the report gives each build's median over the rounds and its ratio to the
baseline.

Workloads (default: all):
  nvmf-randread-4k   `nvseal perf` 4 KiB random read QD32 against `nvseal serve` (null bdev)
  nvmf-read-128k     `nvseal perf` 128 KiB sequential read QD8 against `nvseal serve` (null)
  bdevperf-4k        `nvseal bdevperf --malloc 1G` 4 KiB random read QD32, plaintext and
                     encrypted (--ab), no network

The target runs on core 0 (`taskset -c 0`), the load generator on core 1. Both the target and
the load generator of one sample come from the same build, so the ratio covers both sides.

Example:
  perf/compare-builds.py --rounds 3 -t 8 \
      base=/work/tgt-base/release/nvseal:/work/wt-base/configs/perf-target.yaml \
      new=target/release/nvseal
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NULL_NQN = "nqn.2026-11.io.nvseal:perf-null"
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-00000000c0de"


def wait_port(port, timeout=20.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def port_free(port):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def run_json(cmd, out):
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr[-2000:]}")
    with open(out) as f:
        return json.load(f)


def nvmf_sample(binary, config, args, secs, tmp):
    if not port_free(4420):
        raise RuntimeError("127.0.0.1:4420 is busy; stop the other target first")
    log = open(os.path.join(tmp, "serve.log"), "a")
    serve = subprocess.Popen(
        ["taskset", "-c", "0", binary, "serve", "-c", config],
        stdout=log, stderr=log)
    try:
        if not wait_port(4420):
            raise RuntimeError(f"{binary} serve did not listen on 4420 (see {log.name})")
        out = os.path.join(tmp, "perf.json")
        d = run_json([binary, "perf", "--traddr", "127.0.0.1:4420", "--subnqn", NULL_NQN,
                      "--hostnqn", HOSTNQN, "--nsid", "1", *args, "-t", str(secs),
                      "--cores", "1", "--no-progress", "--json", out], out)
        return {"plaintext": side_iops(d)}
    finally:
        serve.terminate()
        try:
            serve.wait(timeout=20)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
        log.close()


def side_iops(d):
    if "sides" in d:
        return d["sides"][0]["iops"]
    if "jobs" in d:
        # nvseal perf's fio-style report: the read + write IOPS of all jobs.
        return sum(j["total"]["iops"] for j in d["jobs"])
    if "iops" in d:
        return d["iops"]
    raise RuntimeError(f"no IOPS in report: {json.dumps(d)[:300]}")


def bdevperf_sample(binary, secs, tmp):
    out = os.path.join(tmp, "bdevperf.json")
    d = run_json(["taskset", "-c", "0", binary, "bdevperf", "--malloc", "1G", "-w", "randread",
                  "-o", "4k", "-q", "32", "-t", str(secs), "--ab", "--no-progress", "--json",
                  out], out)
    return {s["label"]: s["iops"] for s in d["sides"]}


WORKLOADS = {
    "nvmf-randread-4k": lambda b, c, s, t: nvmf_sample(b, c, ["-w", "randread", "-o", "4k",
                                                             "-q", "32"], s, t),
    "nvmf-read-128k": lambda b, c, s, t: nvmf_sample(b, c, ["-w", "read", "-o", "128k",
                                                           "-q", "8"], s, t),
    "bdevperf-4k": lambda b, c, s, t: bdevperf_sample(b, s, t),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", nargs="+", help="LABEL=BINARY[:CONFIG]; the first is the baseline")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-t", "--time", type=int, default=8, help="seconds per sample")
    ap.add_argument("-w", "--workload", action="append", choices=sorted(WORKLOADS),
                    help="repeatable; default: all")
    ap.add_argument("--json", help="write every sample and the summary here")
    a = ap.parse_args()
    builds = []
    for spec in a.builds:
        label, _, rest = spec.partition("=")
        binary, _, config = rest.partition(":")
        if not label or not binary or not os.access(binary, os.X_OK):
            sys.exit(f"bad build '{spec}': want LABEL=BINARY[:CONFIG] with an executable BINARY")
        builds.append((label, binary, config or os.path.join(ROOT, "configs/perf-target.yaml")))
    workloads = a.workload or list(WORKLOADS)
    with open("/proc/cpuinfo") as f:
        family = next((l.split(":")[1].strip() for l in f if l.startswith("cpu family")), "?")
    samples = {}  # (workload, side, label) -> [iops]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for w in workloads:
                for label, binary, config in builds:
                    res = WORKLOADS[w](binary, config, a.time, tmp)
                    for side, iops in res.items():
                        samples.setdefault((w, side, label), []).append(iops)
                        print(f"round {r + 1} {w:17} {side:9} {label:8} {iops:12.0f} IOPS",
                              flush=True)
    base = builds[0][0]
    print(f"\ncpu family {family}; medians of {a.rounds} interleaved rounds, {a.time} s each")
    print(f"{'workload':17} {'side':9} {'build':8} {'IOPS':>12} {'ratio':>7}   samples")
    summary = []
    for w in workloads:
        sides = sorted({k[1] for k in samples if k[0] == w})
        for side in sides:
            b = statistics.median(samples[(w, side, base)])
            for label, _, _ in builds:
                v = samples[(w, side, label)]
                m = statistics.median(v)
                summary.append({"workload": w, "side": side, "build": label, "median_iops": m,
                                "ratio": m / b if b else None, "samples": v})
                print(f"{w:17} {side:9} {label:8} {m:12.0f} {m / b:7.3f}   "
                      + " ".join(f"{x:.0f}" for x in v))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cpu_family": family, "rounds": a.rounds, "seconds": a.time,
                       "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
