# shellcheck shell=bash
# Shared settings for the nvseal QEMU/TCG Linux-initiator harness.
# Sourced by setup.sh, run-guest.sh and selftest.sh; not meant to be run.
# shellcheck disable=SC2034  # the variables are used by the scripts that source this

# Where downloaded .deb files, the extracted staging root, the kernel and the
# built initramfs live. Never inside the git tree.
NVSEAL_QEMU_CACHE="${NVSEAL_QEMU_CACHE:-$HOME/.cache/nvseal/qemu}"

QEMU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Files the harness produces in the cache (stable names, read by run-guest.sh).
KERNEL_IMG="$NVSEAL_QEMU_CACHE/vmlinux"
INITRAMFS_IMG="$NVSEAL_QEMU_CACHE/initramfs.cpio"
BUILD_INFO="$NVSEAL_QEMU_CACHE/build-info.txt"

# Markers /init prints on the serial console around the test script. run-guest.sh
# matches them at the start of a line; keep both files in sync with these.
MARK_BEGIN="NVSEAL-GUEST-BEGIN"
MARK_END="NVSEAL-GUEST-END"

log() { printf '[qemu-harness] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
