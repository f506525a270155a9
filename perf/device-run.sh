#!/usr/bin/env bash
# A quiet-machine benchmark run with prebuilt binaries (perf/out/bin/{nvseal,xts-bench}): the XTS
# tiers against OpenSSL, bdevperf on null/malloc (plain, encrypted, reactor scaling), and the
# NVMe/TCP matrix (target on core 0, perf on core 1). Results go to $RESULTS (default perf/out/device).
set -uo pipefail
cd "$(dirname "$0")/.."
R=${RESULTS:-perf/out/device}
mkdir -p "$R"
B=perf/out/bin/nvseal
export NVSEAL_LOG=warn
{ lscpu | grep -E 'Model name|^CPU\(s\)|Flags' | cut -c1-400; uname -r; } > "$R/machine.txt" 2>&1
taskset -c 2 perf/out/bin/xts-bench > "$R/xts.txt" 2>&1
bp() { local name=$1; shift; timeout 120 "$B" bdevperf "$@" --no-progress --json "$R/bdevperf-$name.json" > "$R/bdevperf-$name.txt" 2>&1; }
bp null-randread --null 64G -w randread -o 4k -q 32 -t 5 --cores 2
bp malloc-randread --malloc 1G -w randread -o 4k -q 32 -t 5 --cores 2
bp malloc-randwrite-ab --malloc 1G -w randwrite -o 4k -q 32 -t 5 --ab --cores 2
bp malloc-randread-ab --malloc 1G -w randread -o 4k -q 32 -t 5 --ab --cores 2
for n in 1 2 4 8; do bp null-randread-r$n --null 64G -w randread -o 4k -q 32 -t 2 --cores "2-$((1 + n))" --ab; done
TIME=${TIME:-4} RUNS=${RUNS:-3} NVSEAL=$B OUT="$R/nvmf" TARGET_CORE=0 PERF_CORES=1 timeout 400 perf/run-nvmf.sh > "$R/nvmf.txt" 2>&1
echo done > "$R/done"
