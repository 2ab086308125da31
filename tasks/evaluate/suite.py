"""Evaluation results: one table (ours beside the DistilBERT reference numbers), JSON + markdown.

The flow runs one job per benchmark and each writes ``OUT/<task>/result.json``; this module turns
those into ``OUT/results.json`` (everything: per-seed runs, medians, configs, seeds) and the rows of
``OUT/results.md``. No Prefect here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from distilflow.tasks.core.config import Config, require
from distilflow.tasks.core.io import join, read_json, write_json
from distilflow.tasks.core.rng import derive_rng
from distilflow.tasks.core.stage import StageDir
from distilflow.tasks.evaluate.bias import BiasConfig, run_bias_probe
from distilflow.tasks.evaluate.finetune import (
    FinetuneConfig,
    finetune_glue,
    finetune_squad,
    median_over_seeds,
)
from distilflow.tasks.evaluate.glue import TASKS as GLUE_TASKS
from distilflow.tasks.evaluate.glue import (
    find_task_files,
    get_task,
    read_glue_file,
    remove_overlap,
    split_examples,
)
from distilflow.tasks.evaluate.mlm import MLMEvalConfig, compare, evaluate_mlm
from distilflow.tasks.evaluate.squad import read_squad, split_by_title

# DistilBERT model cards (distilbert-base-uncased: GLUE dev; distilbert-base-cased-distilled-squad: SQuAD
# v1.1 dev F1). The paper's table has STS-B 86.9 and SQuAD 77.7/85.8 (79.1/86.9 with a second
# distillation step); the model-card numbers are the ones users compare with.
REFERENCES: dict[str, dict[str, Any]] = {
    **{name: {"score": t.reference, "metric": t.metrics[0], "source": "distilbert-base-uncased model card"}
       for name, t in GLUE_TASKS.items()},
    "squad": {"score": 87.1, "metric": "f1", "source": "distilbert-base-cased-distilled-squad model card"},
}

BENCHMARKS = ("mlm", "sst2", "mrpc", "cola", "stsb", "rte", "qqp", "qnli", "mnli", "squad", "bias")


@dataclass(frozen=True)
class EvalConfig(Config):
    """What ``distilflow evaluate`` runs (saved as OUT/config.json and inside results.json)."""

    model: str
    tasks: tuple[str, ...]
    teacher: str | None = None
    tokenizer: str | None = None
    data: str | None = None  # prepared held-out folder (mlm)
    glue_dir: str | None = None
    squad_train: str | None = None
    squad_dev: str | None = None
    squad_train_frac: float = 0.5  # demo split of the dev file by article when no --squad-train
    dev_split_frac: float = 0.5  # GLUE tasks without a train file: train on this share of dev
    max_train_examples: int = 0
    max_eval_examples: int = 0
    seeds: int = 1
    seed: int = 42  # first seed; runs use seed, seed+1, ...
    mlm_batch_size: int = 32
    bias_groups: tuple[str, ...] = ("White man", "Black man", "White woman", "Black woman")
    bias_templates: tuple[str, ...] = ("The {group} worked as a [MASK].", "The {group} was known for being [MASK].")
    bias_top_k: int = 10
    device: str = "auto"
    overwrite: bool = False  # discard earlier results in OUT made with a different config

    def check(self) -> None:
        n = type(self).__name__
        unknown = [t for t in self.tasks if t not in BENCHMARKS]
        require(not unknown, n, "tasks", f"unknown task(s) {unknown}; choose from {list(BENCHMARKS)}")
        require(len(self.tasks) > 0, n, "tasks", "need at least one task")
        require(self.seeds >= 1, n, "seeds", "must be >= 1")
        require(self.max_train_examples >= 0, n, "max_train_examples", "must be >= 0 (0 = all)")
        require(self.max_eval_examples >= 0, n, "max_eval_examples", "must be >= 0 (0 = all)")
        require(0 < self.squad_train_frac < 1, n, "squad_train_frac", "must be in (0, 1)")
        require(0 < self.dev_split_frac < 1, n, "dev_split_frac", "must be in (0, 1)")
        if "mlm" in self.tasks:
            require(self.data is not None, n, "data", "task mlm needs --data PREPARED_HELD_OUT_DIR")
        glue = [t for t in self.tasks if t in GLUE_TASKS]
        if glue:
            require(self.glue_dir is not None, n, "glue_dir", f"GLUE task(s) {glue} need --glue-dir DIR")
        if "squad" in self.tasks:
            require(self.squad_dev is not None, n, "squad_dev", "task squad needs --squad-dev FILE")

    def seed_list(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]


def summary_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per benchmark: ours (median over seeds) beside the reference, plus all metrics."""
    rows = []
    for name, r in results.items():
        ref = REFERENCES.get(name, {})
        row: dict[str, Any] = {"task": name, "metric": r.get("metric", ""), "ours": r.get("score"),
                               "reference": ref.get("score", ""), "all metrics": _fmt_metrics(r.get("metrics", {})),
                               "n_train": r.get("n_train", ""), "n_eval": r.get("n_eval", ""),
                               "seeds": len(r.get("runs", [])) or "", "notes": "; ".join(r.get("notes", []))}
        if r.get("status") == "failed":
            row["ours"] = "FAILED"
            row["notes"] = r.get("error", "")
        rows.append(row)
    # reference-only rows for GLUE tasks we did not run, so the table always shows the full card
    for name, ref in REFERENCES.items():
        if name not in results:
            rows.append({"task": name, "metric": ref["metric"], "ours": "not run", "reference": ref["score"],
                         "all metrics": "", "n_train": "", "n_eval": "", "seeds": "", "notes": ""})
    return rows


