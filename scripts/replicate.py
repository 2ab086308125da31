"""Replicate DistilBERT's claims on the shared text in <= 2 hours on 2 CPU cores (issue 12; docs/replication.md).

    python scripts/replicate.py --output runs/replicate          # the run of record (~2 h; resumable)
    python scripts/replicate.py --output /tmp/rep --tiny         # the same recipe at toy sizes (minutes)
    python scripts/replicate.py --output runs/r --precision bf16 # bf16 autocast (CPUs with AVX512-BF16/AMX)

Runs ``distilflow pipeline --preset replicate`` on Gutenberg (all books but one) + TinyShakespeare with the
held-out book for evaluation and the shared GLUE files, then copies ``OUT/replication.md`` and
``OUT/replication.json`` to ``--docs`` (default: docs/ for the full run, nothing for --tiny). Rerun the same
command after an interruption: finished stages are skipped, training resumes from its last checkpoint and
fine-tuning from its last finished seed. Give the machine to it: timings in the report assume no other load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pipeline_argv(output: str, shared: str, tiny: bool, workers: int, precision: str = "auto") -> list[str]:
    from distilflow.tasks.pipeline.replicate import replicate_inputs

    train, held = replicate_inputs(shared)
    return ["pipeline", "--preset", "replicate-tiny" if tiny else "replicate", "--input", *train, "--heldout", *held,
            "--glue-dir", str(Path(shared) / "glue"), "--output", output, "--workers", str(workers),
            *(["--precision", precision] if precision != "auto" else [])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="runs/replicate", help="pipeline output folder (default: %(default)s)")
    ap.add_argument("--shared", default=os.path.relpath(REPO.parent / "shared" / "data"),
                    help="shared data folder (default: %(default)s)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (the CI check of the recipe)")
    ap.add_argument("--docs", default=None, help="where replication.md/.json are copied (default: docs/, or "
                    "nowhere with --tiny)")
    ap.add_argument("--workers", type=int, default=1, help="worker processes of the data stages")
    ap.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                    help="auto: float32 on a CPU (the runs of record before 2026-12-07); bf16: autocast for training "
                    "and fine-tuning where the CPU computes bf16 natively (AVX512-BF16/AMX), refused elsewhere")
    args = ap.parse_args(argv)

    from distilflow.cli import main as cli

    rc = cli(pipeline_argv(args.output, args.shared, args.tiny, args.workers, args.precision))
    if rc:
        return rc
    docs = args.docs if args.docs is not None else (None if args.tiny else str(REPO / "docs"))
    if docs:
        Path(docs).mkdir(parents=True, exist_ok=True)
        for name in ("replication.md", "replication.json"):
            shutil.copyfile(Path(args.output) / name, Path(docs) / name)
        print(f"replication report: {docs}/replication.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
