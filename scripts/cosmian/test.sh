#!/usr/bin/env bash
# The opt-in interop job against Cosmian KMS 5.28 (issue 18 item 5): builds it once (setup.sh,
# about 30 minutes on 2 cores, cached in NVSEAL_COSMIAN_ROOT), then runs the ignored tests of
# tests/kmip_cosmian.rs against it. Not part of scripts/test.sh or CI: run it before a release or
# after touching src/kms or src/keys.
#
#   scripts/cosmian/test.sh [extra cargo-nextest args]
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/cosmian/setup.sh >/dev/null
cargo nextest run --locked --no-fail-fast --test kmip_cosmian --run-ignored ignored-only "$@"
