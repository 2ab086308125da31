"""Prefect flows for training: ``pretrain_flow`` (BERT teacher, MLM + NSP) and ``distill_flow`` (DistilBERT).

Each flow runs one Prefect task, ``train``, tagged ``gpu``: create a tag concurrency limit
(``prefect concurrency-limit create gpu <number of GPUs per worker>``) so that two training jobs never
share a GPU by accident. The task either

* runs :func:`distilflow.tasks.train.loop.train` in this process (``launcher="inprocess"``; CPU default), or
* launches ``torchrun --standalone --nproc-per-node N -m distilflow.tasks.train run CONFIG`` as a
  subprocess (``launcher="torchrun"``; the default when CUDA is available, N = number of GPUs) and
  streams its output into the Prefect logger.

Both ways the run's readable metrics lines reach the Prefect log; progress (steps) is a progress artifact
and the loss curves a markdown artifact.
"""

from __future__ import annotations

import os
import subprocess
from collections import deque
from collections.abc import Callable
from typing import Any

from prefect import get_run_logger, task
from tqdm import tqdm

from distilflow.flows.common import ProgressArtifact, config_flow, publish
from distilflow.tasks.core import procs
from distilflow.tasks.train.checkpoint import read_curves_png, read_metrics, read_summary
from distilflow.tasks.train.config import DISTILL_DEFAULTS, DISTILL_ONLY, PRETRAIN_ONLY, TrainConfig
from distilflow.tasks.train.launch import launch_command, resolve_launcher, write_launch_config
from distilflow.tasks.train.loop import train
from distilflow.tasks.train.metrics import format_line, parse_step
from distilflow.tasks.train.report import curves_image_markdown, loss_curve_markdown


def _stream(cmd: list[str], on_line: Callable[[str], None], env: dict[str, str]) -> tuple[int, list[str]]:
    tail: deque[str] = deque(maxlen=60)
    # dies with this process even if it is SIGKILLed: PR_SET_PDEATHSIG (this thread reads its output until it
    # exits, so it outlives it), and its ranks watch this process themselves (tasks/core/procs.py)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                          env={**env, **procs.watch_env()}, preexec_fn=procs.die_with_parent) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            on_line(line)
        return proc.wait(), list(tail)


@task(name="train", tags=["gpu"])
def train_task(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """One training job (1 process, or N torchrun processes on this host's GPUs)."""
    cfg = TrainConfig.from_dict(cfg_dict)
    logger = get_run_logger()
    launcher, nproc = resolve_launcher(cfg.launcher, cfg.nproc_per_node)
    # updates go out from the artifact's own thread: the training loop calls on_log between steps
    with ProgressArtifact(f"{cfg.mode} -> {cfg.output}") as progress:
        last = [0.0]

        def on_progress(step: int, total: int) -> None:
            pct = 100.0 * step / max(1, total)
            if pct - last[0] >= 1.0 or pct >= 100.0:  # at most ~100 artifact updates per run
                progress.update(pct)
                last[0] = pct

        def on_log(rec: dict[str, Any]) -> None:
            with tqdm.external_write_mode():  # the line above the run's progress bar, not through it
                logger.info(format_line(rec))
            if "total_steps" in rec:
                on_progress(rec["step"], rec["total_steps"])

        logger.info(f"{cfg.mode}: launcher={launcher} processes={nproc} output={cfg.output}")
        if launcher == "inprocess":
            summary = train(cfg, on_log=on_log)
        else:
            cmd = launch_command(write_launch_config(cfg), nproc, torchrun=launcher == "torchrun")
            logger.info("launching: " + " ".join(cmd))

            def on_line(line: str) -> None:
                if line.strip():
                    logger.info(line)
                if (pos := parse_step(line)) is not None:
                    on_progress(*pos)

            env = {**os.environ, "DISTILFLOW_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}
            rc, tail = _stream(cmd, on_line, env)
            if rc != 0:
                raise RuntimeError(f"training exited with code {rc}; last lines:\n" + "\n".join(tail[-30:]))
            summary = read_summary(cfg.output)
        progress.update(100.0)
    publish(loss_curve_markdown(cfg, read_metrics(cfg.output), summary)
            + curves_image_markdown(read_curves_png(cfg.output)), key=f"{cfg.mode}-loss-curves",
            description=f"{cfg.mode} loss curves and held-out accuracy")
    return summary


@config_flow(TrainConfig, name="pretrain", fixed={"mode": "pretrain"}, skip=DISTILL_ONLY, log_prints=True)
def pretrain_flow(cfg: TrainConfig) -> dict[str, Any]:
    """BERT pretraining (MLM + NSP) on a prepared folder."""
    return train_task(cfg.to_dict())


@config_flow(TrainConfig, name="distill", fixed={"mode": "distill"}, skip=PRETRAIN_ONLY,
             defaults=DISTILL_DEFAULTS, log_prints=True)
def distill_flow(cfg: TrainConfig) -> dict[str, Any]:
    """DistilBERT distillation from ``teacher`` (DistilBERT's lr 5e-4, mlm_smoothing 0.7 and max_grad_norm 5
    unless given)."""
    return train_task(cfg.to_dict())


def run_pretrain(cfg: TrainConfig) -> int:
    print(summary_line(cfg, pretrain_flow(**_flow_params(cfg))))
    return 0


def run_distill(cfg: TrainConfig) -> int:
    print(summary_line(cfg, distill_flow(**_flow_params(cfg))))
    return 0


def summary_line(cfg: TrainConfig, s: dict[str, Any]) -> str:
    ev = s.get("eval")
    msg = f"{cfg.mode}: {s.get('steps')} steps -> {cfg.output}"
    if ev:
        msg += f"; held-out masked-token accuracy {ev['accuracy']:.3f} (majority {ev['majority_baseline']:.3f})"
    if s.get("teacher_eval"):
        msg += f", teacher {s['teacher_eval']['accuracy']:.3f}"
    return msg


def _flow_params(cfg: TrainConfig) -> dict[str, Any]:
    """The config as the flow's parameters (``mode`` is fixed by the flow, the other command's fields are
    not parameters of this one)."""
    other = DISTILL_ONLY if cfg.mode == "pretrain" else PRETRAIN_ONLY
    return {k: v for k, v in cfg.to_dict().items() if k != "mode" and k not in other}
