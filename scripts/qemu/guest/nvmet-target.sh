# shellcheck shell=bash
# Guest half of tests/perf_linux_target.rs: the Linux kernel's own NVMe/TCP target (nvmet-tcp)
# as the device under test of `nvseal perf`, which runs on the host. Runs as /run.sh under bash
# in the QEMU guest (scripts/qemu/run-guest.sh, started with NVSEAL_QEMU_HOSTFWD so the host's
# 127.0.0.1:<fwd port> reaches this guest's $GUEST_PORT).
#
# The host prepends one line of parameters:
#   GUEST_PORT  TCP port nvmet listens on (on the guest's own address)
#   SUBNQN      subsystem NQN; SERIAL its serial number
#   HOSTNQN     the only host NQN the subsystem allows (nvmet's allowed_hosts)
#   NS_MB       size of each of the two namespaces (brd RAM disks), MiB
#   DONE_URL    the host answers 200 here once it has finished with the target
#   WAIT_S      how long to wait for that before giving up
#   HASH_BLOCKS "nsid:blocks ...": after the host is done, the SHA-256 of the first `blocks`
#               4 KiB blocks of that namespace's RAM disk, for the host to compare with what
#               it wrote (brd keeps no I/O statistics, so the data itself is the evidence)
# The target's setup is printed, then the line "NVMET-READY"; once the host says it is done the
# script prints "NVMET-SHA256 nsid=N blocks=B <hex>" per HASH_BLOCKS entry and "NVMET-DONE".
set -euo pipefail

: "${GUEST_PORT:?}" "${SUBNQN:?}" "${SERIAL:?}" "${HOSTNQN:?}" "${NS_MB:?}" "${DONE_URL:?}"
: "${WAIT_S:?}" "${HASH_BLOCKS:?}"
GUEST_IP="${NVSEAL_GUEST_IP:-10.0.2.15}"
CFG=/sys/kernel/config/nvmet

fail() {
    echo "NVMET-FAIL: $*"
    exit 1
}

echo "nvmet-target: kernel $(uname -r), listening on $GUEST_IP:$GUEST_PORT for $SUBNQN"
/sbin/modprobe nvmet-tcp || fail "modprobe nvmet-tcp"
/sbin/modprobe brd rd_nr=2 rd_size=$((NS_MB * 1024)) || fail "modprobe brd"
grep -q ' /sys/kernel/config ' /proc/mounts || mount -t configfs configfs /sys/kernel/config ||
    fail "mount configfs"

# The allowed host, then the subsystem with two namespaces, then the port.
mkdir "$CFG/hosts/$HOSTNQN" || fail "create host $HOSTNQN"
sub="$CFG/subsystems/$SUBNQN"
mkdir "$sub" || fail "create subsystem"
echo 0 >"$sub/attr_allow_any_host"
echo "$SERIAL" >"$sub/attr_serial" || fail "set serial"
ln -s "$CFG/hosts/$HOSTNQN" "$sub/allowed_hosts/" || fail "allow $HOSTNQN"
for n in 1 2; do
    mkdir "$sub/namespaces/$n" || fail "create namespace $n"
    echo "/dev/ram$((n - 1))" >"$sub/namespaces/$n/device_path"
    echo 1 >"$sub/namespaces/$n/enable" || fail "enable namespace $n"
done
port="$CFG/ports/1"
mkdir "$port" || fail "create port"
echo tcp >"$port/addr_trtype"
echo ipv4 >"$port/addr_adrfam"
echo "$GUEST_IP" >"$port/addr_traddr"
echo "$GUEST_PORT" >"$port/addr_trsvcid"
ln -s "$sub" "$port/subsystems/" || fail "expose the subsystem on the port"
for _ in $(seq 100); do
    grep -qi ":$(printf '%04X' "$GUEST_PORT") " /proc/net/tcp && break
    sleep 0.1
done
grep -qi ":$(printf '%04X' "$GUEST_PORT") " /proc/net/tcp || fail "nvmet is not listening"
echo "NVMET-READY"

# Serve until the host is done with us (busybox wget gets a 200 only then; `timeout` bounds a
# request that hangs, since busybox wget's own -T crashes, docs/linux-initiator.md).
deadline=$(($(cut -d. -f1 /proc/uptime) + WAIT_S))
until timeout 10 wget -q -O /dev/null "$DONE_URL" 2>/dev/null; do
    [ "$(cut -d. -f1 /proc/uptime)" -lt "$deadline" ] || fail "the host did not finish in ${WAIT_S}s"
    sleep 1
done

for nb in $HASH_BLOCKS; do
    n="${nb%%:*}" b="${nb#*:}"
    sum="$(dd if="/dev/ram$((n - 1))" bs=4096 count="$b" 2>/dev/null | sha256sum)" ||
        fail "hash of nsid $n"
    echo "NVMET-SHA256 nsid=$n blocks=$b ${sum%% *}"
done
echo "NVMET-DONE"
