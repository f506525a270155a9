#!/usr/bin/env bash
# Stops a PyKMIP server started by start.sh: kills its whole process group.
#
#   stop.sh DIR|PGID
#
# Sends SIGCONT (in case a test stopped it), then SIGTERM, then SIGKILL after 5 s.
set -euo pipefail

arg="${1:?usage: stop.sh DIR|PGID}"
if [[ -d "$arg" ]]; then
    pgid="$(cat "$arg/server.pgid")"
else
    pgid="$arg"
fi
[[ "$pgid" =~ ^[0-9]+$ && "$pgid" -gt 1 ]] || { echo "stop.sh: bad pgid '$pgid'" >&2; exit 1; }

kill -CONT -- -"$pgid" 2>/dev/null || exit 0
kill -TERM -- -"$pgid" 2>/dev/null || exit 0
for _ in $(seq 50); do
    kill -0 -- -"$pgid" 2>/dev/null || exit 0
    sleep 0.1
done
kill -KILL -- -"$pgid" 2>/dev/null || true
