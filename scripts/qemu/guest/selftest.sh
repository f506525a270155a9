#!/bin/bash
# Guest half of scripts/qemu/selftest.sh: runs as /run.sh inside the QEMU guest.
# The host prepends: EXPECT_KVER, HTTP_PORT, BLOB_SHA256, ICREQ_PORT.
# Prints PASS/FAIL per check and exits with the number of failed checks.
set -u
passed=0
failed=0
check() {
    local name="$1"
    shift
    if "$@"; then
        echo "PASS $name"
        passed=$((passed + 1))
    else
        echo "FAIL $name"
        failed=$((failed + 1))
    fi
}

# (a) the Debian kernel setup.sh downloaded is the one running.
kver_ok() { echo "uname -r: $(uname -r)"; [ "$(uname -r)" = "$EXPECT_KVER" ]; }
check kernel-version kver_ok

# (b) NVMe/TCP initiator loaded by /init, with its dependency chain and the fabrics device.
modules_ok() {
    local m
    for m in nvme_tcp nvme_fabrics nvme_core t10_pi; do
        [ -d "/sys/module/$m" ] || { echo "missing /sys/module/$m"; return 1; }
    done
    [ -c /dev/nvme-fabrics ] || { echo "missing /dev/nvme-fabrics"; return 1; }
}
check nvme-tcp-loaded modules_ok

# (c) user-space tools run (dynamic libraries all present).
nvme_ok() { local v; v="$(nvme version)" && echo "$v" && [[ "$v" == "nvme version "* ]]; }
check nvme-cli nvme_ok
fio_ok() { local v; v="$(fio --version)" && echo "$v" && [[ "$v" == fio-3* ]]; }
check fio-version fio_ok

# (d) the host's 127.0.0.1 is reachable as 10.0.2.2: fetch a random blob the host serves.
wget_ok() {
    # busybox 1.35 (Debian 12 static) segfaults on wget -T; bound it with timeout(1).
    timeout 60 busybox wget -q -O /tmp/blob "http://$NVSEAL_HOST_IP:$HTTP_PORT/blob" || return 1
    local got
    got="$(sha256sum /tmp/blob | cut -d' ' -f1)"
    echo "blob sha256 $got (want $BLOB_SHA256)"
    [ "$got" = "$BLOB_SHA256" ]
}
check host-tcp-via-10.0.2.2 wget_ok

# (d') the kernel initiator's own socket reaches the host: the host listens on ICREQ_PORT,
# records the first bytes it receives (the NVMe/TCP ICReq PDU) and closes. The discover must
# fail (no ICResp), but must not hang; the host side checks the recorded PDU header.
icreq_ok() {
    local out rc
    out="$(timeout 60 nvme discover -t tcp -a "$NVSEAL_HOST_IP" -s "$ICREQ_PORT" 2>&1)"
    rc=$?
    echo "nvme discover rc=$rc: $out"
    [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ]
}
check nvme-tcp-icreq-to-host icreq_ok

# (e) fio writes and verifies (crc32c) a file in tmpfs.
fio_verify_ok() {
    fio --name=selftest --filename=/tmp/fio.dat --size=16M --bs=4k --rw=randwrite \
        --ioengine=psync --verify=crc32c --do_verify=1 --verify_fatal=1 \
        --output-format=json >/tmp/fio.json || { cat /tmp/fio.json; return 1; }
    # fio exits non-zero on a verify mismatch; also make sure it wrote the whole file and
    # read all of it back for verification (JSON order: "read" section, then "write").
    local r w
    r="$(sed -n 's/.*"io_bytes" : \([0-9]*\).*/\1/p' /tmp/fio.json | sed -n 1p)"
    w="$(sed -n 's/.*"io_bytes" : \([0-9]*\).*/\1/p' /tmp/fio.json | sed -n 2p)"
    echo "fio wrote ${w:-?} bytes, verified ${r:-?} bytes"
    [ "${w:-0}" -eq $((16 * 1024 * 1024)) ] && [ "${r:-0}" -eq $((16 * 1024 * 1024)) ]
}
check fio-verify-crc32c fio_verify_ok

# (f) the whole initiator path inside the guest: the kernel's own NVMe/TCP target (nvmet)
# on 127.0.0.1 exporting a 64 MiB RAM disk; nvme connect, then fio with libaio/O_DIRECT and
# crc32c verify on the resulting /dev/nvmeXnY, then disconnect.
LOOP_NQN=nqn.2026-11.io.nvseal:selftest-loop
loop_target_ok() {
    local cfg=/sys/kernel/config/nvmet sub blk dev=""
    modprobe nvmet-tcp && modprobe brd rd_nr=1 rd_size=65536 || return 1
    grep -q ' /sys/kernel/config ' /proc/mounts ||
        mount -t configfs configfs /sys/kernel/config || return 1
    sub="$cfg/subsystems/$LOOP_NQN"
    mkdir "$sub" && echo 1 >"$sub/attr_allow_any_host" &&
        mkdir "$sub/namespaces/1" && echo /dev/ram0 >"$sub/namespaces/1/device_path" &&
        echo 1 >"$sub/namespaces/1/enable" && mkdir "$cfg/ports/1" &&
        echo tcp >"$cfg/ports/1/addr_trtype" && echo ipv4 >"$cfg/ports/1/addr_adrfam" &&
        echo 127.0.0.1 >"$cfg/ports/1/addr_traddr" && echo 4420 >"$cfg/ports/1/addr_trsvcid" &&
        ln -s "$sub" "$cfg/ports/1/subsystems/" || return 1
    nvme discover -t tcp -a 127.0.0.1 -s 4420 | grep -E 'subnqn|traddr'
    nvme connect -t tcp -a 127.0.0.1 -s 4420 -n "$LOOP_NQN" || return 1
    # The namespace's block device is the one whose device (controller, or subsystem when
    # native multipath is on, as in Debian) carries our subsystem NQN.
    for _ in $(seq 100); do
        for blk in /sys/block/nvme*n*; do
            [ "$(cat "$blk/device/subsysnqn" 2>/dev/null)" = "$LOOP_NQN" ] || continue
            dev="/dev/$(basename "$blk")"
            [ -b "$dev" ] && break 2
        done
        sleep 0.1
    done
    [ -n "$dev" ] && [ -b "$dev" ] || { echo "no namespace block device appeared"; return 1; }
    echo "connected: $dev ($(cat "/sys/block/$(basename "$dev")/size") sectors)"
    fio --name=loop --filename="$dev" --ioengine=libaio --direct=1 --iodepth=8 \
        --rw=randwrite --bs=4k --size=32M --verify=crc32c --do_verify=1 --verify_fatal=1 \
        --output-format=terse >/tmp/fio-loop.txt || { cat /tmp/fio-loop.txt; return 1; }
    nvme disconnect -n "$LOOP_NQN"
}
check kernel-target-loopback-connect-fio loop_target_ok

echo "guest: $passed passed, $failed failed"
exit "$failed"
