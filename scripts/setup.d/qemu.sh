#!/usr/bin/env bash
# Setup step run by scripts/test.sh before the tests: builds the QEMU/TCG Linux-initiator
# harness (scripts/qemu/setup.sh, idempotent: ~6 s when up to date) that
# tests/linux_initiator.rs boots. It needs root (apt-get, mknod, chroot); CI runs as root.
#
# A failure here does not stop the rest of the suite: the interop test runs setup.sh again
# itself and fails with setup's output, so the reason shows up where the failure is counted.
# NVSEAL_SKIP_QEMU=1 skips the build (and makes the interop test skip, loudly).
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ "${NVSEAL_SKIP_QEMU:-0}" = 1 ]; then
    echo "setup.d/qemu.sh: NVSEAL_SKIP_QEMU=1, not building the QEMU harness" >&2
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "setup.d/qemu.sh: WARNING: not root, cannot build the QEMU harness;" \
        "tests/linux_initiator.rs will fail (run as root or set NVSEAL_SKIP_QEMU=1)" >&2
    exit 0
fi
if ! bash scripts/qemu/setup.sh; then
    echo "setup.d/qemu.sh: WARNING: scripts/qemu/setup.sh failed;" \
        "tests/linux_initiator.rs will fail with its output" >&2
fi
