"""Prefect flows for training: ``pretrain_flow`` (BERT teacher, MLM + NSP) and ``distill_flow`` (DistilBERT).

Each flow runs one Prefect task, ``train``, tagged ``gpu``: create a tag concurrency limit
(``prefect concurrency-limit create gpu <number of GPUs per worker>``) so that two training jobs never
share a GPU by accident. The task either

* runs :func:`distilflow.tasks.train.loop.train` in this process (``launcher="inprocess"``; CPU default), or
* launches ``torchrun --standalone --nproc-per-node N -m distilflow.tasks.train.loop run CONFIG`` as a
  subprocess (``launcher="torchrun"``; the default when CUDA is available, N = number of GPUs) and
  streams its output into the Prefect logger.

Progress (steps) is a Prefect progress artifact; the loss curves are a markdown table artifact.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections import deque
from typing import Any, cast
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from distilflow.flows.common import markdown_table, publish
from distilflow.tasks.core.config import ConfigError
from distilflow.tasks.core.io import write_json
from distilflow.tasks.core.stage import ResumeError
from distilflow.tasks.train.data import DataError
from distilflow.tasks.train.loop import (
    DISTILL_DEFAULTS,
    TrainConfig,
    add_arguments,
    config_from_args,
    launch_command,
    read_metrics,
    train,
)

METRICS_PREFIX = "[metrics] "


def resolve_launcher(launcher: str, nproc_per_node: int) -> tuple[str, int]:
    """``auto``: torchrun on a CUDA host (one process per visible GPU), in-process on CPU."""
    import torch

    cuda = torch.cuda.is_available()
    nproc = nproc_per_node or (torch.cuda.device_count() if cuda else 1)
    if launcher == "auto":
        launcher = "torchrun" if cuda else "inprocess"
    if launcher == "inprocess" and nproc != 1:
        raise ConfigError(f"launcher inprocess runs one process; use --launcher torchrun for {nproc}")
    if launcher not in ("inprocess", "torchrun", "subprocess"):
        raise ConfigError(f"launcher: {launcher!r}; use auto, inprocess, torchrun or subprocess")
    return launcher, nproc


def loss_curve_markdown(cfg: TrainConfig, records: list[dict[str, Any]], summary: dict[str, Any],
                        points: int = 20) -> str:
    """A table of ~``points`` evenly spaced metric records (the loss curves) and the final numbers."""
    if records:
        idx = sorted({round(i * (len(records) - 1) / max(1, points - 1)) for i in range(points)})
        rows = [records[i] for i in idx]
    else:
        rows = []
    terms = ["loss_ce", "loss_mlm", "loss_cos"] if cfg.mode == "distill" else ["loss_mlm", "loss_nsp"]
    cols = ["step", "loss", *terms, "mlm_acc", "lr", "grad_norm", "tokens_per_s"]
    if any("mfu" in r for r in rows):
        cols.append("mfu")
    md = f"# {cfg.mode}: {cfg.output}\n\n## Loss curves\n\n" + markdown_table(rows, cols)
    ev = summary.get("eval")
    if ev:
        md += "\n## Held-out masked-token accuracy\n\n"
        table = [{"model": "student" if cfg.mode == "distill" else "model", **ev}]
        if summary.get("teacher_eval"):
            table.append({"model": "teacher", **summary["teacher_eval"]})
        md += markdown_table(table, ["model", "accuracy", "loss", "masked_tokens", "majority_baseline"])
    return md


def _stream(cmd: list[str], on_line, env: dict[str, str]) -> tuple[int, list[str]]:
    tail: deque[str] = deque(maxlen=60)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                          env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            on_line(line)
        return proc.wait(), list(tail)


@task(name="train", tags=["gpu"])
def train_task(cfg_dict: dict[str, Any], nproc_per_node: int = 0, launcher: str = "auto") -> dict[str, Any]:
    """One training job (1 process, or N torchrun processes on this host's GPUs)."""
    import json

    cfg = TrainConfig.from_dict(cfg_dict)
    logger = get_run_logger()
    launcher, nproc = resolve_launcher(launcher, nproc_per_node)
    progress = cast(UUID, create_progress_artifact(progress=0.0, description=f"{cfg.mode} -> {cfg.output}"))
    last = [0.0]

    def on_log(rec: dict[str, Any]) -> None:  # the metrics line itself is logged as printed
        pct = 100.0 * rec["step"] / max(1, rec["total_steps"])
        if pct - last[0] >= 1.0 or pct >= 100.0:  # at most ~100 artifact updates per run
            update_progress_artifact(progress, progress=pct)
            last[0] = pct

    logger.info(f"{cfg.mode}: launcher={launcher} processes={nproc} output={cfg.output}")
    if launcher == "inprocess":
        summary = train(cfg, on_log=on_log)
    else:
        os.makedirs(cfg.output, exist_ok=True)
        cfg_path = os.path.join(cfg.output, "launch_config.json")
        write_json(cfg_path, cfg.to_dict())
        cmd = launch_command(cfg_path, nproc, torchrun=launcher == "torchrun")
        logger.info("launching: " + " ".join(cmd))

        def on_line(line: str) -> None:
            if line.strip():
                logger.info(line)
            if line.startswith(METRICS_PREFIX):
                on_log(json.loads(line[len(METRICS_PREFIX):]))

        env = {**os.environ, "DISTILFLOW_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}
        rc, tail = _stream(cmd, on_line, env)
        if rc != 0:
            raise RuntimeError(f"training exited with code {rc}; last lines:\n" + "\n".join(tail[-30:]))
        with open(os.path.join(cfg.output, "summary.json")) as f:
            summary = json.load(f)
    update_progress_artifact(progress, progress=100.0)
    publish(loss_curve_markdown(cfg, read_metrics(cfg.output), summary), key=f"{cfg.mode}-loss-curves",
            description=f"{cfg.mode} loss curves and held-out accuracy")
    return summary


@flow(name="pretrain", log_prints=True)
def pretrain_flow(data: str, output: str, config: str = "mini", settings: dict[str, Any] | None = None,
                  nproc_per_node: int = 0, launcher: str = "auto") -> dict[str, Any]:
    """BERT pretraining (MLM + NSP) on a prepared folder. ``settings``: other TrainConfig fields."""
    # from_dict: flow parameters arrive JSON-shaped (lists where the config has tuples)
    cfg = TrainConfig.from_dict({**(settings or {}), "mode": "pretrain", "data": data, "output": output,
                                 "model": config})
    return train_task(cfg.to_dict(), nproc_per_node, launcher)


@flow(name="distill", log_prints=True)
def distill_flow(data: str, teacher: str, output: str, settings: dict[str, Any] | None = None,
                 nproc_per_node: int = 0, launcher: str = "auto") -> dict[str, Any]:
    """DistilBERT distillation from ``teacher``. ``settings``: other TrainConfig fields (DistilBERT's
    lr 5e-4, mlm_smoothing 0.7 and max_grad_norm 5 unless given)."""
    cfg = TrainConfig.from_dict({**DISTILL_DEFAULTS, **(settings or {}), "mode": "distill", "data": data,
                                 "output": output, "teacher": teacher})
    return train_task(cfg.to_dict(), nproc_per_node, launcher)


# -- command line ---------------------------------------------------------------------------------------
def _launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc-per-node", type=int, default=0,
                   help="training processes on this host (default 0: one per visible GPU, 1 on CPU)")
    p.add_argument("--launcher", choices=["auto", "inprocess", "torchrun", "subprocess"], default="auto",
                   help="auto (default): torchrun subprocess on CUDA hosts, in this process on CPU; "
                        "subprocess: one plain process (logs streamed)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pretrain a BERT teacher (MLM + NSP) on a prepared folder",
                       description="BERT pretraining (BertForPreTraining: MLM + NSP) from `distilflow prepare` "
                       "output. The final model in --output loads with transformers.pipeline('fill-mask').")
    add_arguments(p, "pretrain")
    _launch_args(p)
    p.set_defaults(func=_run("pretrain"))
    p = sub.add_parser("distill", help="distil a DistilBERT student from a BERT teacher",
                       description="DistilBERT distillation: student initialised from teacher layers, loss = "
                       "a_ce*KL*T^2 + a_mlm*CE + a_cos*(1-cos). The student in --output loads with "
                       "transformers.pipeline('fill-mask').")
    add_arguments(p, "distill")
    _launch_args(p)
    p.set_defaults(func=_run("distill"))


def _run(mode: str):
    def run(a: argparse.Namespace) -> int:
        try:
            cfg = config_from_args(a, mode)
            settings = {k: v for k, v in cfg.to_dict().items()
                        if k not in ("mode", "data", "output", "model", "teacher")}
            if mode == "pretrain":
                s = pretrain_flow(cfg.data, cfg.output, cfg.model, settings, a.nproc_per_node, a.launcher)
            else:
                s = distill_flow(cfg.data, cfg.teacher, cfg.output, settings, a.nproc_per_node, a.launcher)
        except (ConfigError, ResumeError, DataError, FileNotFoundError, ValueError) as e:
            print(f"distilflow {mode}: error: {e}", file=sys.stderr)
            return 2
        ev = s.get("eval")
        msg = f"{mode}: {s.get('steps')} steps -> {cfg.output}"
        if ev:
            msg += f"; held-out masked-token accuracy {ev['accuracy']:.3f} (majority {ev['majority_baseline']:.3f})"
        if s.get("teacher_eval"):
            msg += f", teacher {s['teacher_eval']['accuracy']:.3f}"
        print(msg)
        return 0

    return run
