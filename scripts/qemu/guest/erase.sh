# shellcheck shell=bash
# Guest half of the crypto erase test (tests/linux_initiator.rs,
# linux_initiator_crypto_erases_with_format_and_sanitize): the real Linux NVMe/TCP host and
# nvme-cli against `nvseal serve` on the host (docs/lifecycle.md §5).
# Runs as /run.sh under bash in the QEMU guest (scripts/qemu/run-guest.sh).
#
# The host prepends one line of parameters:
#   PORT       TCP port nvseal listens on (host 127.0.0.1, reached as $NVSEAL_HOST_IP)
#   HOSTNQN    the host NQN both subsystems allow
#   SUBNQN_A   subsystem with a plaintext namespace (nsid 1) and an encrypted one (nsid 2)
#   SUBNQN_B   subsystem whose only namespace (nsid 1) is encrypted (Sanitize is accepted there)
# Every step checks its result; the first failure ends the script with a non-zero code.
set -euo pipefail

HOST="${NVSEAL_HOST_IP:-10.0.2.2}"
: "${PORT:?}" "${HOSTNQN:?}" "${SUBNQN_A:?}" "${SUBNQN_B:?}"

step() { printf '\n== %s (guest uptime %s s)\n' "$*" "$(cut -d' ' -f1 /proc/uptime)"; }
fail() {
    echo "ERASE-FAIL: $*"
    exit 1
}
# run CMD...: echo the command, run it, echo its output, keep the output in $OUT; fail on error.
run() {
    echo "+ $*"
    local rc=0
    OUT="$("$@" 2>&1)" || rc=$?
    printf '%s\n' "$OUT"
    [ "$rc" = 0 ] || fail "'$*' exited $rc"
}
# must_fail CMD...: like run, but the command must fail.
must_fail() {
    echo "+ (must fail) $*"
    local rc=0
    OUT="$("$@" 2>&1)" || rc=$?
    printf '%s\n' "$OUT"
    [ "$rc" != 0 ] || fail "'$*' succeeded"
}
expect() {
    grep -Eq -- "$1" <<<"$OUT" || fail "$2: no line matching /$1/ in the output above"
}
# ctrl_of NQN: the fabrics controller (nvmeN) of subsystem NQN.
ctrl_of() {
    local c
    for c in /sys/class/nvme/nvme*; do
        [ -e "$c/subsysnqn" ] || continue
        [ "$(cat "$c/subsysnqn")" = "$1" ] && echo "${c##*/}" && return 0
    done
    return 1
}
# ns_dev NQN NSID: the block device of namespace NSID of subsystem NQN.
ns_dev() {
    local blk
    for blk in /sys/block/nvme*n*; do
        [ -e "$blk/device/subsysnqn" ] || continue
        [ "$(cat "$blk/device/subsysnqn")" = "$1" ] || continue
        [ "$(cat "$blk/nsid")" = "$2" ] && echo "${blk##*/}" && return 0
    done
    return 1
}
# byte DEV OFFSET: one byte of DEV's Identify Controller, decimal (raw binary from nvme-cli).
id_byte() { nvme id-ctrl "/dev/$1" -b | od -An -tu1 -j"$2" -N1 | tr -d ' '; }
# same A B: whether two files hold the same bytes.
same() { cmp -s "$1" "$2"; }
# rd DEV FILE: the first MiB of DEV, bypassing the page cache.
rd() { dd if="/dev/$1" of="$2" bs=1M count=1 iflag=direct status=none; }
# wr FILE DEV: FILE (1 MiB) to the start of DEV, bypassing the page cache.
wr() { dd if="$1" of="/dev/$2" bs=1M count=1 oflag=direct conv=fsync status=none; }
wait_dev() {
    local i
    for i in $(seq 1 100); do
        ns_dev "$1" "$2" >/dev/null && return 0
        sleep 0.1
    done
    fail "no block device for $1 nsid $2"
}

echo "erase: kernel $(uname -r), $(nvme version)"
head -c 1048576 /dev/urandom >/tmp/old
head -c 1048576 /dev/urandom >/tmp/plain
head -c 1048576 /dev/urandom >/tmp/new

