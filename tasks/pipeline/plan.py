"""What the pipeline runs, worked out before it runs: the corpus split, each stage's settings, the checks
that fail fast. Plain functions of :class:`PipelineConfig` (no Prefect, no torch)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from distilflow.tasks.core.errors import InputError
from distilflow.tasks.core.io import expand_inputs, join, write_json
from distilflow.tasks.pipeline.config import DEBUG_TEACHER, PipelineConfig


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
        if path and not os.path.isdir(path):
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
    from distilflow.tasks.prepare.demo_corpus import write_demo_corpus

    train, held = write_demo_corpus(join(cfg.output, "demo-corpus"), seed=cfg.seed)
    return Corpus(train, held, "embedded demo corpus (generated country facts, tasks/prepare/demo_corpus.py)")


def teacher_model_spec(cfg: PipelineConfig, tokenizer: str) -> str:
    """The ``--config`` of pretraining: a preset name, a .json path, or (debug) a config written here."""
    spec = cfg.p("teacher_config")
    if spec != "debug":
        return spec
    from transformers import AutoTokenizer

    path = join(cfg.output, "teacher-config.json")
    write_json(path, {**DEBUG_TEACHER, "vocab_size": len(AutoTokenizer.from_pretrained(tokenizer))})
    return path


def train_settings(cfg: PipelineConfig, heldout: str, mode: str) -> dict[str, Any]:
    """TrainConfig fields of the pretrain / distill stage (``mode``), from the preset.

    ``resume``: a pipeline killed during training continues from the last checkpoint (every 10% of the steps).
    """
    steps = cfg.p("pretrain_steps" if mode == "pretrain" else "distill_steps")
    return {"batch_size": cfg.p("batch_size"), "seed": cfg.seed, "eval_data": heldout,
            "eval_sequences": cfg.p("eval_sequences"), "log_every": 20, "resume": True, "max_steps": steps,
            "lr": cfg.p("pretrain_lr" if mode == "pretrain" else "distill_lr"), "save_every": max(1, steps // 10)}


def eval_tasks(cfg: PipelineConfig) -> list[str]:
    """The evaluate stage's benchmarks: held-out MLM and the bias probe, plus GLUE/SQuAD when data is given."""
    return ["mlm", "bias"] + list(cfg.glue_tasks if cfg.glue_dir else ()) + (["squad"] if cfg.squad_dev else [])
