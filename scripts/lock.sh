#!/usr/bin/env bash
# Re-resolve the lock files from pyproject.toml and requirements/torch-*.txt (see requirements/README.md).
# Run it after changing a dependency range or the torch build; it needs PyPI and takes ~15 minutes.
# Pins already in the locks are kept unless they no longer fit; `bash scripts/lock.sh --upgrade` (or
# --upgrade-package NAME) moves them, as pip-compile does.
#
# Resolved for CPython 3.11 on Linux x86_64 against PyPI only: this machine's pip config (local mirrors,
# constraints) is ignored so the result does not depend on it. The CPU torch wheel is found in
# $TORCH_CPU_WHEELS (default: /opt/wheels when it holds it, else PyTorch's CPU index page).
set -euo pipefail
cd "$(dirname "$0")/.."
COMPILER=${LOCK_COMPILER:-.venv/bin/pip-compile}
[ -x "$COMPILER" ] || { echo "lock.sh: $COMPILER not found; run 'make test' (or scripts/install.sh dev) first" >&2; exit 2; }
if [ -z "${TORCH_CPU_WHEELS:-}" ]; then
  if compgen -G "/opt/wheels/torch-*+cpu-*.whl" >/dev/null; then TORCH_CPU_WHEELS=/opt/wheels
  else TORCH_CPU_WHEELS=https://download.pytorch.org/whl/cpu/torch/; fi
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh" PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS="" PIP_CONSTRAINT="" PIP_EXTRA_INDEX_URL="" PIP_INDEX_URL=""

compile() {  # compile OUTPUT [pip-compile options]: the locks' common settings
  local out=$1
  shift
  nice -n 10 "$COMPILER" --quiet --generate-hashes --allow-unsafe --strip-extras \
    --no-emit-index-url --no-emit-find-links \
    --output-file "$out" "$@" pyproject.toml
}

echo "lock.sh: requirements.lock (runtime, CPU torch from $TORCH_CPU_WHEELS)" >&2
compile requirements.lock --find-links "$TORCH_CPU_WHEELS" -c requirements/torch-cpu.txt "$@"
echo "lock.sh: requirements-dev.lock (runtime pins + the dev extra)" >&2
compile requirements-dev.lock --find-links "$TORCH_CPU_WHEELS" --extra dev -c requirements/torch-cpu.txt \
  -c requirements/pip.txt -c requirements.lock "$@"
echo "lock.sh: requirements-cuda.lock (runtime pins, CUDA torch from PyPI)" >&2
# the runtime pins without the CPU torch entry, so both runtime locks agree on everything but torch
python3 - requirements.lock "$tmp/runtime-no-torch.txt" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
open(sys.argv[2], "w").write(re.sub(r"(?m)^torch==.*\n(?:    .*\n)*", "", text))
PY
cp "$tmp/runtime-no-torch.txt" "$tmp/cuda-seed.lock"
[ -f requirements-cuda.lock ] && cp requirements-cuda.lock "$tmp/cuda-seed.lock"
compile "$tmp/cuda-seed.lock" -c requirements/torch-cuda.txt -c "$tmp/runtime-no-torch.txt" "$@"
sed "s#-c $tmp/runtime-no-torch.txt#-c requirements.lock (less torch)#" "$tmp/cuda-seed.lock" > requirements-cuda.lock
explain() {  # explain LOCK TEXT: say what the lock means right below pip-compile's header
  python3 - "$1" "$2" <<'PY'
import sys
path, text = sys.argv[1:]
lines = [l for l in open(path).read().splitlines(keepends=True) if not l.startswith("# MEANS: ")]
end = next(i for i, l in enumerate(lines) if not l.startswith("#"))
lines[end:end] = [f"# MEANS: {t}\n" for t in text.splitlines()] + ["#\n"]
open(path, "w").write("".join(lines))
PY
}
explain requirements.lock "the runtime set with CPU-only torch (requirements/torch-cpu.txt), CPython 3.11, Linux x86_64.
install: pip install --require-hashes -r requirements.lock (--extra-index-url https://download.pytorch.org/whl/cpu
where pip's find-links do not hold the torch wheel). No test tools: this is what the images install."
explain requirements-cuda.lock "the runtime set with PyPI's CUDA 13.0 torch (requirements/torch-cuda.txt), CPython 3.11, Linux x86_64;
every other pin equals requirements.lock. install: pip install --require-hashes -r requirements-cuda.lock"
explain requirements-dev.lock "requirements.lock's pins (CPU torch) + the dev extra (pytest, moto, ruff, mypy, pip-tools), CPython 3.11,
Linux x86_64: the test environment (make test, CI). install: bash scripts/install.sh dev"
echo "lock.sh: done; commit requirements*.lock" >&2
