"""What a training run reports: windowed means of the loss terms, one JSON record per interval, one line.

* :class:`Window` sums the named loss terms of every micro-batch (as device tensors: no host sync per
  step) and turns them into one record per ``log_every`` steps: means over the window (and over ranks
  under DDP), learning rate, tokens/s, MFU on a GPU. The records go to ``OUT/metrics.jsonl`` only.
* :func:`format_line` is what a person reads, one line per record:
  ``step 120/300  loss 3.41 (mlm 2.9 nsp 0.51)  acc 0.21  lr 9.1e-4  1.2k tok/s``;
  :func:`parse_step` reads the step back (the flow's progress artifact for a torchrun subprocess).
* :class:`ProgressBar`: one bar per run (steps, with tokens/s), drawn only on a terminal; lines are
  written above it.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

# loss-term key -> short name in the line, in the order shown
_TERMS = {"loss_ce": "ce", "loss_mlm": "mlm", "loss_nsp": "nsp", "loss_cos": "cos"}
_STEP = re.compile(r"^step (\d+)/(\d+) ")


class Window:
    """Running sums of one logging interval (rank-local until :meth:`record`)."""

    def __init__(self) -> None:
        self.seen = 0  # non-padding tokens of the whole run (this rank; never reset)
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens, self.flops, self.steps, self.t0 = 0, 0.0, 0, time.perf_counter()

    def add_micro(self, terms: dict[str, torch.Tensor], n_micro: int, tokens: int, flops: float) -> None:
        """One micro-batch: its terms weigh ``1 / n_micro`` of the step (the mean over the accumulation)."""
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.float() / n_micro
        self.tokens += tokens
        self.seen += tokens
        self.flops += flops

    def end_step(self, grad_norm: torch.Tensor) -> None:
        self.sums["grad_norm"] = self.sums.get("grad_norm", 0.0) + grad_norm.detach().float()
        self.steps += 1

    def record(self, step: int, total: int, epoch: int, lr: float, world: int, device: torch.device,
               peak_flops: float | None) -> dict[str, Any]:
        """The interval's record (means over steps and ranks; tokens and FLOPs summed over ranks)."""
        keys = sorted(self.sums)
        vec = torch.stack([self.sums[k] / self.steps for k in keys])  # [K] one value per term
        tokens, flops = self.tokens, self.flops
        if world > 1:
            dist.all_reduce(vec)
            vec /= world
            tf = torch.tensor([tokens, flops], dtype=torch.float64, device=device)
            dist.all_reduce(tf)
            tokens, flops = int(tf[0]), float(tf[1])
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - self.t0
        rec: dict[str, Any] = {"step": step, "total_steps": total, "epoch": epoch,
                               **{k: round(float(v), 6) for k, v in zip(keys, vec.tolist(), strict=True)},
                               "lr": lr, "tokens_per_s": round(tokens / dt, 1)}
        if peak_flops:
            rec["mfu"] = round(flops / dt / (peak_flops * world), 4)
        self.reset()
        return rec


def format_line(rec: dict[str, Any]) -> str:
    """One readable line for a metrics record (training interval or held-out evaluation)."""
    if "eval_accuracy" in rec:
        return (f"eval  step {rec['step']}: held-out masked-token accuracy {rec['eval_accuracy']:.3f} "
                f"(majority {rec['eval_majority_baseline']:.3f}), loss {rec['eval_loss']:.3g}")
    terms = " ".join(f"{short} {rec[k]:.3g}" for k, short in _TERMS.items() if k in rec)
    line = f"step {rec['step']}/{rec['total_steps']}  loss {rec['loss']:.3g} ({terms})"
    if "mlm_acc" in rec:
        line += f"  acc {rec['mlm_acc']:.2f}"
    line += f"  lr {_short_exp(rec['lr'])}  {_si(rec['tokens_per_s'])} tok/s"
    if "mfu" in rec:
        line += f"  mfu {100 * rec['mfu']:.1f}%"
    return line


def parse_step(line: str) -> tuple[int, int] | None:
    """``(step, total)`` from a :func:`format_line` training line, else None."""
    m = _STEP.match(line)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _short_exp(x: float) -> str:
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{x:.1e}").replace("e+", "e")


def _si(x: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


class ProgressBar:
    """One bar per run (rank 0, on a terminal, unless DISTILFLOW_PROGRESS=0); lines go above it."""

    def __init__(self, desc: str, total: int, start: int, enabled: bool):
        show = enabled and os.environ.get("DISTILFLOW_PROGRESS", "1") != "0" and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", disable=not show, dynamic_ncols=True)

    def step(self) -> None:
        self.bar.update(1)

    def show(self, rec: dict[str, Any]) -> None:
        if "tokens_per_s" in rec:
            self.bar.set_postfix_str(f"{_si(rec['tokens_per_s'])} tok/s", refresh=False)

    def write(self, line: str) -> None:
        if self.bar.disable:
            print(line, flush=True)
        else:
            self.bar.write(line)

    def close(self) -> None:
        self.bar.close()


class Reporter:
    """Rank 0: each record to ``OUT/metrics.jsonl`` (and TensorBoard), and one line to the terminal -- or to
    ``on_log``, which then shows it (the Prefect flow logs it). Other ranks report nothing."""

    def __init__(self, run: Any, cfg: Any, total: int, start: int,
                 on_log: Callable[[dict[str, Any]], None] | None, main: bool):
        self.run, self.on_log, self.main = run, on_log, main
        self.bar = ProgressBar(cfg.mode, total, start, enabled=main)
        self.tb = _tensorboard(os.path.join(run.path, "tensorboard")) if cfg.tensorboard and main else None

    def step(self) -> None:
        self.bar.step()

    def __call__(self, rec: dict[str, Any]) -> None:
        if not self.main:
            return
        self.run.append_metrics(rec)
        if self.tb is not None and "loss" in rec:
            for k, v in rec.items():
                if isinstance(v, float):
                    self.tb.add_scalar(f"train/{k}", v, rec["step"])
        self.bar.show(rec)
        if self.on_log is not None:
            self.on_log(rec)
        else:
            self.bar.write(format_line(rec))

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _tensorboard(path: str) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard is not installed; --tensorboard ignored", file=sys.stderr)
        return None
    return SummaryWriter(path)
