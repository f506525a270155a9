#!/usr/bin/env bash
# Starts one PyKMIP server in its own process group and prints that process group id.
#
#   start.sh DIR PORT [DB]
#
# DIR must hold ca.pem, server.pem and server.key (see gen-certs.sh). Writes DIR/server.conf,
# DIR/policy/ (empty: PyKMIP's built-in policies apply) and logs to DIR/server.log. DB is the
# SQLite file (default DIR/pykmip.db); servers sharing one DB model a replicated KMS cluster.
# Waits until PORT listens on 127.0.0.1 (timeout NVSEAL_PYKMIP_START_TIMEOUT_S, default 30).
# Stop with stop.sh DIR (or kill -- -PGID). The venv comes from NVSEAL_PYKMIP_VENV, as in setup.sh.
set -euo pipefail

dir="$(cd "${1:?usage: start.sh DIR PORT [DB]}" && pwd)"
port="${2:?usage: start.sh DIR PORT [DB]}"
db="${3:-$dir/pykmip.db}"
venv="${NVSEAL_PYKMIP_VENV:-$HOME/.cache/nvseal/pykmip-venv}"
timeout_s="${NVSEAL_PYKMIP_START_TIMEOUT_S:-30}"

[[ -x "$venv/bin/pykmip-server" ]] || { echo "start.sh: no pykmip-server in $venv; run setup.sh" >&2; exit 1; }
for f in ca.pem server.pem server.key; do
    [[ -f "$dir/$f" ]] || { echo "start.sh: missing $dir/$f; run gen-certs.sh" >&2; exit 1; }
done
mkdir -p "$dir/policy"

# Unknown keys are fatal to PyKMIP; these are the ones it knows.
cat > "$dir/server.conf" <<CONF
[server]
hostname=127.0.0.1
port=$port
certificate_path=$dir/server.pem
key_path=$dir/server.key
ca_path=$dir/ca.pem
auth_suite=TLS1.2
enable_tls_client_auth=True
database_path=$db
logging_level=INFO
policy_path=$dir/policy
CONF

# Always pass -f and -l: without them PyKMIP reads a system-wide config and shares its database.
# setsid gives the server (three processes) its own process group, so one kill stops all.
setsid "$venv/bin/pykmip-server" -f "$dir/server.conf" -l "$dir/server.log" \
    >"$dir/server.out" 2>&1 </dev/null &
pid=$!
echo "$pid" > "$dir/server.pgid"

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }
deadline=$((SECONDS + timeout_s))
until listening; do
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "start.sh: pykmip-server exited; see $dir/server.log and $dir/server.out" >&2
        tail -n 20 "$dir/server.out" >&2 || true
        exit 1
    fi
    if (( SECONDS >= deadline )); then
        echo "start.sh: port $port not listening after ${timeout_s}s" >&2
        kill -- -"$pid" 2>/dev/null || true
        exit 1
    fi
    sleep 0.1
done
echo "$pid"
