"""Everything a training run reads from or writes to its output folder ``OUT`` -- and nothing else does.

    OUT/train_config.json            the TrainConfig of the run
    OUT/metrics.jsonl                one JSON record per log interval (+ held-out evaluation records)
    OUT/checkpoints/step-XXXXXXXX/   model (safetensors), optimizer.pt, scheduler.pt, rng-rank<r>.pt,
                                     trainer_state.json (step, data position, world size, fingerprint)
    OUT/config.json, model.safetensors, tokenizer files, README.md (model card), summary.json, curves.png

A checkpoint is written into ``.tmp-step-X`` and renamed when complete, so a killed run never leaves a
half-written one; the newest ``keep_checkpoints`` are kept. Resuming checks the config fingerprint (the
fields that change the weights) and the world size (the data order depends on it).

``OUT`` on object storage (``s3://...``, any fsspec URL): the run works in a local folder
(:func:`distilflow.tasks.core.remote.work_dir_for`, the same on every rank of a host) that rank 0 pushes
to the bucket -- the checkpoints, ``metrics.jsonl`` and ``train_config.json`` after each checkpoint (each
file atomic, the manifest last), everything else when the run ends. ``--resume`` starts from what the
bucket holds (the local folder is refilled from it), so a run continues after its machine and disk are
gone. The config of record and the fingerprint keep the URL, never the local folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from distilflow.tasks.core import io, remote
from distilflow.tasks.core.hf import load_pretrained
from distilflow.tasks.core.io import write_json
from distilflow.tasks.core.stage import ResumeError
from distilflow.tasks.train.config import TrainConfig
from distilflow.tasks.train.launch import Dist

# Pushed with every checkpoint (besides checkpoints/): what a resume on a clean machine needs.
_RESUME_FILES = ("metrics.jsonl", "train_config.json")


@contextlib.contextmanager
def staged_run(cfg: TrainConfig, d: Dist) -> Iterator[RunDir]:
    """The run's output folder: ``cfg.output`` itself, or for a bucket URL a local working folder that
    rank 0 pushes (what is left when the block succeeds; nothing on failure, the checkpoints pushed so
    far stay for ``--resume``). Every rank works in the same local path."""
    if d.main:
        with remote.staged_output(cfg.output, remote.work_dir_for(cfg.output)
                                  if remote.is_remote(cfg.output) else None) as stage:
            yield RunDir(cfg, stage)
    else:
        local = remote.work_dir_for(cfg.output) if remote.is_remote(cfg.output) else cfg.output
        yield RunDir(cfg, remote.Staged(cfg.output, Path(local)), push=False)


class RunDir:
    """The output folder of one training run (``path``: where files are written, local)."""

    def __init__(self, cfg: TrainConfig, stage: remote.Staged | None = None, push: bool = True):
        self.cfg = cfg
        self.stage = stage or remote.Staged(cfg.output, Path(cfg.output))
        self.path, self.url, self._push = str(self.stage.local), cfg.output, push and self.stage.remote
        self.metrics_path = os.path.join(self.path, "metrics.jsonl")
        self.summary_path = os.path.join(self.path, "summary.json")

    # -- state of the folder -------------------------------------------------------------------------
    def checkpoints(self) -> list[str]:
        root = os.path.join(self.path, "checkpoints")
        if not os.path.isdir(root):
            return []
        return sorted(os.path.join(root, d) for d in os.listdir(root) if d.startswith("step-"))

    def finished(self) -> dict[str, Any] | None:
        """The summary of a finished run with the same config (nothing to do twice), else None. Read where
        the output is (the bucket for a URL): call it before :func:`staged_run`."""
        return finished_summary(self.cfg)

    def open(self, d: Dist | None = None) -> str | None:
        """Make the folder; the checkpoint to resume from (None: start fresh). Refuses to overwrite.

        Bucket output: rank 0 refuses without ``--resume`` when the bucket holds checkpoints, empties the
        local working folder (the bucket is the truth, not what an earlier attempt left on this disk) and,
        with ``--resume``, fills it from the bucket; the other ranks wait for it."""
        if self.stage.remote and (d is None or d.main):
            if not self.cfg.resume and remote.list_remote(io.join(self.url, "checkpoints")):
                raise ResumeError(f"{self.url} already has checkpoints; pass --resume to continue, or use a "
                                  "new --output")
            remote.clear_local(self.stage)
            self.stage.local.mkdir(parents=True, exist_ok=True)
            if self.cfg.resume:
                self.stage.pull()
        if d is not None:
            d.barrier()
        existing = self.checkpoints()
        if existing and not self.cfg.resume:
            raise ResumeError(f"{self.path} already has checkpoints; pass --resume to continue, or use a new "
                              "--output")
        os.makedirs(self.path, exist_ok=True)
        return existing[-1] if existing else None

    def push_checkpoints(self) -> None:
        """Rank 0, after a checkpoint is in place (and old ones pruned): it, the metrics so far and the
        config of record to the bucket (no-op for a local output)."""
        if not self._push:
            return
        # metrics first: killed in between, the bucket's metrics reach at least its newest checkpoint
        # (a resume drops records after the step it continues from, never misses some before it)
        for name in _RESUME_FILES:
            if os.path.exists(os.path.join(self.path, name)):
                self.stage.push(name)
        self.stage.push("checkpoints")

    def start(self, step: int) -> None:
        """Rank 0, before the first step: the config of record; metrics after ``step`` dropped (they are
        produced again by the resumed run)."""
        write_json(os.path.join(self.path, "train_config.json"), self.cfg.to_dict())
        if self._push:
            self.stage.push("train_config.json")
        if not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path) as f:
            lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
        with open(self.metrics_path + ".tmp", "w") as f:
            f.writelines(lines)
        os.replace(self.metrics_path + ".tmp", self.metrics_path)

    def append_metrics(self, rec: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    # -- checkpoints -----------------------------------------------------------------------------------
    def save_checkpoint(self, d: Dist, step: int, model: Any, optimizer: torch.optim.Optimizer,
                        scheduler: Any, position: dict[str, int]) -> str:
        """All ranks call this (each saves its RNG state). Atomic: written to a temp folder, then renamed."""
        root = os.path.join(self.path, "checkpoints")
        final = os.path.join(root, f"step-{step:08d}")
        tmp = os.path.join(root, f".tmp-step-{step:08d}")
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            model.save_pretrained(tmp, safe_serialization=True)
            torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
            torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
            write_json(os.path.join(tmp, "train_config.json"), self.cfg.to_dict())
            write_json(os.path.join(tmp, "trainer_state.json"),
                       {"step": step, "position": position, "world_size": d.world,
                        "fingerprint": self.cfg.fingerprint_for_resume()})
        d.barrier()
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state(d.device)
        torch.save(rng, os.path.join(tmp, f"rng-rank{d.rank}.pt"))
        d.barrier()
        if d.main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.checkpoints()[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            self.push_checkpoints()
        d.barrier()
        return final

    def load_checkpoint(self, d: Dist, ckpt: str, model: Any, optimizer: torch.optim.Optimizer,
                        scheduler: Any) -> int:
        """Restore model, optimizer, scheduler and this rank's RNG; returns the step to continue from."""
        with open(os.path.join(ckpt, "trainer_state.json")) as f:
            state = json.load(f)
        if state["fingerprint"] != self.cfg.fingerprint_for_resume():
            raise ResumeError(f"{ckpt} was written with another config; --resume needs the same settings "
                              f"(only {', '.join(self.cfg.run_only_fields())} may change). Use a new --output.")
        if state["world_size"] != d.world:
            raise ResumeError(f"{ckpt}: written by {state['world_size']} process(es), now {d.world}; an exact "
                              "resume needs the same number (the data order depends on it)")
        loaded = load_pretrained(type(model), ckpt)
        model.load_state_dict(loaded.state_dict())
        optimizer.load_state_dict(torch.load(os.path.join(ckpt, "optimizer.pt"), weights_only=True,
                                             map_location=d.device))
        scheduler.load_state_dict(torch.load(os.path.join(ckpt, "scheduler.pt"), weights_only=True))
        rng = torch.load(os.path.join(ckpt, f"rng-rank{d.rank}.pt"), weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"], d.device)
        return int(state["step"])

    # -- the final model --------------------------------------------------------------------------------
    def save_final(self, model: Any, tokenizer: Any, summary: dict[str, Any]) -> None:
        """Rank 0: the model and tokenizer (``from_pretrained(OUT)``) and ``summary.json``."""
        model.save_pretrained(self.path, safe_serialization=True)
        tokenizer.save_pretrained(self.path)
        write_json(self.summary_path, summary)

    def save_card(self, card: Any, curves_png: bytes | None) -> None:
        """Rank 0: ``curves.png`` and the model card ``README.md`` that shows it (each written atomically)."""
        if curves_png:
            _atomic_write(os.path.join(self.path, "curves.png"), curves_png)
        _atomic_write(os.path.join(self.path, "README.md"), card.render().encode())


def _atomic_write(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def finished_summary(cfg: TrainConfig) -> dict[str, Any] | None:
    """``OUT/summary.json`` (local or in the bucket) when OUT holds a finished run of the same config."""
    summary = io.join(cfg.output, "summary.json")
    with io.remote_errors(cfg.output):
        if not io.exists(summary):
            return None
        has_ckpt = (remote.list_remote(io.join(cfg.output, "checkpoints")) if remote.is_remote(cfg.output)
                    else RunDir(cfg).checkpoints())
        if not has_ckpt:
            return None
        done: dict[str, Any] = io.read_json(summary)
    return done if done.get("fingerprint") == cfg.fingerprint_for_resume() else None


def read_summary(output: str) -> dict[str, Any]:
    """``OUT/summary.json`` of a finished run (local path or URL)."""
    return dict(io.read_json(io.join(output, "summary.json")))


def read_curves_png(output: str) -> bytes | None:
    """``OUT/curves.png`` (local path or URL), None when the run drew none."""
    path = io.join(output, "curves.png")
    if not io.exists(path):
        return None
    return io.read_bytes(path)


def read_metrics(output: str, evals: bool = False) -> list[dict[str, Any]]:
    """The training records of ``OUT/metrics.jsonl`` (with ``evals``: the held-out records instead);
    ``output`` is a local path or URL."""
    path = io.join(output, "metrics.jsonl")
    if not io.exists(path):
        return []
    recs = [json.loads(ln) for ln in io.read_bytes(path).decode().splitlines() if ln.strip()]
    return [r for r in recs if ("eval_accuracy" in r) == evals and ("loss" in r or evals)]
