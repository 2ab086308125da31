"""Measure the cost of each stage of the replication recipe with short runs, and estimate the full run.

    nice -n 10 .venv/bin/python scripts/replicate_estimate.py --work /tmp/replicate-estimate [--steps 30]

Runs the real code of each stage for a few steps on the shared text (the recipe's vocabulary, prepared
data, teacher/student sizes, fine-tuning settings), measures CPU seconds per unit of work (a step, an
example), and multiplies by the recipe's amounts. CPU seconds, not wall seconds: this machine is shared,
and wall time under load says little about the run that will have it to itself. Measured with ONE torch
thread by default (``--threads 1``): with two, OpenMP threads spin while the other waits for a core, and a
loaded machine inflates the CPU time 2-4x. The estimate of an idle 2-core run's wall time is the 1-thread
CPU seconds / PARALLEL (two threads keep ~1.7 cores' worth of useful work; an assumption stated in
docs/replication.md). Prints one JSON document (also written to WORK/estimate.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PARALLEL = 1.7  # useful cores of a 2-thread torch loop on an otherwise idle 2-core machine (assumed)
RUN_OVERHEAD_CPU_S = 5.0  # per fine-tuning run: load, tokenise, save the model and its card (assumed)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (all threads)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Clock:
    def __enter__(self) -> Clock:
        self.cpu0, self.wall0 = cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cpu = cpu_seconds() - self.cpu0
        self.wall = time.perf_counter() - self.wall0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/replicate-estimate")
    ap.add_argument("--steps", type=int, default=30, help="training steps measured per model")
    ap.add_argument("--finetune-steps", type=int, default=20, help="fine-tuning steps measured per model and task")
    ap.add_argument("--preset", default="replicate")
    ap.add_argument("--threads", type=int, default=1, help="torch threads while measuring (default: %(default)s)")
    ap.add_argument("--from-json", default=None, help="recompute the estimate from an earlier estimate.json's "
                    "measurements (for the preset's current steps/epochs) without measuring again")
    ap.add_argument("--threads-speed", type=int, default=2, help="torch threads of the inference speed check")
    ap.add_argument("--docs", default=None, help="also write the planned replication.md/.json (status: not run) "
                    "with this estimate into this folder")
    args = ap.parse_args()

    from distilflow.tasks.core.terminal import configure
    from distilflow.tasks.pipeline.config import PRESETS as _PRESETS

    configure(verbose=False)
    if args.from_json:
        out = json.loads(Path(args.from_json).read_text())
        out["estimate"] = estimate(out, _PRESETS[args.preset])
        if "architecture" not in out and Path(args.work, "student", "config.json").exists():
            out["architecture"] = architecture(Path(args.work), args.threads_speed)
            Path(args.from_json).write_text(json.dumps(out, indent=2))
        return _finish(out, args)

    import torch

    from distilflow.tasks.pipeline.config import PRESETS, TEACHERS
    from distilflow.tasks.pipeline.replicate import replicate_inputs

    torch.set_num_threads(args.threads)
    p = PRESETS[args.preset]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shared = REPO.parent / "shared" / "data"
    train_files, held_files = replicate_inputs(str(shared))
    out: dict[str, Any] = {"preset": args.preset, "parallel_assumed": PARALLEL, "threads": args.threads,
                           "load_before": os.getloadavg(), "measured": {}}
    m = out["measured"]

    # 1. vocabulary (whole: it is short)
    from distilflow.tasks.prepare.vocab import VocabConfig, corpus_texts, train_wordpiece

    tok_dir = str(work / "tokenizer")
    if not Path(tok_dir, "tokenizer.json").exists():
        with Clock() as c:
            train_wordpiece(corpus_texts(train_files), tok_dir, VocabConfig(vocab_size=p["vocab_size"]))
        m["vocab"] = {"cpu_s": round(c.cpu, 1), "wall_s": round(c.wall, 1)}

    # 2. prepare (whole, through the command: training and held-out data)
    for name, files in (("data", train_files), ("heldout", held_files)):
        if not (work / name / "pairs").exists():
            with Clock() as c:
                subprocess.run([sys.executable, "-m", "distilflow.cli", "prepare", "--input", *files, "--output",
                                str(work / name), "--tokenizer", tok_dir, "--max-seq-len", str(p["max_seq_len"])],
                               check=True, capture_output=True, text=True)
            m[f"prepare-{name}"] = {"cpu_s": round(c.cpu, 1), "wall_s": round(c.wall, 1)}
    manifest = json.loads(next((work / "data" / "pairs").glob(".distilflow/manifest.json")).read_text())
    out["train_sequences"], out["train_tokens"] = manifest["rows"], manifest["tokens"]

    # 3./4. pretrain and distill: a few steps of the real loop, in this process
    from transformers import AutoTokenizer

    from distilflow.tasks.train.config import DISTILL_DEFAULTS, TrainConfig
    from distilflow.tasks.train.loop import train

    vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    spec = work / "teacher-config.json"
    spec.write_text(json.dumps({**TEACHERS[p["teacher_config"]], "vocab_size": vocab}))
    common = {"batch_size": p["batch_size"], "max_steps": args.steps, "log_every": 10, "eval_sequences": 0,
              "threads": args.threads, "save_every": 0}
    teacher, student = work / "teacher", work / "student"
    for folder in (teacher, student):  # measured afresh (a kept folder would be resumed or refused)
        shutil.rmtree(folder, ignore_errors=True)
    with Clock() as c:
        train(TrainConfig(mode="pretrain", data=str(work / "data"), output=str(teacher), model=str(spec),
                          lr=p["pretrain_lr"], **common))
    m["pretrain"] = {"steps": args.steps, "cpu_s_per_step": round(c.cpu / args.steps, 3),
                     "wall_s_per_step": round(c.wall / args.steps, 3)}
    kd = {k: v for k, v in DISTILL_DEFAULTS.items() if k != "teacher"}
    with Clock() as c:
        train(TrainConfig(mode="distill", data=str(work / "data"), output=str(student), teacher=str(teacher),
                          **{**common, **kd, "lr": p["distill_lr"]}))
    m["distill"] = {"steps": args.steps, "cpu_s_per_step": round(c.cpu / args.steps, 3),
                    "wall_s_per_step": round(c.wall / args.steps, 3)}

    # 5. fine-tuning: examples per CPU second for each model on SST-2 and MRPC (the recipe's settings)
    from distilflow.tasks.evaluate.config import EvaluateConfig, glue_finetune
    from distilflow.tasks.evaluate.finetune import finetune_glue
    from distilflow.tasks.evaluate.suite import glue_data

    ev = EvaluateConfig(model=str(student), output=str(work / "eval"), tasks=("sst2", "mrpc"),
                        glue_dir=str(shared / "glue"), **p["finetune"], max_steps=args.finetune_steps, device="cpu")
    ft = glue_finetune(ev)
    m["finetune"] = {}
    for task in ("sst2", "mrpc"):
        d = glue_data(ev.replace(max_steps=0), task)
        for role, path in (("teacher", teacher), ("student", student)):
            with Clock() as c:
                r = finetune_glue(str(path), task, d.train, d.held_out[:64], ft, seed=0)
            ex = r["steps"] * ft.batch_size
            m["finetune"][f"{task}-{role}"] = {"examples": ex, "cpu_s_per_example": round(c.cpu / ex, 5),
                                               "wall_s_per_example": round(c.wall / ex, 5), "n_train": len(d.train),
                                               "n_eval": len(d.held_out)}
    out["load_after"] = os.getloadavg()
    out["estimate"] = estimate(out, p)
    out["architecture"] = architecture(work, args.threads_speed)
    (work / "estimate.json").write_text(json.dumps(out, indent=2))
    return _finish(out, args)


def _finish(out: dict[str, Any], args: argparse.Namespace) -> int:
    print(json.dumps(out, indent=2))
    if args.docs:
        from distilflow.tasks.pipeline.replicate import pipeline_command, planned_doc, write_plan

        est = {k: v for k, v in out["estimate"].items() if k != "total"}
        measured = {"command": f"nice -n 10 .venv/bin/python scripts/replicate_estimate.py --threads {out['threads']}",
                    "parallel_assumed": out["parallel_assumed"], "load": [out.get("load_before"), out.get("load_after")],
                    "train_tokens": out.get("train_tokens"), **out["measured"]}
        doc = planned_doc(args.preset, pipeline_command("runs/replicate", "../shared/data", args.preset), est, measured)
        doc["architecture_check"] = out.get("architecture")
        write_plan(args.docs, doc)
    return 0


def architecture(work: Path, threads: int) -> dict[str, Any]:
    """Parameters and CPU inference rows/s of the recipe's teacher and student architectures (the short-run
    models: weights do not change either number), on SST-2 dev sentences at batch 32."""
    import torch

    from distilflow.tasks.evaluate.glue import read_glue_file
    from distilflow.tasks.pipeline.replicate import count_params, measure_speed

    torch.set_num_threads(threads)
    shared = REPO.parent / "shared" / "data"
    texts = [e.text_a for e in read_glue_file(str(shared / "glue" / "sst2" / "stsa.binary.dev"), "sst2").examples]
    models = {"teacher": str(work / "teacher"), "student": str(work / "student")}
    params = {k: count_params(v) for k, v in models.items()}
    speed = measure_speed(models, texts, batch_size=32)
    return {"params": params, "cpu_rows_per_s": speed, "threads": threads, "rows": len(texts), "batch_size": 32,
            "param_reduction": round(1 - params["student"] / params["teacher"], 4),
            "speedup": round(speed["student"] / speed["teacher"], 4), "load": os.getloadavg()}


def estimate(out: dict[str, Any], p: dict[str, Any]) -> dict[str, Any]:
    """Idle-machine wall seconds per stage: measured CPU seconds per unit x the recipe's units / PARALLEL."""
    m = out["measured"]
    seeds, epochs, kd = p["eval_seeds"], p["finetune"]["epochs"], bool(p.get("task_distill"))
    est: dict[str, float] = {
        "vocab": m.get("vocab", {}).get("cpu_s", 0),  # single-threaded: no division
        "prepare": (m.get("prepare-data", {}).get("cpu_s", 0) + m.get("prepare-heldout", {}).get("cpu_s", 0)),
        "pretrain": m["pretrain"]["cpu_s_per_step"] * p["pretrain_steps"] / out["parallel_assumed"],
        "distill": m["distill"]["cpu_s_per_step"] * p["distill_steps"] / out["parallel_assumed"],
    }
    # per task and seed: teacher, student, both from scratch (same cost as their architecture), the distilled
    # student (a student run plus one teacher inference pass over the training set, ~1/3 of a training epoch)
    ft = 0.0
    for task in ("sst2", "mrpc"):
        t, s = m["finetune"][f"{task}-teacher"], m["finetune"][f"{task}-student"]
        n = t["n_train"] * epochs
        runs_t, runs_s = 2, (3 if kd else 2)  # teacher + teacher-scratch; student + student-scratch (+ distilled)
        per_seed = n * (runs_t * t["cpu_s_per_example"] + runs_s * s["cpu_s_per_example"]) \
            + (t["n_train"] * t["cpu_s_per_example"] / 3 if kd else 0)  # the teacher's soft targets: a forward pass
        # scoring dev after each run: a forward pass (~1/3 of a training step per example)
        per_seed += t["n_eval"] * (runs_t * t["cpu_s_per_example"] + runs_s * s["cpu_s_per_example"]) / 3
        ft += seeds * per_seed + seeds * (runs_t + runs_s) * RUN_OVERHEAD_CPU_S
    est["finetune"] = ft / out["parallel_assumed"]
    est["evaluate-other (mlm, bias, speed, fill-mask)"] = 120.0
    est = {k: round(v) for k, v in est.items()}
    est["total"] = sum(est.values())
    return est


if __name__ == "__main__":
    sys.exit(main())
