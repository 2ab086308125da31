#!/usr/bin/env bash
# Create (or update) the distilflow work pools `cpu` and `gpu` and the `gpu` concurrency limits on the
# Prefect server that PREFECT_API_URL points at. Idempotent. Details and options: infra/create_pools.py.
#
#   PREFECT_API_URL=http://127.0.0.1:4200/api bash infra/create-pools.sh
#   GPU_POOL_TYPE=process GPU_SLOTS=2 bash infra/create-pools.sh     # one machine with 2 GPUs
#
# Environment: GPU_POOL_TYPE (kubernetes | process | docker), GPU_SLOTS (default 1), CPU_POOL_LIMIT,
# PYTHON (the interpreter that has prefect installed; default: python3 on PATH).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" "$here/create_pools.py" "$@"
