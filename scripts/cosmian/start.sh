#!/usr/bin/env bash
# Starts one Cosmian KMS in its own process group, KMIP binary protocol over TLS (the socket
# server, client certificates required) on 127.0.0.1:PORT, and prints that process group id.
#
#   start.sh DIR PORT [HTTP_PORT]
#
# DIR must hold ca.pem, server.pem and server.key (scripts/pykmip/gen-certs.sh makes them).
# Writes DIR/kms.toml, keeps its SQLite database in DIR/db and logs to DIR/server.out. Its HTTP
# API (unused by nvseal) listens on 127.0.0.1:HTTP_PORT (default PORT+1). Waits until PORT
# listens (timeout NVSEAL_COSMIAN_START_TIMEOUT_S, default 60). Stop with `kill -- -PGID`. The
# binary comes from setup.sh (NVSEAL_COSMIAN_ROOT).
set -euo pipefail

dir="$(cd "${1:?usage: start.sh DIR PORT [HTTP_PORT]}" && pwd)"
port="${2:?usage: start.sh DIR PORT [HTTP_PORT]}"
http_port="${3:-$((port + 1))}"
root="${NVSEAL_COSMIAN_ROOT:-$HOME/.cache/nvseal/cosmian}"
bin="$root/bin/cosmian_kms"
timeout_s="${NVSEAL_COSMIAN_START_TIMEOUT_S:-60}"

[[ -x "$bin" ]] || { echo "start.sh: no $bin; run scripts/cosmian/setup.sh" >&2; exit 1; }
for f in ca.pem server.pem server.key; do
    [[ -f "$dir/$f" ]] || { echo "start.sh: missing $dir/$f" >&2; exit 1; }
done
mkdir -p "$dir/db"

cat > "$dir/kms.toml" <<TOML
default_username = "admin"

[db]
database_type = "sqlite"
sqlite_path = "$dir/db"

[tls]
tls_cert_file = "$dir/server.pem"
tls_key_file = "$dir/server.key"
clients_ca_cert_file = "$dir/ca.pem"

[socket_server]
socket_server_start = true
socket_server_port = $port
socket_server_hostname = "127.0.0.1"

[http]
port = $http_port
hostname = "127.0.0.1"

[logging]
rust_log = "info,cosmian_kms=info"
TOML

setsid "$bin" -c "$dir/kms.toml" >"$dir/server.out" 2>&1 </dev/null &
pid=$!
echo "$pid" > "$dir/server.pgid"

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }
deadline=$((SECONDS + timeout_s))
until listening; do
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "start.sh: cosmian_kms exited; see $dir/server.out" >&2
        tail -n 30 "$dir/server.out" >&2 || true
        exit 1
    fi
    if (( SECONDS >= deadline )); then
        echo "start.sh: port $port not listening after ${timeout_s}s" >&2
        kill -- -"$pid" 2>/dev/null || true
        exit 1
    fi
    sleep 0.2
done
echo "$pid"
