#!/usr/bin/env bash
# scripts/interop.sh — prove that a non-Rust gRPC stack (Python grpcio, BoringSSL) can
# discover and call the registry and the processor with the development PKI, through
# server reflection and health checking.
#
#   scripts/interop.sh                 # whole interop suite
#   scripts/interop.sh -k reflection   # extra arguments go to pytest
#
# Steps:
#   1. Create (or reuse) a virtualenv in target/interop-venv with python3 -m venv. When
#      python3 or its venv module is missing (Debian's python3-venv), install them with
#      apt-get if running as root.
#   2. pip install -r tests/interop/requirements.txt (skipped when the venv already has
#      exactly that file installed).
#   3. cargo build --bins -p dsrelay-registry -p dsrelay-processor -p dsrctl
#   4. python -m pytest -q tests/interop; the test starts both services as processes.
#
# Environment:
#   PYTHON           interpreter that creates the venv (default python3).
#   DSRELAY_BIN_DIR  where the binaries are (default ${CARGO_TARGET_DIR:-target}/debug).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)
venv="$repo/target/interop-venv"
requirements="$repo/tests/interop/requirements.txt"
python=${PYTHON:-python3}

apt_install() {
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "error: $* missing; install it (e.g. apt-get install $*) and rerun" >&2
        exit 1
    fi
    echo "interop: installing $* with apt-get" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

venv_ok() {
    [ -x "$venv/bin/python" ] && "$venv/bin/python" -m pip --version >/dev/null 2>&1
}

if ! venv_ok; then
    if ! command -v "$python" >/dev/null 2>&1; then
        apt_install python3 python3-venv
    fi
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    if ! "$python" -m venv "$venv" >/dev/null 2>&1; then
        # Debian ships venv/ensurepip separately; a failed attempt leaves a venv without pip.
        rm -rf "$venv"
        apt_install python3-venv
        "$python" -m venv "$venv"
    fi
fi

stamp="$venv/.interop-requirements.txt"
if ! cmp -s "$requirements" "$stamp"; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$stamp"
fi

cargo build --bins -p dsrelay-registry -p dsrelay-processor -p dsrctl

export DSRELAY_BIN_DIR="${DSRELAY_BIN_DIR:-${CARGO_TARGET_DIR:-$repo/target}/debug}"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/interop "$@"
