#!/usr/bin/env python3
"""Deep-rekey benchmarks (issue 14's numbers), each against a baseline measured in the same run.

  pass    Deep rekey of an encrypted malloc namespace (default 4 GiB) with no host I/O, one
          reactor: wall time from `rekey.deep` to `finished`, GB/s, and nvseal's own MiB/s.
  file    The same on `uring` over a file (default 4 GiB, in --dir), against `dd` reading and
          rewriting the same file in place (1 MiB blocks, O_DIRECT, fdatasync at the end): the
          plain read+write cost of the bytes the pass moves.
  impact  `nvseal perf` 4 KiB randrw 70/30 QD32 over NVMe/TCP on the encrypted namespace,
          rounds alternating: no rekey / a deep rekey limited to --rate MiB/s running (the pass
          is paused at the end of each rekey round and resumed in the next). Reports IOPS and p99
          both ways (medians over rounds) and the ratio.

The target's one reactor is pinned to core 0 (its control threads, the pass's among them, may run
anywhere, as in production); the load generator runs on core 1. Uses
the local key provider (a key file in a temporary directory): the data path is the one managed
(KMIP) keys use.

Example:
  perf/rekey-bench.py --binary target/release/nvseal -w pass -w impact --rounds 3
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
NQN = "nqn.2026-12.io.nvseal:rekey-bench"
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-0000000dee9b"
MIB = 1 << 20
# The target process may use every CPU (its reactor is pinned to core 0 by the config; the pass's
# control thread floats, as it does in production); REKEY_BENCH_TARGET_CPUS narrows it.
TARGET_CPUS = os.environ.get("REKEY_BENCH_TARGET_CPUS",
                             ",".join(str(c) for c in sorted(os.sched_getaffinity(0))))
META = 1 << 20


def port_free(port):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Target:
    """`nvseal serve` on a generated config with one encrypted namespace."""

    def __init__(self, binary, tmp, backing, size_bytes, path=None):
        self.binary = binary
        self.sock = os.path.join(tmp, "rpc.sock")
        self.port = free_port()
        if backing == "malloc":
            base = (f"  - {{ name: disk, type: malloc, size_bytes: {size_bytes + META}, "
                    f"block_size: 4096 }}\n")
        else:
            base = (f"  - {{ name: disk, type: uring, path: {path}, size_bytes: {size_bytes + META}, "
                    f"block_size: 4096 }}\n")
        cfg = os.path.join(tmp, "target.yaml")
        with open(cfg, "w") as f:
            f.write(
                "reactor:\n  cores: \"0\"\n  idle_backoff_us: 0\n"
                f"keys:\n  local:\n    path: {tmp}/keys\n    create: true\n  audit_log: {tmp}/audit.jsonl\n"
                f"rpc:\n  socket_path: {self.sock}\n"
                "bdevs:\n" + base +
                "  - { name: vol, type: encrypted, base: disk, provider: local, create: true }\n"
                f"subsystems:\n  - nqn: {NQN}\n    serial: REKEYB\n    allowed_hosts: [\"{HOSTNQN}\"]\n"
                "    namespaces:\n      - { nsid: 1, bdev: vol, encrypted: true }\n"
                f"    listen: [{{ addr: 127.0.0.1, port: {self.port} }}]\n")
        self.log = open(os.path.join(tmp, "serve.log"), "a")
        self.p = subprocess.Popen(["taskset", "-c", TARGET_CPUS, binary, "serve", "-c", cfg],
                                  stdout=self.log, stderr=self.log)
        end = time.time() + 600
        while time.time() < end:
            try:
                st = self.rpc("keys.status")
                if st["namespaces"] and st["namespaces"][0]["state"]["state"] == "online":
                    return
            except RuntimeError:
                pass
            if self.p.poll() is not None:
                raise RuntimeError(f"serve exited (see {self.log.name})")
            time.sleep(0.2)
        raise RuntimeError("namespace never came online")

    def rpc(self, method, params=None):
        cmd = [self.binary, "rpc", "-s", self.sock, method]
        if params is not None:
            cmd.append(json.dumps(params))
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"rpc {method}: {r.stderr.strip()}")
        return json.loads(r.stdout)

    def status(self):
        v = self.rpc("rekey.status", {"namespace": "vol"})["rekeys"]
        return v[0] if v else None

    def wait_not_running(self, timeout=3600):
        end = time.time() + timeout
        while time.time() < end:
            s = self.status()
            if s and s["state"] != "running":
                return s
            time.sleep(0.05)
        raise RuntimeError("pass did not end")

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self.log.close()


def timed_pass(t, rate=None):
    params = {"namespace": "vol"}
    if rate:
        params["rate_mib_s"] = rate
    t0 = time.time()
    t.rpc("rekey.deep", params)
    s = t.wait_not_running()
    wall = time.time() - t0
    if s["state"] != "finished":
        raise RuntimeError(f"pass ended {s}")
    return wall, s


def work_pass(a, tmp, out):
    size = a.size_gib << 30
    t = Target(a.binary, tmp, "malloc", size)
    try:
        for r in range(a.rounds):
            wall, s = timed_pass(t)
            gbs = size / wall / 1e9
            out.setdefault("pass_gb_s", []).append(gbs)
            print(f"round {r + 1} pass malloc {a.size_gib} GiB: {wall:.2f} s = {gbs:.2f} GB/s "
                  f"(nvseal: {s['mib_s']:.0f} MiB/s)", flush=True)
    finally:
        t.stop()


def work_file(a, tmp, out):
    size = a.size_gib << 30
    path = os.path.join(a.dir, "rekey-bench.img")
    with open(path, "wb") as f:
        f.truncate(size + META)
    t = None
    try:
        t = Target(a.binary, tmp, "uring", size, path)
        for r in range(a.rounds):
            wall, s = timed_pass(t)
            mbs = size / wall / 1e6
            out.setdefault("file_pass_mb_s", []).append(mbs)
            print(f"round {r + 1} pass uring {a.size_gib} GiB: {wall:.2f} s = {mbs:.0f} MB/s",
                  flush=True)
            t.stop()
            t = None
            t0 = time.time()
            subprocess.run(["taskset", "-c", "0", "dd", f"if={path}", f"of={path}", "bs=1M",
                            f"count={size // MIB}", "skip=1", "seek=1", "conv=notrunc,fdatasync",
                            "iflag=direct", "oflag=direct", "status=none"], check=True)
            dd = size / (time.time() - t0) / 1e6
            out.setdefault("file_dd_mb_s", []).append(dd)
            print(f"round {r + 1} dd read+rewrite in place: {dd:.0f} MB/s", flush=True)
            t = Target(a.binary, tmp, "uring", size, path)
    finally:
        if t:
            t.stop()
        os.unlink(path)


def perf(a, t, secs, tmp):
    out = os.path.join(tmp, "perf.json")
    r = subprocess.run([a.binary, "perf", "--traddr", f"127.0.0.1:{t.port}", "--subnqn", NQN,
                        "--hostnqn", HOSTNQN, "--nsid", "1", "-w", "randrw", "-M", "70", "-o",
                        "4k", "-q", "32", "-t", str(secs), "--cores", "1", "--no-progress",
                        "--json", out], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True)
    if r.returncode != 0:
        raise RuntimeError(f"perf failed: {r.stderr[-2000:]}")
    with open(out) as f:
        d = json.load(f)
    iops = sum(j["total"]["iops"] for j in d["jobs"])
    p99 = max(j["total"]["clat_ns"]["percentile"]["99.000000"] for j in d["jobs"])
    return iops, p99 / 1000.0


def work_impact(a, tmp, out):
    size = a.size_gib << 30
    t = Target(a.binary, tmp, "malloc", size)
    try:
        # Every block written once, so reads hit data.
        perf_fill = subprocess.run([a.binary, "perf", "--traddr", f"127.0.0.1:{t.port}",
                                    "--subnqn", NQN, "--hostnqn", HOSTNQN, "--nsid", "1", "-w",
                                    "write", "-o", "128k", "-q", "8", "-n",
                                    str(size // (128 << 10)), "--cores", "1", "--no-progress"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if perf_fill.returncode != 0:
            raise RuntimeError(perf_fill.stderr[-2000:])
        for r in range(a.rounds):
            iops, p99 = perf(a, t, a.time, tmp)
            out.setdefault("impact_base_iops", []).append(iops)
            out.setdefault("impact_base_p99_us", []).append(p99)
            print(f"round {r + 1} randrw 70/30 no rekey:          {iops:10.0f} IOPS p99 {p99:8.1f} us",
                  flush=True)
            s = t.status()
            if s and s["state"] == "paused":
                t.rpc("rekey.resume", {"namespace": "vol", "rate_mib_s": a.rate})
            else:
                t.rpc("rekey.deep", {"namespace": "vol", "rate_mib_s": a.rate})
            before, t0 = t.status()["watermark_blocks"], time.monotonic()
            iops, p99 = perf(a, t, a.time, tmp)
            s = t.status()
            moved = (s["watermark_blocks"] - before) * 4096 / MIB
            achieved = moved / (time.monotonic() - t0)
            out.setdefault("impact_pass_mib_s", []).append(achieved)
            if s["state"] == "running":
                t.rpc("rekey.pause", {"namespace": "vol"})
            out.setdefault("impact_rekey_iops", []).append(iops)
            out.setdefault("impact_rekey_p99_us", []).append(p99)
            print(f"round {r + 1} randrw 70/30 rekey at {a.rate} MiB/s: {iops:10.0f} IOPS p99 "
                  f"{p99:8.1f} us (pass moved {moved:.0f} MiB = {achieved:.0f} MiB/s, {s['state']})",
                  flush=True)
    finally:
        t.stop()


WORK = {"pass": work_pass, "file": work_file, "impact": work_impact}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/nvseal"))
    ap.add_argument("-w", "--workload", action="append", choices=sorted(WORK))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-gib", type=int, default=4)
    ap.add_argument("-t", "--time", type=int, default=6, help="seconds per perf sample")
    ap.add_argument("--rate", type=int, default=500, help="MiB/s of the pass in `impact`")
    ap.add_argument("--dir", default="/var/tmp", help="where `file` puts its image")
    ap.add_argument("--json")
    a = ap.parse_args()
    if not os.access(a.binary, os.X_OK):
        sys.exit(f"{a.binary} is not executable (cargo build --release)")
    with open("/proc/cpuinfo") as f:
        family = next((l.split(":")[1].strip() for l in f if l.startswith("cpu family")), "?")
    out = {"cpu_family": family}
    for w in a.workload or list(WORK):
        with tempfile.TemporaryDirectory() as tmp:
            WORK[w](a, tmp, out)
    med = {k: statistics.median(v) for k, v in out.items() if isinstance(v, list)}
    print(f"\ncpu family {family}; medians of {a.rounds} rounds")
    if "pass_gb_s" in med:
        print(f"pass, malloc {a.size_gib} GiB, no host I/O: {med['pass_gb_s']:.2f} GB/s")
    if "file_pass_mb_s" in med:
        print(f"pass, uring file: {med['file_pass_mb_s']:.0f} MB/s vs dd read+rewrite "
              f"{med['file_dd_mb_s']:.0f} MB/s = {med['file_pass_mb_s'] / med['file_dd_mb_s']:.2f}")
    if "impact_base_iops" in med:
        b, r = med["impact_base_iops"], med["impact_rekey_iops"]
        print(f"randrw 70/30 4k QD32: {b:.0f} IOPS (p99 {med['impact_base_p99_us']:.1f} us) without; "
              f"{r:.0f} IOPS (p99 {med['impact_rekey_p99_us']:.1f} us) with a pass at {a.rate} MiB/s: "
              f"ratio {r / b:.3f}")
        pairs = [x / y for x, y in zip(out["impact_rekey_iops"], out["impact_base_iops"])]
        print(f"  per-round ratios {', '.join(f'{p:.3f}' for p in pairs)} (median "
              f"{statistics.median(pairs):.3f}); the pass ran at {med['impact_pass_mib_s']:.0f} MiB/s "
              f"of {a.rate} asked (median)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"samples": out, "medians": med}, f, indent=1)


if __name__ == "__main__":
    main()
