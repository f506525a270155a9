# shellcheck shell=bash
# Guest half of the Linux-initiator interop test (tests/linux_initiator.rs): the real Linux
# NVMe/TCP host (Debian's nvme-tcp driver, nvme-cli, fio) against `nvseal serve` on the host.
# Runs as /run.sh under bash in the QEMU guest (scripts/qemu/run-guest.sh).
#
# The host prepends one line of parameters:
#   PORT       TCP port nvseal listens on (host 127.0.0.1, reached as $NVSEAL_HOST_IP)
#   SUBNQN     subsystem NQN; SERIAL, MODEL, NN: what Identify Controller must report
#   HOSTNQN    the host NQN the subsystem allows (unique per run); DENIED_HOSTNQN: one it does not
#   NS_BLOCKS  "nsid:blocks ..." for every namespace, 4 KiB blocks
#   PATTERN    fio verify_pattern (an ASCII word); the host looks for it in the backing file
#   FIO_JOBS   "bs:rw:offset:size ..." run on every namespace, each fio writes then verifies
#   FIO_JOBS_DIGEST  the same, run in a second session with header and data digests on
#   FIO_CONCURRENT   one "bs:rw:offset:size" job run on all namespaces at once in that session,
#              the jobs pinned to different CPUs so several I/O queues carry traffic together
#   CRYPT_NS   "nsid:block_size:sectors:serial ..." encrypted namespaces for the dm-crypt check of
#              docs/on-disk-format.md §6 (sectors: 512-byte sectors of data); each one's backing
#              file is attached read-only as the virtio disk with that serial, and
#              /payload/ns<nsid>/ holds pattern.bin (exactly the data size) and dek.bin
#   CRYPT_OPEN_<block_size>  the document's `cryptsetup open --type plain` line for that sector
#              size, verbatim, with its placeholders <SECTORS> and /dev/DEVICE
# Every step checks its result; the first failure ends the script with a non-zero code.
set -euo pipefail

HOST="${NVSEAL_HOST_IP:-10.0.2.2}"
: "${PORT:?}" "${NN:?}" "${SUBNQN:?}" "${SERIAL:?}" "${MODEL:?}" "${HOSTNQN:?}" "${DENIED_HOSTNQN:?}"
: "${NS_BLOCKS:?}" "${PATTERN:?}" "${FIO_JOBS:?}" "${FIO_JOBS_DIGEST:?}"
: "${FIO_CONCURRENT:?}" "${CRYPT_NS:?}"

