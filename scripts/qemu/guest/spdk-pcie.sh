# shellcheck shell=bash
# Guest half of the PCIe test in tests/spdk_nvme.rs: nvseal, built with the `spdk` feature,
# drives QEMU's emulated NVMe SSD (scripts/qemu/run-guest.sh, NVSEAL_QEMU_NVME) from user space
# through SPDK's NVMe driver (`spdk_nvme` with `trtype:PCIe`) and exports an encrypted namespace
# on it over NVMe/TCP; the host reaches it through NVSEAL_QEMU_HOSTFWD and drives it with
# `nvseal perf --verify`. Runs as /run.sh under bash in the guest.
#
# The payload (/payload) holds: nvseal (the binary), lib/ (the SPDK, DPDK and ISA-L shared
# libraries it loads, and the system libraries the guest lacks), serve.yaml (its config, with
# @TRADDR@ where the SSD's PCI address goes), the key file the config names and openssl.cnf.
#
# The host prepends one line of parameters:
#   SSD_SERIAL  serial number of the emulated SSD to use (QEMU's nvme device, 1b36:0010)
#   HUGEPAGES   2 MiB hugepages to reserve for SPDK's memory
#   DONE_URL    the host answers 200 here once it has finished with the target
#   WAIT_S      how long to wait for that before giving up
#   REMOVED     1 if the host hot-removes the SSD (QEMU's device_del) before it is done: nvseal
#               must then have logged the removal, and its exit status on SIGTERM is not
#               checked (its shutdown Flush of the vanished drive fails, as it should)
# Prints "SPDK-READY" once nvseal serves, then, after the host is done, stops nvseal with
# SIGTERM (so it closes its controller and SPDK's environment) and prints "SPDK-DONE".
set -euo pipefail

: "${SSD_SERIAL:?}" "${HUGEPAGES:?}" "${DONE_URL:?}" "${WAIT_S:?}" "${REMOVED:?}"
LOG=/tmp/serve.log

fail() {
    echo "SPDK-FAIL: $*"
    [ -s "$LOG" ] && { echo "---- nvseal serve log ----"; tail -n 60 "$LOG"; }
    exit 1
}

echo "spdk-pcie: kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) CPUs"

# The SSD: QEMU's nvme device has no serial in sysfs until a driver binds, so take the one
# nvme device there (the harness attaches exactly one).
traddr=""
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat "$d/vendor")" = 0x1b36 ] && [ "$(cat "$d/device")" = 0x0010 ]; then
        [ -z "$traddr" ] || fail "more than one emulated NVMe SSD"
        traddr="$(basename "$d")"
    fi
done
[ -n "$traddr" ] || fail "no emulated NVMe SSD (1b36:0010) on the PCI bus"
echo "spdk-pcie: SSD $SSD_SERIAL at $traddr, driver: $(basename "$(readlink "/sys/bus/pci/devices/$traddr/driver" 2>/dev/null || echo none)")"

# Hand it to uio_pci_generic (no IOMMU in this guest; SPDK then uses physical addresses).
/sbin/modprobe uio_pci_generic || fail "modprobe uio_pci_generic"
if [ -e "/sys/bus/pci/devices/$traddr/driver" ]; then
    echo "$traddr" >"/sys/bus/pci/devices/$traddr/driver/unbind"
fi
echo "1b36 0010" >/sys/bus/pci/drivers/uio_pci_generic/new_id 2>/dev/null || true
[ -e "/sys/bus/pci/devices/$traddr/driver" ] ||
    echo "$traddr" >/sys/bus/pci/drivers/uio_pci_generic/bind 2>/dev/null || true
drv="$(basename "$(readlink "/sys/bus/pci/devices/$traddr/driver" 2>/dev/null || echo none)")"
[ "$drv" = uio_pci_generic ] || fail "the SSD is bound to $drv, not uio_pci_generic"
echo "spdk-pcie: bound to uio_pci_generic ($(ls /sys/bus/pci/devices/"$traddr"/uio))"

# Hugepages for SPDK's memory (DMA must reach pinned memory).
mkdir -p /dev/hugepages
grep -q ' /dev/hugepages ' /proc/mounts || mount -t hugetlbfs nodev /dev/hugepages ||
    fail "mount hugetlbfs"
echo "$HUGEPAGES" >/proc/sys/vm/nr_hugepages
got="$(cat /proc/sys/vm/nr_hugepages)"
[ "$got" -ge "$HUGEPAGES" ] || fail "only $got of $HUGEPAGES hugepages"
echo "spdk-pcie: $got hugepages of 2 MiB"

# DPDK keeps its runtime files under /var/run, which this guest's root lacks.
[ -e /var/run ] || ln -s /run /var/run
sed "s/@TRADDR@/$traddr/" /payload/serve.yaml >/tmp/serve.yaml
# SPDK's environment loads OpenSSL's config file at start-up and refuses to start without one;
# the guest has none of its own.
export LD_LIBRARY_PATH=/payload/lib OPENSSL_CONF=/payload/openssl.cnf NO_COLOR=1
/payload/nvseal serve -c /tmp/serve.yaml >"$LOG" 2>&1 &
pid=$!
up=""
for _ in $(seq 1200); do
    if grep -q "nvseal serving" "$LOG"; then
        up=1
        break
    fi
    kill -0 "$pid" 2>/dev/null || fail "nvseal serve exited"
    sleep 0.25
done
[ -n "$up" ] || fail "nvseal serve did not start in 300 s"
grep -E "SPDK environment|spdk_nvme|listening" "$LOG" || true
echo "SPDK-READY"

# Serve until the host is done (busybox wget gets a 200 only then; `timeout` bounds a request
# that hangs, docs/linux-initiator.md).
deadline=$(($(cut -d. -f1 /proc/uptime) + WAIT_S))
until timeout 10 wget -q -O /dev/null "$DONE_URL" 2>/dev/null; do
    [ "$(cut -d. -f1 /proc/uptime)" -lt "$deadline" ] || fail "the host did not finish in ${WAIT_S}s"
    kill -0 "$pid" 2>/dev/null || fail "nvseal serve died while serving"
    sleep 1
done

kill -TERM "$pid"
rc=0
wait "$pid" || rc=$?
echo "---- nvseal serve log (tail) ----"
tail -n 30 "$LOG"
echo "---- nvseal serve warnings and errors ----"
grep -E ' (WARN|ERROR) ' "$LOG" || true
if [ "$REMOVED" = 1 ]; then
    [ -e "/sys/bus/pci/devices/$traddr" ] && fail "the SSD is still on the PCI bus after its removal"
    grep -q "the PCIe device was removed" "$LOG" || fail "nvseal did not log the SSD's removal"
    echo "spdk-pcie: the SSD is gone from the PCI bus; nvseal logged it; serve exited $rc"
else
    [ "$rc" = 0 ] || fail "nvseal serve exited $rc on SIGTERM"
fi
sync
echo "SPDK-DONE"
