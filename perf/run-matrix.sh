#!/usr/bin/env bash
# Runs the perf matrix through `nvseal bdevperf --ab` (plaintext vs encrypted, interleaved) on
# the null and malloc bdevs, for every workload file in perf/workloads/ and 1..N reactors, and
# writes one JSON file and one table.
#
# Environment:
#   NVSEAL       binary (default: target/release/nvseal, built if missing)
#   WORKERS      reactor counts to run (default: "1 .. number of CPUs", at most 4)
#   BACKENDS     default "null malloc"
#   TIME         seconds per side per run (default 5)
#   OUT          output directory (default perf/out/<timestamp>)
set -euo pipefail
cd "$(dirname "$0")/.."
NVSEAL=${NVSEAL:-target/release/nvseal}
if [ ! -x "$NVSEAL" ]; then
  cargo build --release --quiet
  NVSEAL=target/release/nvseal
fi
ncpu=$(nproc)
[ "$ncpu" -gt 4 ] && ncpu=4
WORKERS=${WORKERS:-$(seq -s ' ' 1 "$ncpu")}
BACKENDS=${BACKENDS:-null malloc}
TIME=${TIME:-5}
OUT=${OUT:-perf/out/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT/runs"

for wl in perf/workloads/*.args; do
  name=$(basename "$wl" .args)
  args=$(grep -v '^#' "$wl" | tr '\n' ' ')
  for be in $BACKENDS; do
    case $be in
      null) dev=(--null 64G) ;;
      malloc) dev=(--malloc 1G) ;;
      *) echo "unknown backend $be" >&2; exit 2 ;;
    esac
    for n in $WORKERS; do
      json="$OUT/runs/$name-$be-$n.json"
      echo ">> $name on $be, $n reactor(s)" >&2
      # shellcheck disable=SC2086
      "$NVSEAL" bdevperf "${dev[@]}" $args --reactors "$n" -t "$TIME" --ab --no-progress --json "$json" \
        > "$OUT/runs/$name-$be-$n.txt"
    done
  done
done
python3 perf/report.py "$OUT"/runs/*.json --json "$OUT/matrix.json" | tee "$OUT/matrix.txt"
echo "wrote $OUT/matrix.json and $OUT/matrix.txt" >&2
