#!/usr/bin/env python3
"""nvseal against SPDK, on one machine, in one run (issue 15's numbers; docs/spdk.md).

1. FFI cost (initiator side): the same loopback target (`nvseal serve -c
   configs/perf-target.yaml`, reactor on TARGET_CORE) driven by `nvseal bdevperf` on an
   `spdk_nvme` bdev (SPDK's NVMe/TCP initiator through nvseal's FFI layer and reactor) and by
   SPDK's own `spdk_nvme_perf`, each pinned to INIT_CORE: 4 KiB randread QD32 and 128 KiB read
   QD8, IOPS per initiator core, ratio nvseal/SPDK.
2. Target against target: `spdk_nvme_perf` on INIT_CORE driving `nvseal serve` and then SPDK's
   `nvmf_tgt` (each with its one reactor on TARGET_CORE), null and malloc namespaces, plaintext
   and encrypted (nvseal's crypto bdev vs SPDK's crypto bdev on its software accel module,
   AES-XTS from ISA-L crypto), 4 KiB randread/randwrite QD32 and 128 KiB read/write QD8: IOPS,
   GB/s and target CPU microseconds per I/O (the target process's CPU time over the run divided
   by the I/Os done; both targets poll, so this is CPU per I/O at the load offered).

Cells are interleaved (nvseal, SPDK, nvseal, ...); the table shows the medians of RUNS and, as
the ratio, the median of the per-pair ratios (each pair ran back to back, so it saw the same
machine). Writes every run to JSON (--json). The CPU family is printed with the numbers: AES and the
cores differ between Zen 4 and Zen 5 machines.

Needs: a release build with --features spdk (NVSEAL), an installed SPDK (SPDK_PREFIX, default
/opt/spdk: bin/spdk_nvme_perf, bin/nvmf_tgt, lib/). Runs without hugepages (--no-huge).
"""

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NQN_NULL = "nqn.2026-11.io.nvseal:perf-null"
NQN_MALLOC = "nqn.2026-11.io.nvseal:perf-malloc"
CELLS = [("randread", 4096, 32), ("randwrite", 4096, 32), ("read", 131072, 8), ("write", 131072, 8)]
FFI_CELLS = [("randread", 4096, 32), ("read", 131072, 8)]


def cpu_family():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu family"):
                return int(line.split(":")[1])
    return None


