#!/usr/bin/env bash
# Self-test of the QEMU/TCG Linux-initiator harness, without nvseal.
#
# Host side: makes sure setup.sh has run, serves a random 1 MiB blob with python3's
# http.server on 127.0.0.1:<free port>, then boots the guest with guest/selftest.sh, which
# checks the kernel version, that nvme-tcp is loaded, nvme-cli and fio run, the blob arrives
# intact through 10.0.2.2, the kernel's nvme-tcp sends a well-formed ICReq to a host listener
# (nvme discover), and fio verify=crc32c on tmpfs. Exit 0 only if every check passed (and the host saw the download).
#
# usage: selftest.sh [TIMEOUT_S]     (default 600; environment as for run-guest.sh)
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
TIMEOUT_S="${1:-600}"

"$QEMU_DIR/setup.sh"
KVER="$(sed -n 's/^kernel=//p' "$BUILD_INFO")"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/nvseal-selftest.XXXXXX")"
HTTP_PID=""
ICREQ_PID=""
cleanup() {
    for p in $HTTP_PID $ICREQ_PID; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

mkdir "$WORK/www"
head -c 1048576 /dev/urandom >"$WORK/www/blob"
BLOB_SHA256="$(sha256sum "$WORK/www/blob" | cut -d' ' -f1)"
HTTP_PORT="$(free_port)"
python3 -m http.server --bind 127.0.0.1 --directory "$WORK/www" "$HTTP_PORT" \
    >"$WORK/http.log" 2>&1 &
HTTP_PID=$!
for _ in $(seq 50); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $HTTP_PORT), 1)" \
        2>/dev/null && break
    sleep 0.1
done
# One-shot listener standing in for an NVMe/TCP target: it records the first 8 bytes of
# what the guest kernel's nvme-tcp sends (the ICReq common header) and hangs up.
ICREQ_PORT="$(free_port)"
python3 - "$ICREQ_PORT" "$WORK/icreq.hex" <<'PY' &
import socket, sys
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
srv.settimeout(600)
conn, _ = srv.accept()
conn.settimeout(60)
got = b""
while len(got) < 8:
    chunk = conn.recv(8 - len(got))
    if not chunk:
        break
    got += chunk
conn.close()
open(sys.argv[2], "w").write(got.hex())
PY
ICREQ_PID=$!

{
    echo "EXPECT_KVER='$KVER' HTTP_PORT=$HTTP_PORT BLOB_SHA256=$BLOB_SHA256 ICREQ_PORT=$ICREQ_PORT"
    cat "$QEMU_DIR/guest/selftest.sh"
} >"$WORK/guest.sh"

rc=0
"$QEMU_DIR/run-guest.sh" "$WORK/guest.sh" "$TIMEOUT_S" || rc=$?

host_ok=1
if ! grep -q '"GET /blob HTTP/1.1" 200' "$WORK/http.log"; then
    log "host http server never served /blob: $(cat "$WORK/http.log")"
    host_ok=0
fi
# ICReq: PDU type 0x00, flags 0, HLEN 128, PDO 0, PLEN 128 (little endian).
icreq="$(cat "$WORK/icreq.hex" 2>/dev/null || true)"
if [ "$icreq" != 0000800080000000 ]; then
    log "host listener did not receive an NVMe/TCP ICReq (got '${icreq}')"
    host_ok=0
fi
if [ "$rc" = 0 ] && [ "$host_ok" = 1 ]; then
    log "selftest: PASS"
    exit 0
fi
log "selftest: FAIL (run-guest.sh exit $rc)"
exit $((rc == 0 ? 1 : rc))
