#!/usr/bin/env bash
# Boot the nvseal test guest under QEMU/TCG and run one script in it.
#
# usage: run-guest.sh SCRIPT [TIMEOUT_S]
#
# SCRIPT (host path) becomes /run.sh in the guest and runs under bash after eth0 is up and
# nvme-tcp is loaded. The host's 127.0.0.1 is 10.0.2.2 from the guest ($NVSEAL_HOST_IP).
# Exit status: the guest script's exit code; 124 on timeout (QEMU is killed); 125 if QEMU
# stopped without the end marker (kernel panic, /init failure); 126 for harness errors.
#
# Environment (all optional):
#   NVSEAL_QEMU_CACHE    cache dir holding vmlinuz + initramfs (see setup.sh)
#   NVSEAL_QEMU_LOG      console log path (default: $NVSEAL_QEMU_CACHE/logs/run-<time>-<pid>.log)
#   NVSEAL_QEMU_PAYLOAD  directory copied into the guest as /payload (job files, data)
#   NVSEAL_QEMU_MEM_MB   guest memory (default 1024)
#   NVSEAL_QEMU_SMP      guest CPUs (default 2; TCG runs one host thread per vCPU)
#   NVSEAL_QEMU_NET      user (QEMU's built-in slirp, default) or passt
#   NVSEAL_QEMU_ECHO     1 (default) copies the console to stdout while it runs, 0 does not
#   NVSEAL_QEMU_CPU      QEMU -cpu model (default max: pclmul/sse4.2 for the crc drivers)
#   NVSEAL_QEMU_APPEND   extra kernel command line words (e.g. "loglevel=7" instead of quiet)
#   NVSEAL_QEMU_HOSTFWD  "HOSTPORT:GUESTPORT ..." TCP ports of the host's 127.0.0.1 forwarded to
#                        the guest (to reach a target running in the guest from the host)
#   NVSEAL_QEMU_DISKS    "SERIAL=PATH ..." host files attached read-only as virtio-blk disks
#                        (QEMU reads them through the host page cache, so it sees what another
#                        process wrote to them while the guest runs). The guest loads virtio_blk
#                        and finds each disk by /sys/block/vd*/serial. SERIAL: 1-20 characters
#                        [A-Za-z0-9_-]; PATH: no whitespace or commas.
#   NVSEAL_QEMU_NVME     "SERIAL=PATH ..." host files attached read-write as emulated NVMe SSDs
#                        (QEMU's `nvme` PCI device, 1b36:0010, 512-byte blocks, device id
#                        nvme-SERIAL; same SERIAL and PATH rules). No guest driver is loaded
#                        for them: a guest script binds them (e.g. to uio_pci_generic for
#                        SPDK's user-space driver).
#   NVSEAL_QEMU_MONITOR  path of a Unix socket for QEMU's human monitor (e.g. to hot-remove a
#                        device with `device_del nvme-SERIAL`); none by default
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

