"""What the pipeline runs, worked out before it runs: the corpus split, each stage's settings, the checks
that fail fast. Plain functions of :class:`PipelineConfig` (no Prefect, no torch)."""

from __future__ import annotations

import dataclasses
import os
import shlex
from dataclasses import dataclass
from typing import Any

from distilflow.tasks.core import remote
from distilflow.tasks.core.config import flag_of
from distilflow.tasks.core.errors import InputError
from distilflow.tasks.core.io import expand_inputs, is_local, join, write_json
from distilflow.tasks.pipeline.config import TEACHERS, PipelineConfig


@dataclass(frozen=True)
class Corpus:
    train: list[str]
    heldout: list[str]
    name: str  # for the report


def preflight(cfg: PipelineConfig) -> None:
    """Fail before any flow run starts: inputs exist, tokenizer/teacher folders exist."""
    if cfg.inputs:
        expand_inputs(list(cfg.inputs))
    if cfg.heldout:
        expand_inputs(list(cfg.heldout))
    for opt, path in (("--tokenizer", cfg.tokenizer), ("--teacher", cfg.teacher)):
        if path and not (os.path.isdir(path) if is_local(path) else remote.list_remote(path)):
            raise InputError(f"{opt} {path}: no such folder")


def split_corpus(cfg: PipelineConfig) -> Corpus:
    """Training and held-out files: the user's (``--heldout``, else the last input file), or the demo corpus."""
    if cfg.inputs:
        train = expand_inputs(list(cfg.inputs))
        if cfg.heldout:
            held = expand_inputs(list(cfg.heldout))
            train = [f for f in train if f not in set(held)]
        elif len(train) >= 2:
            train, held = train[:-1], train[-1:]
        else:
            raise InputError(f"{cfg.inputs[0]}: one input file; give --heldout FILE for evaluation data")
        return Corpus(train, held, f"{len(train)} input file(s); held out: "
                      f"{', '.join(os.path.basename(h) for h in held)}")
    train, held = demo_corpus(join(cfg.output, "demo-corpus"), cfg.seed)
    return Corpus(train, held, "embedded demo corpus (generated country facts, tasks/prepare/demo_corpus.py)")


def demo_corpus(folder: str, seed: int) -> tuple[list[str], list[str]]:
    """The demo corpus files in ``folder``; a bucket folder gets them written locally and uploaded (the
    same URLs on every machine, so a resumed pipeline sees the same inputs)."""
    from distilflow.tasks.prepare.demo_corpus import write_demo_corpus

    with remote.written_locally(folder) as local:
        train, held = write_demo_corpus(local, seed=seed)
    if is_local(folder):
        return train, held
    return ([join(folder, os.path.basename(p)) for p in train], [join(folder, os.path.basename(p)) for p in held])


def teacher_model_spec(cfg: PipelineConfig, tokenizer: str) -> str:
    """The ``--config`` of pretraining: a training preset name, a .json path, or (the pipeline's own sizes:
    debug, replicate) a config written here with the tokenizer's vocabulary size."""
    spec = cfg.p("teacher_config")
    if spec not in TEACHERS:
        return spec
    from transformers import AutoTokenizer

    from distilflow.tasks.core.hf import local_model

    path = join(cfg.output, "teacher-config.json")
    write_json(path, {**TEACHERS[spec], "vocab_size": len(AutoTokenizer.from_pretrained(local_model(tokenizer)))})
    return path


def train_settings(cfg: PipelineConfig, heldout: str, mode: str) -> dict[str, Any]:
    """TrainConfig fields of the pretrain / distill stage (``mode``), from the preset.

    ``resume``: a pipeline killed during training continues from the last checkpoint (every 10% of the steps).
    ``precision`` only when it is not ``auto``, so the stage records of earlier runs stay valid.
    """
    steps = cfg.p("pretrain_steps" if mode == "pretrain" else "distill_steps")
    return {"batch_size": cfg.p("batch_size"), "seed": cfg.seed, "eval_data": heldout,
            "eval_sequences": cfg.p("eval_sequences"), "log_every": 20, "resume": True, "max_steps": steps,
            "lr": cfg.p("pretrain_lr" if mode == "pretrain" else "distill_lr"), "save_every": max(1, steps // 10),
            **({"precision": cfg.precision} if cfg.precision != "auto" else {})}


def eval_tasks(cfg: PipelineConfig) -> list[str]:
    """The evaluate stage's benchmarks: held-out MLM and the bias probe, plus GLUE/SQuAD when data is given
    (GLUE tasks: --glue-tasks, else the preset's)."""
    glue = list(cfg.p("glue_tasks", ())) if cfg.glue_dir else []
    return ["mlm", "bias"] + glue + (["squad"] if cfg.squad_dev else [])


def eval_settings(cfg: PipelineConfig) -> dict[str, Any]:
    """EvaluateConfig fields the preset sets beyond the defaults (replicate: seeds, task distillation, baselines,
    the fine-tuning recipe). Empty for the other presets, so their stage records stay as they were."""
    out: dict[str, Any] = {}
    if cfg.p("eval_seeds"):
        out["seeds"] = cfg.p("eval_seeds")
    if cfg.p("task_distill") and cfg.glue_dir:
        out["task_distill"] = True
    if cfg.p("scratch_baselines") and cfg.glue_dir:
        out["scratch_baselines"] = True
    if cfg.precision == "bf16":  # also on a CPU that computes it natively
        out["cpu_bf16"] = True
    elif cfg.precision == "fp32":  # on CUDA too
        out["bf16"] = False
    return {**out, **(cfg.p("finetune") or {})}


def command_line(cfg: PipelineConfig) -> str:
    """The ``distilflow pipeline`` command that runs ``cfg`` (options that differ from their defaults)."""
    parts = ["distilflow", "pipeline"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not f.metadata.get("cli", True) or value == f.default or value is None:
            continue
        flag = flag_of(f)
        if isinstance(value, bool):
            parts.append(flag if value else f"--no-{flag.removeprefix('--')}")
        elif isinstance(value, tuple):
            parts += [flag, ",".join(value)] if f.metadata.get("sep") else [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)
