#!/usr/bin/env bash
# Fresh install into ./.venv from the locked dependency set (offline-safe: PyPI or a local mirror only).
# torch is pinned to 2.13.0: on the CPU machines here pip takes the local CPU wheel; an unpinned torch
# would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade "pip==25.3"
.venv/bin/python -m pip install -q -r requirements.lock
.venv/bin/python -m pip install -q --no-deps -e .
.venv/bin/distilflow --version
