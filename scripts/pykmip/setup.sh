#!/usr/bin/env bash
# Creates (idempotently) a Python venv holding PyKMIP 0.11.0 from PyPI, the KMIP server that
# nvseal's KMS tests and developers run against. Prints the venv path on success.
#
#   NVSEAL_PYKMIP_VENV  venv location (default: $HOME/.cache/nvseal/pykmip-venv)
#   PYTHON              interpreter used to create the venv (default: python3)
#
# PyKMIP 0.11 is needed: Debian's python3-pykmip 0.10 and PyPI 0.10 break on Python >= 3.12.
set -euo pipefail

venv="${NVSEAL_PYKMIP_VENV:-$HOME/.cache/nvseal/pykmip-venv}"
python="${PYTHON:-python3}"
version="0.11.0"

installed_version() {
    "$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("pykmip"))' 2>/dev/null || true
}

if [[ -x "$venv/bin/pykmip-server" && "$(installed_version)" == "$version" ]]; then
    echo "$venv"
    exit 0
fi

# Serialise concurrent first runs (several test binaries may call this at once).
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9
if [[ -x "$venv/bin/pykmip-server" && "$(installed_version)" == "$version" ]]; then
    echo "$venv"
    exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv" >&2
fi
"$venv/bin/pip" install --disable-pip-version-check -q "pykmip==$version" >&2
[[ "$(installed_version)" == "$version" ]] || { echo "setup.sh: pykmip $version not importable in $venv" >&2; exit 1; }
echo "$venv"
