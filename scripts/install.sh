#!/usr/bin/env bash
# Install distilflow into ./.venv from a hashed lock: `bash scripts/install.sh [runtime|dev|cuda]`.
#   runtime  requirements.lock       CPU torch, what `make demo` and the CPU image need   (default)
#   dev      requirements-dev.lock   runtime + pytest, moto, ruff, mypy, pip-tools: `make test`, CI
#   cuda     requirements-cuda.lock  runtime with PyPI's CUDA 13.0 torch, for a GPU host
# A second call with unchanged lock files does nothing (a stamp in .venv holds their sha256).
# Supported: CPython 3.11 on Linux x86_64 (what the locks are resolved for); PYTHON=... picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
SET=${1:-runtime}
case "$SET" in
  runtime) LOCK=requirements.lock ;;
  dev) LOCK=requirements-dev.lock ;;
  cuda) LOCK=requirements-cuda.lock ;;
  *) echo "install.sh: unknown set '$SET' (runtime, dev or cuda)" >&2; exit 2 ;;
esac

stamp_of() {  # what an install of set $1 depends on: its lock, the package metadata, this script
  local lock=$2
  cat "$lock" pyproject.toml "$0" | sha256sum | cut -d' ' -f1 | sed "s/^/$1 /"
}
STAMP=.venv/.distilflow-install
want=$(stamp_of "$SET" "$LOCK")
# (a dev install stamps `runtime` too: the dev set holds every runtime pin)
if [ -f "$STAMP" ] && grep -qx "$want" "$STAMP" && .venv/bin/python -c "import distilflow" 2>/dev/null; then
  exit 0  # up to date: nothing to do
fi

PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' ||
    { echo "install.sh: $PY is Python $("$PY" -c 'import platform; print(platform.python_version())'); distilflow's locks are for 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 2; }
  "$PY" -m venv .venv
fi
echo "install.sh: installing the $SET set ($LOCK) into .venv ..." >&2
t0=$(date +%s)
.venv/bin/python -m pip install -q "$(grep "^pip==" requirements/pip.txt)"
extra=()
if [ "$SET" != cuda ] && [ -z "${PIP_FIND_LINKS:-}" ] && [ -z "$(.venv/bin/python -m pip config get global.find-links 2>/dev/null)" ]; then
  # no local wheel folder: the CPU torch wheel comes from PyTorch's CPU index (pinned by its hash)
  extra=(--extra-index-url https://download.pytorch.org/whl/cpu)
fi
# (this machine kind's pip config names local mirror folders that lack most packages: drop those warnings)
.venv/bin/python -m pip install -q --require-hashes "${extra[@]}" -r "$LOCK" \
  2> >(grep -v "is neither a file nor a directory" >&2)
# the package itself, editable; its build backend (setuptools) is in the lock, so no isolated build env
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
.venv/bin/python -m pip check >&2 ||
  { echo "install.sh: $LOCK does not satisfy pyproject.toml (a dependency added without re-locking?): run 'make lock'" >&2; exit 1; }
{ if [ "$SET" = dev ]; then stamp_of runtime requirements.lock; fi; echo "$want"; } > "$STAMP"
echo "install.sh: $SET set installed in $(( $(date +%s) - t0 )) s: $(.venv/bin/distilflow --version)" >&2
