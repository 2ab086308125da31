"""Fine-tuning step time on the CPU, float32 vs ``--cpu-bf16`` (issue 12: the replication's largest stage).

    python scripts/bench_finetune.py --model runs/replicate3/teacher

SST-2 (the shared stsa.binary train file) at the replication recipe (lr 3e-4, batch 32, seq <= 128), the same
seed and batches in both modes; ``--steps`` optimizer steps per run, best of ``--repeats`` alternating runs. Prints
seconds per step, the ratio, and the dev accuracy of the first 256 dev sentences (a sanity check, not a score:
a few dozen steps do not train a classifier). Refused on a CPU without native bf16, as ``--cpu-bf16`` is.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a model folder with its tokenizer (e.g. the replication teacher)")
    ap.add_argument("--glue-dir", default=str(REPO.parent / "shared" / "data" / "glue"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ.setdefault("DISTILFLOW_PROGRESS", "0")

    from distilflow.tasks.evaluate.config import FinetuneConfig
    from distilflow.tasks.evaluate.finetune import finetune_glue
    from distilflow.tasks.evaluate.glue import find_task_files, read_glue_file

    files = find_task_files(args.glue_dir, "sst2")
    if not files.train:
        raise SystemExit(f"{args.glue_dir}: no SST-2 train file")
    train = read_glue_file(files.train, "sst2").examples
    dev = read_glue_file(files.dev, "sst2").examples[:256]
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for mode in ("fp32", "bf16"):
            cfg = FinetuneConfig(learning_rate=3e-4, epochs=2.0, max_steps=args.steps, device="cpu",
                                 cpu_bf16=mode == "bf16")
            r = finetune_glue(args.model, "sst2", train, dev, cfg, seed=0)
            per_step = r["train_seconds"] / r["steps"]
            best[mode] = min(best.get(mode, per_step), per_step)
            print(f"{mode}: {per_step:.3f} s/step ({r['steps']} steps), dev acc {r['score']:.1f}", flush=True)
    print(f"best: fp32 {best['fp32']:.3f} s/step, bf16 {best['bf16']:.3f} s/step = {best['fp32'] / best['bf16']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
