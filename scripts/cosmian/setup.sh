#!/usr/bin/env bash
# Builds (idempotently) Cosmian KMS 5.28.0, the second, strict KMIP server of the opt-in
# interop job (scripts/cosmian/test.sh; issue 18 item 5), from crates.io with `cargo install`,
# test-only. Prints the path of the `cosmian_kms` binary on success.
#
#   NVSEAL_COSMIAN_ROOT  install root (default: $HOME/.cache/nvseal/cosmian); the binary lands in
#                        $NVSEAL_COSMIAN_ROOT/bin, the build tree in $NVSEAL_COSMIAN_ROOT/target
#
# About 30 minutes and 5 GB of disk on a 2-core machine; nothing of it is committed.
#
# Why the manifest is edited: the KMIP socket server needs the crate's `non-fips` feature on a
# system without an OpenSSL FIPS provider (Debian ships none; a FIPS build refuses to start),
# and the published 5.28.0 manifest makes `non-fips` enable a feature of a *dev*-dependency
# (`cosmian_kms_client_utils/non-fips`), which `cargo install --features non-fips` rejects. The
# one line naming it is removed from a copy of the crate; nothing else changes.
set -euo pipefail

version="5.28.0"
root="${NVSEAL_COSMIAN_ROOT:-$HOME/.cache/nvseal/cosmian}"
bin="$root/bin/cosmian_kms"

installed() { [[ -x "$bin" ]] && [[ "$(cat "$root/version" 2>/dev/null)" == "$version" ]]; }
if installed; then
    echo "$bin"
    exit 0
fi
mkdir -p "$root"
exec 9>"$root.lock"
flock 9
if installed; then
    echo "$bin"
    exit 0
fi

# The crate's source, through cargo (crates.io or the configured mirror): a throwaway package
# that depends on it, fetched.
probe="$root/fetch"
mkdir -p "$probe/src"
cat > "$probe/Cargo.toml" <<TOML
[package]
name = "nvseal-cosmian-fetch"
version = "0.0.0"
edition = "2021"
publish = false
[dependencies]
cosmian_kms_server = "=$version"
TOML
echo 'fn main() {}' > "$probe/src/main.rs"
(cd "$probe" && cargo fetch -q >&2)
registry="${CARGO_HOME:-$HOME/.cargo}/registry/src"
src="$(find "$registry" -maxdepth 2 -type d -name "cosmian_kms_server-$version" | head -n 1)"
[[ -n "$src" ]] || { echo "setup.sh: cosmian_kms_server-$version not in $registry after fetch" >&2; exit 1; }

work="$root/src-$version"
rm -rf "$work"
cp -r "$src" "$work"
sed -i '/"cosmian_kms_client_utils\/non-fips",/d' "$work/Cargo.toml"
grep -q 'cosmian_kms_client_utils/non-fips' "$work/Cargo.toml" && {
    echo "setup.sh: could not drop the dev-dependency feature from the manifest" >&2; exit 1; }

echo "setup.sh: building Cosmian KMS $version (about 30 minutes on 2 cores)" >&2
CARGO_TARGET_DIR="$root/target" cargo install --locked --path "$work" --features non-fips \
    --root "$root" --force >&2
echo "$version" > "$root/version"
echo "$bin"
