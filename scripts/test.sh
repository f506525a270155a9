#!/usr/bin/env bash
# The whole nvseal test suite: formatting, clippy, then every unit and integration test.
# Installs what the tests need on a fresh Debian 12 machine (apt/PyPI), idempotently.
# Usage: scripts/test.sh [extra cargo-nextest args]
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s ==\n' "$*" >&2; }

need_apt=()
command -v openssl >/dev/null || need_apt+=(openssl)
[ -e /usr/include/openssl/ssl.h ] || need_apt+=(libssl-dev)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
# The uring bdev on a real block device (tests/uring_blockdev.rs) attaches a loop device.
command -v losetup >/dev/null || need_apt+=(mount)
# Independent XTS check of on-disk data (tests/keys_openssl.rs): OpenSSL's CLI refuses XTS.
python3 -c 'import cryptography' 2>/dev/null || python3 -m pip install --quiet cryptography
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
for s in scripts/setup.d/*.sh; do
  [ -e "$s" ] || continue
  log "setup: $s"
  bash "$s"
done

if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy (warnings denied)"
cargo clippy --all-targets --locked -- -D warnings
log "tests"
cargo nextest run --locked --no-fail-fast "$@"

# The `spdk` feature (docs/spdk.md) builds only against an installed SPDK, which no package
# registry provides: run its clippy and tests when pkg-config finds SPDK, say loudly when not.
spdk_prefix="${SPDK_PREFIX:-/opt/spdk}"
if [ -d "$spdk_prefix/lib/pkgconfig" ]; then
  export PKG_CONFIG_PATH="$spdk_prefix/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
fi
spdk_tests="tests/spdk_nvme.rs (fabrics path over SPDK's NVMe/TCP initiator to nvseal and to Linux nvmet-tcp in the QEMU guest, the PCIe path in the guest, controller loss and reset, bad transport IDs, spdk_nvme_identify/spdk_nvme_perf/nvmf_tgt as peers), the spdk unit tests and clippy --features spdk"
if pkg-config --exists spdk_nvme spdk_env_dpdk spdk_syslibs 2>/dev/null; then
  # The .pc files carry the libraries' ABI version; the release is in spdk/version.h.
  spdk_inc=$(pkg-config --cflags-only-I spdk_nvme | tr ' ' '\n' | sed -n 's/^-I//p' | head -1 || true)
  spdk_ver=$(awk '$1=="#define" && $2=="SPDK_VERSION_MAJOR"{M=$3}
                  $1=="#define" && $2=="SPDK_VERSION_MINOR"{m=$3}
                  END{if (M != "") printf "%s.%02d", M, m}' "$spdk_inc/spdk/version.h" 2>/dev/null || true)
  log "SPDK ${spdk_ver:-(version unknown)} found: clippy and tests with --features spdk"
  # bindgen loads libclang.
  if ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev
  fi
  # Build only the binaries these tests live in (the library's unit tests, tests/spdk_nvme.rs
  # and the nvseal binary it runs): relinking every test binary a second time, with the
  # feature, once filled a CI machine's disk.
  df -h "$(pwd)" | tail -1 | awk '{print "disk: " $4 " free on " $6}' >&2
  cargo clippy --all-targets --locked --features spdk -- -D warnings
  cargo nextest run --locked --no-fail-fast --features spdk --lib --test spdk_nvme \
    -E 'binary(spdk_nvme) | test(spdk::)' "$@"
else
  printf '\nSKIPPED: SPDK not installed: %s\n' "$spdk_tests" >&2
fi