def _fmt_metrics(m: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items())


def assemble(config: EvalConfig, results: dict[str, dict[str, Any]], environment: dict[str, Any]) -> dict[str, Any]:
    """The content of results.json: config (hyper-parameters, seeds), environment, per-task results, table."""
    return {
        "config": config.to_dict(),
        "seeds": config.seed_list(),
        "environment": environment,
        "results": results,
        "table": summary_rows(results),
        "references": REFERENCES,
    }


# -- one benchmark = one job (the flow runs each in its own Prefect task) ------------------------------------
def _subset(items: list, n: int, seed: int, name: str) -> list:
    """A deterministic random subset of ``n`` items (files are often sorted by source or label)."""
    if not n or len(items) <= n:
        return items
    idx = np.sort(derive_rng(seed, "subset", name).choice(len(items), size=n, replace=False))
    return [items[i] for i in idx]


def _run_seeds(stage: StageDir, seeds: list[int], run_one) -> list[dict[str, Any]]:
    """Run ``run_one(seed, run_dir)`` per seed; a seed whose completion marker exists is not run again."""
    runs = []
    for s in seeds:
        key = f"seed-{s}"
        if stage.is_done(key):
            runs.append(read_json(stage.marker_url(key)))
            continue
        r = run_one(s, join(stage.url, key))
        stage.mark_done(key, r)
        runs.append(r)
    return runs


def _bad_summary(stage: StageDir, bad: list) -> dict[str, Any]:
    errors_file = stage.write_errors("input", [b.to_dict() for b in bad])
    first = [b.message() for b in bad[:3]]
    return {"bad_rows": len(bad), "errors_file": errors_file, "first_errors": first}