step() { printf '\n== %s (guest uptime %s s)\n' "$*" "$(cut -d' ' -f1 /proc/uptime)"; }
fail() {
    echo "INTEROP-FAIL: $*"
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
# expect REGEX WHAT: $OUT (from the last run) must have a line matching the extended regex.
expect() {
    grep -Eq -- "$1" <<<"$OUT" || fail "$2: no line matching /$1/ in the output above"
}
# ctrl_of NQN: the fabrics controllers (nvmeN) whose subsystem NQN is NQN.
ctrls_of() {
    local c
    for c in /sys/class/nvme/nvme*; do
        [ -e "$c/subsysnqn" ] || continue
        [ "$(cat "$c/subsysnqn")" = "$1" ] && echo "${c##*/}"
    done
    return 0
}
# ns_dev NSID: the block device of namespace NSID of $SUBNQN. With native multipath (Debian)
# the device is the subsystem's head node nvme<subsys>n<x> and its `device` is the
# nvme-subsystem object; both it and a plain controller expose subsysnqn.
ns_dev() {
    local blk
    for blk in /sys/block/nvme*n*; do
        [ -e "$blk/device/subsysnqn" ] || continue
        [ "$(cat "$blk/device/subsysnqn")" = "$SUBNQN" ] || continue
        [ "$(cat "$blk/nsid")" = "$1" ] && echo "${blk##*/}" && return 0
    done
    return 1
}

echo "interop: kernel $(uname -r), $(nvme version), $(fio --version)"
echo "interop: target $HOST:$PORT $SUBNQN, hostnqn $HOSTNQN"

step "discover"
run nvme discover -t tcp -a "$HOST" -s "$PORT" -q "$HOSTNQN"
expect "^subnqn: +$SUBNQN\$" "discovery log lists the subsystem"
expect "^trtype: +tcp\$" "discovery entry is TCP"
expect "^trsvcid: +$PORT\$" "discovery entry has the port"
expect "^adrfam: +ipv4\$" "discovery entry is IPv4"
# The log page shows the address nvseal listens on (127.0.0.1 = the guest itself); we
# connect to $HOST below, as docs/linux-initiator.md explains.
expect "^traddr: +127\.0\.0\.1\$" "discovery entry has the listen address"

step "discover and connect as a host the subsystem does not allow"
echo "+ nvme discover ... -q $DENIED_HOSTNQN"
OUT="$(nvme discover -t tcp -a "$HOST" -s "$PORT" -q "$DENIED_HOSTNQN" 2>&1)" || true
printf '%s\n' "$OUT"
if grep -q "$SUBNQN" <<<"$OUT"; then fail "discovery log shows the subsystem to a denied host"; fi
echo "+ nvme connect ... -q $DENIED_HOSTNQN (must fail)"
if OUT="$(nvme connect -t tcp -a "$HOST" -s "$PORT" -n "$SUBNQN" -q "$DENIED_HOSTNQN" 2>&1)"; then
    printf '%s\n' "$OUT"
    fail "connect with a host NQN not in allowed_hosts succeeded"
fi
printf '%s\n' "$OUT"
[ -z "$(ctrls_of "$SUBNQN")" ] || fail "a controller exists after the refused connect"

# connect_ns [EXTRA nvme connect ARGS...]: connect to $SUBNQN as $HOSTNQN, wait for every
# namespace's block device (DEV[nsid]) and check the controller ($CTRL) in sysfs.
declare -A DEV=()
nsids=()
for nb in $NS_BLOCKS; do nsids+=("${nb%%:*}"); done
# Every namespace connect_ns waits for: the fio ones and the cryptsetup ones.
all_nsids=("${nsids[@]}")
for cn in $CRYPT_NS; do all_nsids+=("${cn%%:*}"); done
connect_ns() {
    local n d all c
    run nvme connect -t tcp -a "$HOST" -s "$PORT" -n "$SUBNQN" -q "$HOSTNQN" "$@"
    DEV=()
    for _ in $(seq 200); do
        all=1
        for n in "${all_nsids[@]}"; do
            d="$(ns_dev "$n")" && [ -b "/dev/$d" ] && DEV[$n]="$d" || all=0
        done
        [ "$all" = 1 ] && break
        sleep 0.1
    done
    for n in "${all_nsids[@]}"; do [ -n "${DEV[$n]:-}" ] || fail "no block device for nsid $n"; done
    # (No process substitution: the guest has no /dev/fd.)
    read -ra ctrls <<<"$(ctrls_of "$SUBNQN" | tr '\n' ' ')"
    [ "${#ctrls[@]}" = 1 ] || fail "expected one controller for $SUBNQN, got '${ctrls[*]}'"
    CTRL="${ctrls[0]}"
    c="/sys/class/nvme/$CTRL"
    echo "controller $CTRL: transport=$(cat "$c/transport") address=$(cat "$c/address") state=$(cat "$c/state")"
    [ "$(cat "$c/transport")" = tcp ] || fail "controller transport is not tcp"
    [ "$(cat "$c/state")" = live ] || fail "controller is not live"
    grep -q "traddr=$HOST,trsvcid=$PORT" "$c/address" || fail "controller address is not $HOST:$PORT"
    [ "$(cat "$c/hostnqn")" = "$HOSTNQN" ] || fail "controller hostnqn is not $HOSTNQN"
    QUEUES="$(cat "$c/queue_count")"
    echo "queues (admin + I/O): $QUEUES"
    [ "$QUEUES" -ge 2 ] || fail "no I/O queue was connected"
    for n in "${all_nsids[@]}"; do echo "nsid $n: /dev/${DEV[$n]}"; done
}

# fio_jobs JOBS: every "bs:rw:offset:size" job on every namespace; each writes its range with
# fio's crc32c verify headers over $PATTERN, then reads it all back and verifies it.
fio_jobs() {
    local nb n d job bs rw off size
    for nb in $NS_BLOCKS; do
        n="${nb%%:*}"
        d="${DEV[$n]}"
        for job in $1; do
            IFS=: read -r bs rw off size <<<"$job"
            step "fio nsid $n /dev/$d: $rw bs=$bs offset=$off size=$size, crc32c verify"
            run timeout 300 fio --name="ns$n-$bs" --filename="/dev/$d" --ioengine=libaio \
                --direct=1 --iodepth=16 --rw="$rw" --bs="$bs" --offset="$off" --size="$size" \
                --verify=crc32c --verify_pattern="\"$PATTERN\"" --do_verify=1 --verify_fatal=1 \
                --randrepeat=0 --group_reporting
            expect "err= 0" "fio reports no error"
            expect "^ +WRITE: bw=" "fio wrote"
            expect "^ +READ: bw=" "fio read back (verify)"
            if grep -Eq "verify: bad|crc32c: verify failed|bad magic" <<<"$OUT"; then
                fail "fio verify failure"
            fi
        done
    done
}

# fio_concurrent JOB: one fio process, one job per namespace, all running together, job i
# pinned to CPU i mod ncpus (the kernel maps each CPU to its own I/O queue); each verifies.
fio_concurrent() {
    local bs rw off size n i=0 ncpu
    local -a jobs=()
    IFS=: read -r bs rw off size <<<"$1"
    ncpu="$(grep -c '^processor' /proc/cpuinfo)"
    for n in "${nsids[@]}"; do
        jobs+=(--name="ns$n-cpu$i" --filename="/dev/${DEV[$n]}" --cpus_allowed="$i")
        i=$(((i + 1) % ncpu))
    done
    step "fio on ${#nsids[@]} namespaces at once over $ncpu CPUs: $rw bs=$bs offset=$off size=$size, crc32c verify"
    run timeout 300 fio --ioengine=libaio --direct=1 --iodepth=16 --rw="$rw" --bs="$bs" \
        --offset="$off" --size="$size" --verify=crc32c --verify_pattern="\"$PATTERN\"" \
        --do_verify=1 --verify_fatal=1 --randrepeat=0 "${jobs[@]}"
    [ "$(grep -c 'err= 0' <<<"$OUT")" = "${#nsids[@]}" ] || fail "not every fio job reports err= 0"
    expect "^ +WRITE: bw=" "fio wrote"
    expect "^ +READ: bw=" "fio read back (verify)"
    if grep -Eq "verify: bad|crc32c: verify failed|bad magic" <<<"$OUT"; then
        fail "fio verify failure"
    fi
}

# disconnect_ns: disconnect $SUBNQN; the controller and the namespace devices must go away.
disconnect_ns() {
    local n d
    run nvme disconnect -n "$SUBNQN"
    expect "disconnected 1 controller" "disconnect reports one controller"
    for _ in $(seq 100); do
        [ -z "$(ctrls_of "$SUBNQN")" ] && ! ns_dev "${nsids[0]}" >/dev/null && break
        sleep 0.1
    done
    [ -z "$(ctrls_of "$SUBNQN")" ] || fail "controller still present after disconnect"
    for n in "${all_nsids[@]}"; do
        if d="$(ns_dev "$n")"; then fail "namespace device $d still present after disconnect"; fi
    done
    run nvme list
    if grep -q "$SERIAL" <<<"$OUT"; then fail "nvme list still shows the subsystem"; fi
}

# disk_of SERIAL: the virtio disk (vdX) the host attached with that serial.
disk_of() {
    local b
    for b in /sys/block/vd*; do
        [ -e "$b/serial" ] && [ "$(cat "$b/serial")" = "$1" ] && echo "${b##*/}" && return 0
    done
    return 1
}

# crypt_check: docs/on-disk-format.md §6 against the real dm-crypt. For each CRYPT_NS namespace:
# write pattern.bin through nvseal, read it back through nvseal, then run the document's
# cryptsetup line over the namespace's backing file (a read-only virtio disk) with the DEK the
# host unwrapped, and compare the plaintext dm-crypt returns with the pattern.
crypt_check() {
    local cn n bs sectors serial d vd var cmd
    local -a argv
    run modprobe -a virtio_blk dm-crypt xts ecb aesni-intel algif_skcipher
    run cryptsetup --version
    for cn in $CRYPT_NS; do
        IFS=: read -r n bs sectors serial <<<"$cn"
        d="${DEV[$n]}"
        vd=""
        step "cryptsetup check, nsid $n /dev/$d: $bs-byte blocks, $sectors sectors"
        [ "$(cat "/sys/block/$d/queue/logical_block_size")" = "$bs" ] ||
            fail "/dev/$d block size is not $bs"
        [ "$(cat "/sys/block/$d/size")" = "$sectors" ] || fail "/dev/$d is not $sectors sectors"
        [ "$(stat -c %s "/payload/ns$n/pattern.bin")" = $((sectors * 512)) ] ||
            fail "pattern.bin of nsid $n is not the namespace's size"
        run dd if="/payload/ns$n/pattern.bin" of="/dev/$d" bs=64k oflag=direct conv=fsync
        run dd if="/dev/$d" of=/tmp/nvseal.bin bs=64k iflag=direct
        cmp "/payload/ns$n/pattern.bin" /tmp/nvseal.bin || fail "nsid $n reads back other data"
        for _ in $(seq 50); do vd="$(disk_of "$serial")" && [ -b "/dev/$vd" ] && break; sleep 0.1; done
        [ -n "$vd" ] && [ -b "/dev/$vd" ] || fail "no virtio disk with serial $serial"
        [ "$(cat "/sys/block/$vd/size")" = $((2048 + sectors)) ] ||
            fail "/dev/$vd is not the 1 MiB header plus the data"
        var="CRYPT_OPEN_$bs"
        cmd="${!var:-}"
        [ -n "$cmd" ] || fail "no documented cryptsetup line for --sector-size $bs ($var)"
        [[ "$cmd" == *"<SECTORS>"* && "$cmd" == *"/dev/DEVICE"* ]] ||
            fail "the documented line lacks its placeholders: $cmd"
        cmd="${cmd//<SECTORS>/$sectors}"
        cmd="${cmd//\/dev\/DEVICE//dev/$vd}"
        read -ra argv <<<"$cmd"
        cd "/payload/ns$n"
        run "${argv[@]}"
        cd /root
        run cryptsetup status nvseal-ns
        expect "^ +sector size: +$bs\$" "dm-crypt uses $bs-byte sectors"
        run dd if=/dev/mapper/nvseal-ns of=/tmp/plain.bin bs=64k iflag=direct
        cmp "/payload/ns$n/pattern.bin" /tmp/plain.bin ||
            fail "dm-crypt with the documented line does not give nsid $n's plaintext"
        run cryptsetup close nvseal-ns
        rm -f /tmp/nvseal.bin /tmp/plain.bin
        if [ "$bs" = 512 ]; then
            # The document says cryptsetup refuses --iv-large-sectors with 512-byte sectors.
            echo "+ ${argv[*]} --iv-large-sectors (must be refused)"
            cd "/payload/ns$n"
            if OUT="$("${argv[@]}" --iv-large-sectors 2>&1)"; then
                cryptsetup close nvseal-ns || true
                fail "cryptsetup accepted --iv-large-sectors with --sector-size 512"
            fi
            cd /root
            printf '%s\n' "$OUT" | tail -1
            expect "Large IV sectors option is supported only .* sector size larger than 512" \
                "cryptsetup refuses --iv-large-sectors with 512-byte sectors"
        fi
    done
}

step "connect"
connect_ns

step "nvme list"
run nvme list
for n in "${nsids[@]}"; do
    expect "^/dev/${DEV[$n]} .*$SERIAL .*$MODEL .* 4 KiB " \
        "nvme list shows /dev/${DEV[$n]} with serial, model and 4 KiB format"
done

step "nvme id-ctrl /dev/$CTRL"
run nvme id-ctrl "/dev/$CTRL"
expect "^sn +: $SERIAL *\$" "id-ctrl serial"
expect "^mn +: $MODEL *\$" "id-ctrl model"
expect "^subnqn +: $SUBNQN *\$" "id-ctrl subnqn"
expect "^cntrltype +: 1" "id-ctrl controller type (I/O controller)"
expect "^nn +: $NN\$" "id-ctrl number of namespaces (nvmf.max_namespaces)"
expect "^ctratt +: (0x)?0*1\$" "id-ctrl CTRATT = 128-bit host identifier (fabrics)"

step "mandatory log page and features (what spdk_nvme_identify asks too)"
run nvme fw-log "/dev/$CTRL"
for f in 1 2 4 5 7; do
    run nvme get-feature "/dev/$CTRL" -f "$f"
done

for nb in $NS_BLOCKS; do
    n="${nb%%:*}"
    blocks="${nb#*:}"
    d="${DEV[$n]}"
    step "nvme id-ns /dev/$d (nsid $n, expect $blocks blocks of 4 KiB)"
    run nvme id-ns "/dev/$d"
    nsze="$(printf '%#x' "$blocks")"
    expect "^nsze +: $nsze\$" "id-ns nsze"
    expect "^ncap +: $nsze\$" "id-ns ncap"
    expect "^lbaf +0 +: ms:0 +lbads:12 .*in use" "id-ns LBA format 0 = 4096 B, in use"
    expect "^flbas +: 0(x0)?\$" "id-ns formatted LBA size index 0"
    echo "sysfs: size=$(cat "/sys/block/$d/size") sectors, logical_block_size=$(cat "/sys/block/$d/queue/logical_block_size")"
    [ "$(cat "/sys/block/$d/queue/logical_block_size")" = 4096 ] || fail "/dev/$d block size is not 4096"
    [ "$(cat "/sys/block/$d/size")" = $((blocks * 8)) ] || fail "/dev/$d size differs from the config"
done

fio_jobs "$FIO_JOBS"

crypt_check

step "disconnect"
disconnect_ns

# Second session with NVMe/TCP header and data digests (crc32c on every PDU, both ways).
step "connect with header and data digests"
connect_ns --hdr-digest --data-digest
fio_jobs "$FIO_JOBS_DIGEST"
fio_concurrent "$FIO_CONCURRENT"
step "disconnect (digest session)"
disconnect_ns

echo
echo "INTEROP-PASS"
