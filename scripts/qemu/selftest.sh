#!/usr/bin/env bash
# Self-test of the QEMU/TCG Linux-initiator harness, without nvseal.
#
# Host side: makes sure setup.sh has run, serves a random 1 MiB blob with python3's
# http.server on 127.0.0.1:<free port>, then boots the guest with guest/selftest.sh, which
# checks the kernel version, that nvme-tcp is loaded, nvme-cli and fio run, the blob arrives
# intact through 10.0.2.2, nvme-tcp's socket to the host works (refused port), and fio
# verify=crc32c on tmpfs. Exit 0 only if every check passed (and the host saw the download).
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
cleanup() {
    [ -n "$HTTP_PID" ] && kill "$HTTP_PID" 2>/dev/null
    wait 2>/dev/null
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
# A port that was free a moment ago and has no listener: the guest expects "refused".
CLOSED_PORT="$(free_port)"

{
    echo "EXPECT_KVER='$KVER' HTTP_PORT=$HTTP_PORT BLOB_SHA256=$BLOB_SHA256 CLOSED_PORT=$CLOSED_PORT"
    cat "$QEMU_DIR/guest/selftest.sh"
} >"$WORK/guest.sh"

rc=0
"$QEMU_DIR/run-guest.sh" "$WORK/guest.sh" "$TIMEOUT_S" || rc=$?

host_ok=1
grep -q '"GET /blob HTTP/1.1" 200' "$WORK/http.log" || host_ok=0
if [ "$rc" = 0 ] && [ "$host_ok" = 1 ]; then
    log "selftest: PASS"
    exit 0
fi
[ "$host_ok" = 1 ] || log "host http server never served /blob: $(cat "$WORK/http.log")"
log "selftest: FAIL (run-guest.sh exit $rc)"
exit $((rc == 0 ? 1 : rc))
