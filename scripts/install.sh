#!/usr/bin/env bash
# Set up a fresh machine for this repository: torch (the CPU wheel when none is installed),
# then the package itself, built against that torch. `install.sh dev` adds the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
"$PY" -m pip install --quiet --upgrade pip "setuptools>=64" wheel
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install --quiet torch==2.13.0
fi
extras=""
if [ "${1:-}" = "dev" ]; then
    extras="[dev]"
fi
"$PY" -m pip install --quiet --no-build-isolation -e ".${extras}"
# Spoken digits (the audio of the digits corpus) are synthesised by espeak-ng, a system package:
# installed here where apt can be used (as root); without it the audio documents are skipped.
if [ "${1:-}" = "dev" ] && ! command -v espeak-ng >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        (apt-get install -y -qq espeak-ng >/dev/null 2>&1 \
            || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq espeak-ng >/dev/null 2>&1)) \
            || echo "install.sh: could not install espeak-ng; audio tests will be skipped"
    else
        echo "install.sh: espeak-ng not found (apt-get install espeak-ng); audio tests will be skipped"
    fi
fi
