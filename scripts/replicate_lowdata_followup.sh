#!/usr/bin/env bash
# issue 12 follow-up: does pretraining pay off when labels are scarce? SST-2 fine-tuning on N training
# sentences only (a fixed random subset: default 1,000 of 6,920), everything else as the replicate preset
# (lr 3e-4, 2 epochs, batch 32, seeds 0,1,2, median), for the replication's teacher and student and their
# from-scratch baselines.  Usage: bash scripts/replicate_lowdata_followup.sh [RUN_DIR] [N]
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/replicate2}
n=${2:-1000}
for m in teacher student; do
  .venv/bin/distilflow evaluate --model "$run/$m" --tasks sst2 --output "runs/exp-lowdata-$n-$m" \
    --glue-dir ../shared/data/glue --seeds 3 --seed 0 --lr 3e-4 --epochs 2 --scratch-baselines \
    --max-train-examples "$n"
done
