#!/usr/bin/env bash
# The network version of the perf matrix: `nvseal serve -c configs/perf-target.yaml` on one core,
# `nvseal perf --ab` (nsid 1 plaintext vs nsid 2 encrypted, interleaved slices) on another, over
# loopback, for 4 KiB randread/randwrite QD32 and 128 KiB read/write QD8 on the null and malloc
# subsystems. Each cell is run RUNS times; report.py prints medians.
#
# Environment: NVSEAL (binary), TIME (s per side, default 10), RUNS (default 3),
#   TARGET_CORE (default 0), PERF_CORES (CPU list for perf, default 1), OUT (output directory).
set -euo pipefail
cd "$(dirname "$0")/.."
NVSEAL=${NVSEAL:-target/release/nvseal}
[ -x "$NVSEAL" ] || { cargo build --release --quiet; NVSEAL=target/release/nvseal; }
TIME=${TIME:-10}
RUNS=${RUNS:-3}
TARGET_CORE=${TARGET_CORE:-0}
PERF_CORES=${PERF_CORES:-1}
OUT=${OUT:-perf/out/nvmf-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT/runs"

cfg="$OUT/target.yaml"
sock="$(mktemp -d /tmp/nvseal-perf.XXXXXX)/rpc.sock"
# The target's own reactor busy time is read over its control socket (--target-rpc).
{ sed "s/^  cores: \"0\"/  cores: \"$TARGET_CORE\"/" configs/perf-target.yaml
  printf 'rpc:\n  socket_path: %s\n' "$sock"; } > "$cfg"
"$NVSEAL" serve -c "$cfg" --log warn 2> "$OUT/serve.log" &
serve_pid=$!
trap 'kill -INT $serve_pid 2>/dev/null; wait $serve_pid 2>/dev/null || true; rm -rf "$(dirname "$sock")"' EXIT
for _ in $(seq 100); do
  (exec 3<>/dev/tcp/127.0.0.1/4420) 2>/dev/null && break
  sleep 0.1
done

run() { # name subsys workload size qd
  local name=$1 sub=$2 wl=$3 size=$4 qd=$5 r
  for r in $(seq "$RUNS"); do
    echo ">> $name on $sub, run $r/$RUNS" >&2
    "$NVSEAL" perf --traddr 127.0.0.1:4420 --subnqn "nqn.2026-11.io.nvseal:perf-$sub" \
      --ab --nsid-a 1 --nsid-b 2 -w "$wl" -o "$size" -q "$qd" -t "$TIME" --cores "$PERF_CORES" \
      --no-progress --target-rpc "$sock" --json "$OUT/runs/$name-$sub-$r.json" > "$OUT/runs/$name-$sub-$r.txt"
  done
}
for sub in null malloc; do
  run randread-4k "$sub" randread 4k 32
  run randwrite-4k "$sub" randwrite 4k 32
  run read-128k "$sub" read 128k 8
  run write-128k "$sub" write 128k 8
done
python3 perf/report_nvmf.py "$OUT"/runs/*.json --json "$OUT/nvmf.json" | tee "$OUT/nvmf.txt"
