#!/usr/bin/env bash
# issue 12 follow-up: SST-2 fine-tuning at lr 3e-4 (the run of record used 1e-4), seeds 0,1,2, for the
# replication's teacher and student and their from-scratch baselines (same recipe otherwise)
set -euo pipefail
cd "$(dirname "$0")/.."
for m in teacher student; do
  .venv/bin/distilflow evaluate --model runs/replicate/$m --tasks sst2 --output runs/exp-lr3e4-3seeds-$m \
    --glue-dir ../shared/data/glue --seeds 3 --seed 0 --lr 3e-4 --epochs 2 --scratch-baselines
done