usage() { echo "usage: $0 SCRIPT [TIMEOUT_S]" >&2; exit 126; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
SCRIPT="$1"
TIMEOUT_S="${2:-600}"
[ -f "$SCRIPT" ] || { log "no such script: $SCRIPT"; exit 126; }
[[ "$TIMEOUT_S" =~ ^[0-9]+$ ]] || usage
for f in "$KERNEL_IMG" "$INITRAMFS_IMG"; do
    [ -s "$f" ] || { log "$f missing: run scripts/qemu/setup.sh first"; exit 126; }
done
QEMU_BIN="$(command -v qemu-system-x86_64)" || { log "qemu-system-x86_64 missing: run setup.sh"; exit 126; }

MEM_MB="${NVSEAL_QEMU_MEM_MB:-1024}"
SMP="${NVSEAL_QEMU_SMP:-2}"
NET="${NVSEAL_QEMU_NET:-user}"
CPU="${NVSEAL_QEMU_CPU:-max}"
ECHO="${NVSEAL_QEMU_ECHO:-1}"
LOG="${NVSEAL_QEMU_LOG:-$NVSEAL_QEMU_CACHE/logs/run-$(date -u +%Y%m%dT%H%M%S)-$$.log}"
mkdir -p "$(dirname "$LOG")"
: >"$LOG"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/nvseal-qemu.XXXXXX")"
QEMU_PID=""
PASST_PID=""
cleanup() {
    for p in $QEMU_PID $PASST_PID; do kill "$p" 2>/dev/null || true; done
    # tail --pid ends by itself within a second of QEMU, after copying the last lines.
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Per-run initramfs: the shared (compressed) image, zero padding to a 4-byte boundary (the
# kernel only looks for a cpio header at aligned offsets), then an uncompressed cpio holding
# /run.sh and /payload. The kernel unpacks both into the same rootfs.
mkdir -p "$WORK/extra"
install -m 0755 "$SCRIPT" "$WORK/extra/run.sh"
if [ -n "${NVSEAL_QEMU_PAYLOAD:-}" ]; then
    [ -d "$NVSEAL_QEMU_PAYLOAD" ] || { log "NVSEAL_QEMU_PAYLOAD is not a directory"; exit 126; }
    cp -a "$NVSEAL_QEMU_PAYLOAD" "$WORK/extra/payload"
fi
cp "$INITRAMFS_IMG" "$WORK/initrd"
pad=$(((4 - $(stat -c %s "$WORK/initrd") % 4) % 4))
head -c "$pad" /dev/zero >>"$WORK/initrd"
(cd "$WORK/extra" && find . -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc --owner=0:0 --quiet) >>"$WORK/initrd"

# Host-to-guest forwards, bound on the host's loopback only.
FWD_USER=""
FWD_PASST=()
for f in ${NVSEAL_QEMU_HOSTFWD:-}; do
    [[ "$f" =~ ^([0-9]+):([0-9]+)$ ]] || { log "NVSEAL_QEMU_HOSTFWD: '$f' is not HOSTPORT:GUESTPORT"; exit 126; }
    FWD_USER+=",hostfwd=tcp:127.0.0.1:${BASH_REMATCH[1]}-:${BASH_REMATCH[2]}"
    FWD_PASST+=(-t "127.0.0.1/${BASH_REMATCH[1]}:${BASH_REMATCH[2]}")
done

# Read-only virtio disks.
DISKS=()
i=0
for d in ${NVSEAL_QEMU_DISKS:-}; do
    [[ "$d" =~ ^([A-Za-z0-9_-]{1,20})=([^,]+)$ ]] || { log "NVSEAL_QEMU_DISKS: '$d' is not SERIAL=PATH (see the usage)"; exit 126; }
    [ -f "${BASH_REMATCH[2]}" ] || { log "NVSEAL_QEMU_DISKS: ${BASH_REMATCH[2]} is not a regular file"; exit 126; }
    DISKS+=(-blockdev "driver=file,node-name=disk$i,filename=${BASH_REMATCH[2]},read-only=on"
        -device "virtio-blk-pci,drive=disk$i,serial=${BASH_REMATCH[1]}")
    i=$((i + 1))
done

# Read-write emulated NVMe SSDs.
for d in ${NVSEAL_QEMU_NVME:-}; do
    [[ "$d" =~ ^([A-Za-z0-9_-]{1,20})=([^,]+)$ ]] || { log "NVSEAL_QEMU_NVME: '$d' is not SERIAL=PATH (see the usage)"; exit 126; }
    [ -f "${BASH_REMATCH[2]}" ] || { log "NVSEAL_QEMU_NVME: ${BASH_REMATCH[2]} is not a regular file"; exit 126; }
    DISKS+=(-blockdev "driver=file,node-name=disk$i,filename=${BASH_REMATCH[2]}"
        -device "nvme,id=nvme-${BASH_REMATCH[1]},drive=disk$i,serial=${BASH_REMATCH[1]}")
    i=$((i + 1))
done

case "$NET" in
    user)
        # slirp: guest 10.0.2.15, gateway/host alias 10.0.2.2 -> host 127.0.0.1.
        NETDEV=(-netdev "user,id=n0,net=10.0.2.0/24,host=10.0.2.2$FWD_USER")
        ;;
    passt)
        command -v passt >/dev/null || { log "passt missing: run setup.sh"; exit 126; }
        # passt with slirp's addressing: connections to the gateway 10.0.2.2 are mapped to
        # the host's loopback (passt's default --map-gw behaviour).
        # Started as root, passt switches to nobody before it binds its socket, so the
        # socket lives in a directory nobody can write (and the run dir must be searchable).
        chmod 711 "$WORK"
        mkdir "$WORK/passt"
        [ "$(id -u)" = 0 ] && chown nobody "$WORK/passt"
        passt -f -1 -q -4 -s "$WORK/passt/sock" \
            -a 10.0.2.15 -n 24 -g 10.0.2.2 "${FWD_PASST[@]}" </dev/null >"$WORK/passt.log" 2>&1 &
        PASST_PID=$!
        for _ in $(seq 50); do [ -S "$WORK/passt/sock" ] && break; sleep 0.1; done
        [ -S "$WORK/passt/sock" ] || { log "passt did not start: $(grep -v syslog "$WORK/passt.log")"; exit 126; }
        NETDEV=(-netdev "stream,id=n0,server=off,addr.type=unix,addr.path=$WORK/passt/sock")
        ;;
    *) log "NVSEAL_QEMU_NET must be user or passt"; exit 126 ;;