def proc_cpu_s(pid):
    """User + system CPU seconds of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_port(port, proc, what, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            sys.exit(f"{what} exited ({proc.returncode}) before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{what} did not listen on {port}")


def stop(proc):
    if proc and proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Spdk:
    def __init__(self, prefix):
        self.prefix = prefix
        self.env = dict(os.environ, LD_LIBRARY_PATH=os.path.join(prefix, "lib"))

    def tool(self, name):
        p = os.path.join(self.prefix, "bin", name)
        if not os.access(p, os.X_OK):
            sys.exit(f"{p} missing: set SPDK_PREFIX to an SPDK installation")
        return p

    def perf(self, port, nqn, nsid, wl, size, qd, secs, core):
        trid = (f"trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:{port} "
                f"subnqn:{nqn} ns:{nsid}")
        cmd = [self.tool("spdk_nvme_perf"), "--no-huge", "-s", "512", "-c", hex(1 << core),
               "-q", str(qd), "-o", str(size), "-w", wl, "-t", str(secs), "-r", trid]
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=secs + 60)
        if out.returncode != 0:
            sys.exit(f"spdk_nvme_perf failed:\n{out.stdout}\n{out.stderr}")
        for line in out.stdout.splitlines():
            if line.strip().startswith("Total"):
                nums = re.findall(r"[-+]?\d+\.\d+|\d+", line.split(":", 1)[1])
                return float(nums[0])
        sys.exit(f"no Total line in spdk_nvme_perf output:\n{out.stdout}")


def nvseal_target(nvseal, core, port, logdir):
    with open(os.path.join(ROOT, "configs/perf-target.yaml")) as f:
        text = f.read()
    text = text.replace('cores: "0"', f'cores: "{core}"').replace("port: 4420", f"port: {port}")
    cfg = os.path.join(logdir, "nvseal-target.yaml")
    with open(cfg, "w") as f:
        f.write(text)
    log = open(os.path.join(logdir, "nvseal-target.log"), "w")
    p = subprocess.Popen([nvseal, "serve", "-c", cfg, "--log", "warn"], stdout=log, stderr=log)
    wait_port(port, p, "nvseal serve")
    return p


def spdk_target(spdk, core, port, logdir, crypto=True):
    """nvmf_tgt with the same subsystems as configs/perf-target.yaml; None if `crypto` was asked
    for and this SPDK has no crypto bdev (built --without-crypto)."""
    key = os.urandom(64).hex()
    bdev = [
        {"method": "bdev_null_create",
         "params": {"name": "null0", "num_blocks": 16 << 20, "block_size": 4096}},
        {"method": "bdev_null_create",
         "params": {"name": "null1", "num_blocks": 16 << 20, "block_size": 4096}},
        {"method": "bdev_malloc_create",
         "params": {"name": "mem0", "num_blocks": 262144, "block_size": 4096}},
        {"method": "bdev_malloc_create",
         "params": {"name": "mem1", "num_blocks": 262144, "block_size": 4096}},
    ]
    if crypto:
        bdev += [
            {"method": "bdev_crypto_create",
             "params": {"base_bdev_name": "null1", "name": "null1-crypt", "key_name": "k0"}},
            {"method": "bdev_crypto_create",
             "params": {"base_bdev_name": "mem1", "name": "mem1-crypt", "key_name": "k0"}},
        ]
    nvmf = [{"method": "nvmf_create_transport", "params": {"trtype": "TCP"}}]
    for nqn, a, b in [(NQN_NULL, "null0", "null1-crypt"), (NQN_MALLOC, "mem0", "mem1-crypt")]:
        if not crypto:
            b = a.replace("0", "1")
        nvmf += [
            {"method": "nvmf_create_subsystem",
             "params": {"nqn": nqn, "allow_any_host": True, "serial_number": "SPDKBENCH"}},
            {"method": "nvmf_subsystem_add_ns",
             "params": {"nqn": nqn, "namespace": {"bdev_name": a, "nsid": 1}}},
            {"method": "nvmf_subsystem_add_ns",
             "params": {"nqn": nqn, "namespace": {"bdev_name": b, "nsid": 2}}},
            {"method": "nvmf_subsystem_add_listener",
             "params": {"nqn": nqn, "listen_address": {"trtype": "TCP", "adrfam": "IPv4",
                                                       "traddr": "127.0.0.1",
                                                       "trsvcid": str(port)}}},
        ]
    conf = {"subsystems": [
        {"subsystem": "accel", "config": [
            {"method": "accel_crypto_key_create",
             "params": {"cipher": "AES_XTS", "key": key[:64], "key2": key[64:], "name": "k0"}}]},
        {"subsystem": "bdev", "config": bdev},
        {"subsystem": "nvmf", "config": nvmf},
    ]}
    path = os.path.join(logdir, "nvmf_tgt.json")
    with open(path, "w") as f:
        json.dump(conf, f)
    log = open(os.path.join(logdir, "nvmf_tgt.log"), "w")
    p = subprocess.Popen([spdk.tool("nvmf_tgt"), "--no-huge", "-s", "3072", "-m", hex(1 << core),
                          "--json", path, "-r", os.path.join(logdir, "spdk.sock")],
                         env=spdk.env, stdout=log, stderr=log)
    t0 = time.time()
    while time.time() - t0 < 60:
        if p.poll() is not None:
            with open(os.path.join(logdir, "nvmf_tgt.log")) as f:
                text = f.read()
            if crypto and "'bdev_crypto_create' was not found" in text:
                return None
            sys.exit(f"nvmf_tgt exited ({p.returncode}):\n{text[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return p
        except OSError:
            time.sleep(0.1)
    sys.exit("nvmf_tgt did not listen")


def nvseal_bdevperf(nvseal, port, wl, size, qd, secs, core, logdir):
    """nvseal bdevperf on an spdk_nvme bdev (SPDK's TCP initiator) to the target on `port`."""
    cfg = os.path.join(logdir, "bdevperf.yaml")
    with open(cfg, "w") as f:
        f.write(f"""reactor:
  cores: "{core}"
  idle_backoff_us: 0
spdk:
  hugepages: false
  mem_size_mib: 512
bdevs:
  - name: remote
    type: spdk_nvme
    trid: "trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:{port} subnqn:{NQN_NULL}"
    queue_depth: 128
""")
    js = os.path.join(logdir, "bdevperf.json")
    out = subprocess.run([nvseal, "bdevperf", "-c", cfg, "--bdev", "remote", "-w", wl,
                          "-o", str(size), "-q", str(qd), "-t", str(secs), "--cores", str(core),
                          "--no-progress", "--json", js, "--log", "warn"],
                         capture_output=True, text=True, timeout=secs + 60)
    if out.returncode != 0:
        sys.exit(f"nvseal bdevperf failed:\n{out.stdout}\n{out.stderr}")
    with open(js) as f:
        side = json.load(f)["sides"][0]
    if side["io_errors"]:
        sys.exit(f"nvseal bdevperf: {side['io_errors']} I/O errors")
    return side["iops"]


def paired(ours, theirs):
    """Median of the per-run ratios ours[i]/theirs[i]: the runs are interleaved, so each pair
    saw the same machine; on a shared machine whose speed drifts between runs this is steadier
    than a ratio of medians."""
    return statistics.median(o / t for o, t in zip(ours, theirs))


def measured(run):
    """Runs `run` (returns IOPS) with the target's CPU time around it."""
    def go(target, *a):
        c0, t0 = proc_cpu_s(target.pid), time.time()
        iops = run(*a)
        c1, t1 = proc_cpu_s(target.pid), time.time()
        ios = iops * (t1 - t0)
        return iops, (c1 - c0) * 1e6 / ios if ios else float("nan")
    return go


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nvseal", default=os.environ.get("NVSEAL",
                                                       os.path.join(ROOT, "target/release/nvseal")))
    ap.add_argument("--spdk-prefix", default=os.environ.get("SPDK_PREFIX", "/opt/spdk"))
    ap.add_argument("--time", type=int, default=5, help="seconds per run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--target-core", type=int, default=0)
    ap.add_argument("--init-core", type=int, default=1)
    ap.add_argument("--only", choices=["ffi", "targets"], help="one part only")
    ap.add_argument("--backend", choices=["null", "malloc"], action="append",
                    help="targets: only these backends (repeatable; default both)")
    ap.add_argument("--kind", choices=["plain", "encrypted"], action="append",
                    help="targets: only these namespace kinds (repeatable; default both)")
    ap.add_argument("--cell", action="append", metavar="WORKLOAD",
                    help="targets: only these workloads (randread, randwrite, read, write; "
                         "repeatable; default all)")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    spdk = Spdk(a.spdk_prefix)
    logdir = tempfile.mkdtemp(prefix="spdk-bench.")
    fam = cpu_family()
    result = {"cpu_family": fam, "time_s": a.time, "runs": a.runs, "ffi": [], "targets": []}
    print(f"cpu family {fam}; {a.runs} runs of {a.time} s per cell, medians; logs in {logdir}")

    if a.only in (None, "ffi"):
        port = 4420 + os.getpid() % 1000
        tgt = nvseal_target(a.nvseal, a.target_core, port, logdir)
        try:
            print("\n== FFI cost: initiator IOPS per core against nvseal serve (null) ==")
            print(f"{'cell':<22}{'nvseal bdevperf':>16}{'spdk_nvme_perf':>16}{'ratio':>8}")
            for wl, size, qd in FFI_CELLS:
                ours, theirs = [], []
                for _ in range(a.runs):
                    ours.append(nvseal_bdevperf(a.nvseal, port, wl, size, qd, a.time,
                                                a.init_core, logdir))
                    theirs.append(spdk.perf(port, NQN_NULL, 1, wl, size, qd, a.time,
                                            a.init_core))
                o, t = statistics.median(ours), statistics.median(theirs)
                r = paired(ours, theirs)
                cell = f"{wl} {size // 1024}K QD{qd}"
                print(f"{cell:<22}{o:>16.0f}{t:>16.0f}{r:>8.3f}")
                result["ffi"].append({"cell": cell, "nvseal_iops": ours, "spdk_iops": theirs,
                                      "ratio": r})
        finally:
            stop(tgt)

    if a.only in (None, "targets"):
        print("\n== Targets: spdk_nvme_perf driving nvseal serve vs nvmf_tgt ==")
        print(f"{'cell':<30}{'nvseal IOPS':>12}{'SPDK IOPS':>12}{'ratio':>7}"
              f"{'nvseal us/IO':>13}{'SPDK us/IO':>11}{'ratio':>7}")
        perf = measured(spdk.perf)
        port = 5420 + os.getpid() % 1000
        probe = spdk_target(spdk, a.target_core, port, logdir)
        spdk_crypto = probe is not None
        stop(probe)
        if not spdk_crypto:
            print("(this SPDK has no crypto bdev, built --without-crypto: encrypted cells are "
                  "nvseal's only)")
        result["spdk_crypto_bdev"] = spdk_crypto
        for nqn, backend in [(NQN_NULL, "null"), (NQN_MALLOC, "malloc")]:
            if a.backend and backend not in a.backend:
                continue
            for nsid, kind in [(1, "plain"), (2, "encrypted")]:
                if a.kind and kind not in a.kind:
                    continue
                for wl, size, qd in CELLS:
                    if a.cell and wl not in a.cell:
                        continue
                    ours, theirs = [], []
                    for _ in range(a.runs):
                        for who, bag in [("nvseal", ours), ("spdk", theirs)]:
                            if who == "spdk" and kind == "encrypted" and not spdk_crypto:
                                continue
                            tgt = (nvseal_target(a.nvseal, a.target_core, port, logdir)
                                   if who == "nvseal" else
                                   spdk_target(spdk, a.target_core, port, logdir, spdk_crypto))
                            try:
                                bag.append(perf(tgt, port, nqn, nsid, wl, size, qd, a.time,
                                                a.init_core))
                            finally:
                                stop(tgt)
                    nan = float("nan")
                    oi = statistics.median(x[0] for x in ours)
                    ti = statistics.median(x[0] for x in theirs) if theirs else nan
                    oc = statistics.median(x[1] for x in ours)
                    tc = statistics.median(x[1] for x in theirs) if theirs else nan
                    ri = paired([x[0] for x in ours], [x[0] for x in theirs]) if theirs else nan
                    rc = paired([x[1] for x in theirs], [x[1] for x in ours]) if theirs else nan
                    cell = f"{backend} {kind} {wl} {size // 1024}K QD{qd}"
                    gb = f" ({oi * size / 1e9:.2f}/{ti * size / 1e9:.2f} GB/s)" if size > 4096 else ""
                    print(f"{cell:<30}{oi:>12.0f}{ti:>12.0f}{ri:>7.3f}"
                          f"{oc:>13.2f}{tc:>11.2f}{rc:>7.3f}{gb}")
                    result["targets"].append({
                        "cell": cell, "nvseal": ours, "spdk": theirs,
                        "iops_ratio": ri, "cpu_us_per_io": [oc, tc],
                        "cpu_ratio_spdk_over_nvseal": rc})
        print("\n(us/IO ratio = SPDK's CPU per I/O over nvseal's: >= 1.0 means nvseal uses less)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