step "connect both subsystems"
run nvme connect -t tcp -a "$HOST" -s "$PORT" -n "$SUBNQN_A" -q "$HOSTNQN"
run nvme connect -t tcp -a "$HOST" -s "$PORT" -n "$SUBNQN_B" -q "$HOSTNQN"
wait_dev "$SUBNQN_A" 1
wait_dev "$SUBNQN_A" 2
wait_dev "$SUBNQN_B" 1
CA="$(ctrl_of "$SUBNQN_A")"
CB="$(ctrl_of "$SUBNQN_B")"
PLAIN="$(ns_dev "$SUBNQN_A" 1)"
ENC="$(ns_dev "$SUBNQN_A" 2)"
SAN="$(ns_dev "$SUBNQN_B" 1)"
echo "controllers $CA $CB, namespaces plain=$PLAIN enc=$ENC san=$SAN"

step "nvme-cli reads our Identify bits"
run nvme id-ctrl "/dev/$CA"
expect '^oacs +: 0x2$' "OACS: Format NVM"
expect '^fna +: 0xc$' "FNA: crypto erase, no broadcast NSID"
expect '^sanicap +: 0$' "no Sanitize on a subsystem with a plaintext namespace"
run nvme id-ctrl "/dev/$CB"
expect '^sanicap +: 0x1$' "SANICAP: crypto erase"
[ "$(id_byte "$CA" 524)" = 12 ] || fail "raw FNA byte"
[ "$(id_byte "$CB" 328)" = 1 ] || fail "raw SANICAP byte"

step "write data on all three namespaces"
wr /tmp/plain "$PLAIN"
wr /tmp/old "$ENC"
wr /tmp/old "$SAN"
rd "$ENC" /tmp/r && same /tmp/r /tmp/old || fail "encrypted namespace does not read back"
rd "$SAN" /tmp/r && same /tmp/r /tmp/old || fail "subsystem B namespace does not read back"

step "format -s 2 of the plaintext namespace is refused, nothing changes"
must_fail nvme format "/dev/$PLAIN" -s 2 --force
expect 'INVALID_FIELD|Invalid Field' "the refusal is Invalid Field in Command"
rd "$PLAIN" /tmp/r && same /tmp/r /tmp/plain || fail "plaintext namespace changed"

step "nvme format -s 2 of the encrypted namespace"
run nvme format "/dev/$ENC" -s 2 --force
rd "$ENC" /tmp/r
same /tmp/r /tmp/old && fail "data written before the format still reads back"
wr /tmp/new "$ENC"
rd "$ENC" /tmp/r && same /tmp/r /tmp/new || fail "a write after the format does not read back"
rd "$PLAIN" /tmp/r && same /tmp/r /tmp/plain || fail "the other namespace lost its data"
echo "format: old data gone, new data reads back, nsid 1 intact"

step "sanitize on subsystem A (plaintext inside) is refused"
must_fail nvme sanitize "/dev/$CA" -a 4
run nvme sanitize-log "/dev/$CA"

step "nvme sanitize -a 4 on subsystem B, then sanitize-log"
run nvme sanitize "/dev/$CB" -a 4
done_=0
for i in $(seq 1 200); do
    read -r sprog sstat <<<"$(nvme sanitize-log "/dev/$CB" -b | od -An -tu2 -N4)"
    if [ "$((sstat & 7))" != 2 ]; then
        done_=1
        break
    fi
    sleep 0.1
done
[ "$done_" = 1 ] || fail "sanitize still in progress after 20 s"
run nvme sanitize-log "/dev/$CB"
[ "$sprog" = 65535 ] || fail "SPROG $sprog after the sanitize, want 65535"
[ "$((sstat & 7))" = 1 ] || fail "SSTAT $sstat after the sanitize, want 1 (completed)"
rd "$SAN" /tmp/r
same /tmp/r /tmp/old && fail "data written before the sanitize still reads back"
wr /tmp/new "$SAN"
rd "$SAN" /tmp/r && same /tmp/r /tmp/new || fail "a write after the sanitize does not read back"
rd "$PLAIN" /tmp/r && same /tmp/r /tmp/plain || fail "subsystem A's plaintext namespace changed"
rd "$ENC" /tmp/r && same /tmp/r /tmp/new || fail "subsystem A's encrypted namespace changed"

step "disconnect"
run nvme disconnect -n "$SUBNQN_A"
run nvme disconnect -n "$SUBNQN_B"
echo "ERASE-PASS"