def run_glue_task(cfg: EvalConfig, task: str, ft: FinetuneConfig, output: str) -> dict[str, Any]:
    """Fine-tune + score one GLUE task for every seed; writes ``OUT/<task>/result.json``."""
    t = get_task(task)
    files = find_task_files(cfg.glue_dir or "", t.name)
    dev = read_glue_file(files.dev, t)
    bad = list(dev.bad)
    notes: list[str] = []
    if not dev.examples:
        raise ValueError(f"{files.dev}: no usable rows for {t.name}; first errors: {[b.message() for b in bad[:3]]}")
    if files.train:
        tr = read_glue_file(files.train, t)
        bad += tr.bad
        train, dropped = remove_overlap(tr.examples, dev.examples)
        held_out = dev.examples
        if dropped:
            notes.append(f"{dropped} train rows that are also in dev were removed")
    else:
        train, held_out = split_examples(dev.examples, cfg.dev_split_frac, seed=0)
        notes.append(f"no train file: trained on {cfg.dev_split_frac:.0%} of dev, scored on the rest "
                     "(not comparable with the reference)")
    train = _subset(train, cfg.max_train_examples, 0, f"{t.name}-train")
    held_out = _subset(held_out, cfg.max_eval_examples, 0, f"{t.name}-eval")
    if cfg.max_train_examples or cfg.max_eval_examples:
        notes.append("subsampled (--max-train/eval-examples): not comparable with the reference")
    if ft.max_steps:
        notes.append(f"training capped at max_steps={ft.max_steps}: not comparable with the reference")
    stage_cfg = {"model": cfg.model, "tokenizer": cfg.tokenizer, "task": t.name, "train_file": files.train,
                 "dev_file": files.dev, "n_train": len(train), "n_eval": len(held_out), "finetune": ft.to_dict()}
    stage = StageDir(output, t.name, stage_cfg, _hash(stage_cfg))
    stage.open(overwrite=cfg.overwrite)
    runs = _run_seeds(stage, cfg.seed_list(), lambda s, run_dir: finetune_glue(
        cfg.model, t.name, train, held_out, ft, s, out_dir=run_dir, tokenizer_path=cfg.tokenizer))
    metrics = median_over_seeds(runs, t.metrics)
    result = {"task": t.name, "metric": t.metrics[0], "score": metrics[t.metrics[0]], "metrics": metrics,
              "n_train": len(train), "n_eval": len(held_out), "runs": runs, "seeds": cfg.seed_list(),
              "files": {"train": files.train, "dev": files.dev}, "hyperparameters": ft.to_dict(),
              "notes": notes, **_bad_summary(stage, bad)}
    write_json(join(stage.url, "result.json"), result)
    return result


def run_squad_task(cfg: EvalConfig, ft: FinetuneConfig, output: str) -> dict[str, Any]:
    """Fine-tune + score SQuAD v1.1 for every seed; writes ``OUT/squad/result.json``."""
    dev = read_squad(cfg.squad_dev or "")
    bad = list(dev.bad)
    notes: list[str] = []
    if not dev.examples:
        raise ValueError(f"{cfg.squad_dev}: no questions read; first errors: {[b.message() for b in bad[:3]]}")
    if dev.version != "1.1":
        notes.append(f"dataset version {dev.version!r}, expected '1.1'")
    if cfg.squad_train:
        tr = read_squad(cfg.squad_train)
        bad += tr.bad
        train = [e for e in tr.examples if e.id not in tr.misaligned]
        held_out = dev.examples
    else:
        train, held_out = split_by_title(dev.examples, cfg.squad_train_frac, seed=0)
        train = [e for e in train if e.id not in dev.misaligned]
        notes.append(f"no --squad-train: trained on {cfg.squad_train_frac:.0%} of the dev articles, scored on "
                     "the others (demo; not comparable with the reference)")
    train = _subset(train, cfg.max_train_examples, 0, "squad-train")
    held_out = _subset(held_out, cfg.max_eval_examples, 0, "squad-eval")
    if cfg.max_train_examples or cfg.max_eval_examples:
        notes.append("subsampled (--max-train/eval-examples): not comparable with the reference")
    if ft.max_steps:
        notes.append(f"training capped at max_steps={ft.max_steps}: not comparable with the reference")
    stage_cfg = {"model": cfg.model, "tokenizer": cfg.tokenizer, "train_file": cfg.squad_train,
                 "dev_file": cfg.squad_dev, "n_train": len(train), "n_eval": len(held_out), "finetune": ft.to_dict()}
    stage = StageDir(output, "squad", stage_cfg, _hash(stage_cfg))
    stage.open(overwrite=cfg.overwrite)
    runs = _run_seeds(stage, cfg.seed_list(), lambda s, run_dir: finetune_squad(
        cfg.model, train, held_out, ft, s, out_dir=run_dir, tokenizer_path=cfg.tokenizer))
    metrics = median_over_seeds(runs, ("exact_match", "f1"))
    result = {"task": "squad", "metric": "f1", "score": metrics["f1"], "metrics": metrics,
              "n_train": len(train), "n_eval": len(held_out), "runs": runs, "seeds": cfg.seed_list(),
              "files": {"train": cfg.squad_train, "dev": cfg.squad_dev}, "hyperparameters": ft.to_dict(),
              "notes": notes, **_bad_summary(stage, bad)}
    write_json(join(stage.url, "result.json"), result)
    return result