esac

MONITOR=(-monitor none)
if [ -n "${NVSEAL_QEMU_MONITOR:-}" ]; then
    [[ "$NVSEAL_QEMU_MONITOR" =~ ^[^,[:space:]]+$ ]] || { log "NVSEAL_QEMU_MONITOR: no whitespace or commas"; exit 126; }
    MONITOR=(-monitor "unix:$NVSEAL_QEMU_MONITOR,server=on,wait=off")
fi

t0=$(date +%s.%N)
"$QEMU_BIN" -nodefaults -machine pc,accel=tcg -cpu "$CPU" -smp "$SMP" -m "$MEM_MB" \
    -display none "${MONITOR[@]}" -serial "file:$LOG" -no-reboot \
    -kernel "$KERNEL_IMG" -initrd "$WORK/initrd" \
    -append "console=ttyS0 quiet panic=-1 nvseal.ip=10.0.2.15/24 nvseal.gw=10.0.2.2 ${NVSEAL_QEMU_APPEND:-}" \
    "${NETDEV[@]}" -device virtio-net-pci,netdev=n0 "${DISKS[@]}" \
    </dev/null >"$WORK/qemu.out" 2>&1 &
QEMU_PID=$!
if [ "$ECHO" = 1 ]; then
    tail -n +1 -f --pid="$QEMU_PID" "$LOG" &
fi

# Wait for the end marker, QEMU's exit, or the timeout.
status=""
t_begin=""
deadline=$(($(date +%s) + TIMEOUT_S))
while :; do
    if [ -z "$t_begin" ] && grep -q "^$MARK_BEGIN" "$LOG"; then
        t_begin=$(date +%s.%N)
    fi
    if grep -q "^$MARK_END rc=" "$LOG"; then
        status=end
        break
    fi
    if ! kill -0 "$QEMU_PID" 2>/dev/null; then
        # QEMU may have exited right after writing the marker: look once more.
        grep -q "^$MARK_END rc=" "$LOG" && status=end || status=died
        break
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
        status=timeout
        break
    fi
    sleep 0.2
done
t_end=$(date +%s.%N)

if [ "$status" = end ]; then
    # /init powers off right after the marker; give it a moment, then make sure.
    for _ in $(seq 50); do kill -0 "$QEMU_PID" 2>/dev/null || break; sleep 0.1; done
fi
kill "$QEMU_PID" 2>/dev/null || true
wait "$QEMU_PID" 2>/dev/null || true
QEMU_PID=""

elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
guest_begin="$(sed -n "s/^$MARK_BEGIN uptime_s=\([0-9.]*\).*/\1/p" "$LOG" | head -1)"
timing="total $(elapsed "$t0" "$t_end")s"
[ -n "$t_begin" ] && timing="boot-to-script $(elapsed "$t0" "$t_begin")s (guest uptime ${guest_begin:-?}s), $timing"

case "$status" in
    end)
        rc="$(sed -n "s/^$MARK_END rc=\([0-9]*\).*/\1/p" "$LOG" | head -1)"
        log "guest script exited $rc; $timing; console log $LOG"
        exit "$rc"
        ;;
    timeout)
        log "TIMEOUT after ${TIMEOUT_S}s, QEMU killed; $timing; console log $LOG"
        exit 124
        ;;
    *)
        log "QEMU exited without $MARK_END; $timing; console log $LOG"
        [ -s "$WORK/qemu.out" ] && log "qemu: $(cat "$WORK/qemu.out")"
        exit 125
        ;;
esac