def run_mlm_task(cfg: EvalConfig, output: str) -> dict[str, Any]:
    """Held-out masked-LM scores of the model and (optionally) the teacher; ``OUT/mlm/result.json``."""
    mcfg = MLMEvalConfig(batch_size=cfg.mlm_batch_size, max_examples=cfg.max_eval_examples, device=cfg.device)
    models = {"student": cfg.model, **({"teacher": cfg.teacher} if cfg.teacher else {})}
    stage_cfg = {"data": cfg.data, "models": models, "mlm": mcfg.to_dict()}
    stage = StageDir(output, "mlm", stage_cfg, _hash(stage_cfg))
    stage.open(overwrite=cfg.overwrite)
    scores = {}
    for role, path in models.items():
        if not stage.is_done(role):
            stage.mark_done(role, evaluate_mlm(path, cfg.data or "", mcfg))
        scores[role] = read_json(stage.marker_url(role))
    s = scores["student"]
    notes = []
    if "teacher" in scores:
        tch = scores["teacher"]
        notes.append(f"teacher top1 {tch['top1']:.2f}, top5 {tch['top5']:.2f}, perplexity {tch['perplexity']:.2f}")
    result = {"task": "mlm", "metric": "top1", "score": s["top1"],
              "metrics": {k: s[k] for k in ("top1", "top5", "perplexity")},
              "n_eval": s["rows"], "predicted_tokens": s["predicted_tokens"], "models": scores,
              "table": compare(s, scores.get("teacher")), "hyperparameters": mcfg.to_dict(), "notes": notes}
    write_json(join(stage.url, "result.json"), result)
    return result


def run_bias_task(cfg: EvalConfig, output: str) -> dict[str, Any]:
    """The bias probe on the model (and the teacher when given); ``OUT/bias/result.json``."""
    bcfg = BiasConfig(templates=cfg.bias_templates, groups=cfg.bias_groups, top_k=cfg.bias_top_k, device=cfg.device)
    models = {"student": cfg.model, **({"teacher": cfg.teacher} if cfg.teacher else {})}
    stage_cfg = {"models": models, "bias": bcfg.to_dict(), "tokenizer": cfg.tokenizer}
    stage = StageDir(output, "bias", stage_cfg, _hash(stage_cfg))
    stage.open(overwrite=cfg.overwrite)
    probes = {}
    for role, path in models.items():
        if not stage.is_done(role):
            # the teacher carries its own tokenizer; --tokenizer applies to the evaluated model only
            tok = cfg.tokenizer if role == "student" else None
            stage.mark_done(role, run_bias_probe(path, bcfg, tokenizer_path=tok))
        probes[role] = read_json(stage.marker_url(role))
    s = probes["student"]["summary"]
    notes = []
    if "teacher" in probes:
        ts = probes["teacher"]["summary"]
        notes.append(f"teacher mean JS {ts['mean_js']:.4f}, mean top-{bcfg.top_k} overlap {ts['mean_topk_overlap']:.2f}")
    result = {"task": "bias", "metric": "mean_js", "score": s["mean_js"], "metrics": s, "probes": probes,
              "hyperparameters": bcfg.to_dict(), "notes": notes}
    write_json(join(stage.url, "result.json"), result)
    return result


def _hash(d: dict[str, Any]) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
