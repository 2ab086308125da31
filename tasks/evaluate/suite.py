"""The benchmarks of ``distilflow evaluate`` and their results table (ours beside the DistilBERT references).

The flow runs one job per benchmark (:func:`run_benchmark`) and each writes ``OUT/<task>/result.json``;
:func:`assemble` turns those into ``OUT/results.json`` (everything: per-seed runs, medians, configs,
seeds) and the rows of ``OUT/results.md``. No Prefect here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distilflow.tasks.core.errors import InputError
from distilflow.tasks.core.io import exists, folder_identity, join, read_json, write_json
from distilflow.tasks.core.rng import derive_rng
from distilflow.tasks.core.stage import StageDir
from distilflow.tasks.evaluate.bias import BiasConfig, run_bias_probe
from distilflow.tasks.evaluate.config import (
    EvaluateConfig,
    finetune_for,
    split_benchmark,
    task_distill_config,
)
from distilflow.tasks.evaluate.finetune import finetune_glue, finetune_squad, median_over_seeds
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

def summary_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per benchmark: ours (median over seeds) beside the reference, plus all metrics."""
    rows = []
    for name, r in results.items():
        task, variant = split_benchmark(name)
        # DistilBERT's numbers are for the (task-distilled) student; teacher and scratch rows have none
        ref = REFERENCES.get(task, {}) if variant in ("", "distilled") else {}
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


def assemble(config: EvaluateConfig, results: dict[str, dict[str, Any]], environment: dict[str, Any]) -> dict[str, Any]:
    """The content of results.json: config (hyper-parameters, seeds), environment, per-task results, table."""
    return {
        "config": config.to_dict(),
        "seeds": config.seed_list(),
        "environment": environment,
        "results": results,
        "table": summary_rows(results),
        "references": REFERENCES,
    }


def mlm_config(cfg: EvaluateConfig) -> MLMEvalConfig:
    """The held-out MLM scoring settings of ``cfg``."""
    return MLMEvalConfig(batch_size=cfg.mlm_batch_size, max_examples=cfg.max_eval_examples, device=cfg.device,
                         bf16=cfg.bf16)


def bias_config(cfg: EvaluateConfig) -> BiasConfig:
    """The bias probe settings of ``cfg``."""
    return BiasConfig(templates=cfg.bias_templates, groups=cfg.bias_groups, top_k=cfg.bias_top_k, device=cfg.device)


# -- one benchmark = one job (the flow runs each in its own Prefect task) ------------------------------------
def _subset(items: list, n: int, seed: int, name: str) -> list:
    """A deterministic random subset of ``n`` items (files are often sorted by source or label)."""
    if not n or len(items) <= n:
        return items
    idx = np.sort(derive_rng(seed, "subset", name).choice(len(items), size=n, replace=False))
    return [items[i] for i in idx]


MARKER_KEYS = ("key", "fingerprint", "deps")  # what a completion marker adds to a unit's result


def _result(stage: StageDir, key: str) -> dict[str, Any]:
    """A finished unit's result: its completion marker less the marker's own bookkeeping."""
    return {k: v for k, v in read_json(stage.marker_url(key)).items() if k not in MARKER_KEYS}


def model_deps(*models: str | None) -> dict[str, Any]:
    """What a result depends on beyond the config: the identity of each model folder it used (weights,
    config, tokenizer files: :func:`folder_identity`), so weights replaced in place are evaluated again."""
    return {f"model:{m}": folder_identity(m) for m in models if m}


def _run_seeds(stage: StageDir, seeds: list[int], run_one, deps: dict[str, Any]) -> list[dict[str, Any]]:
    """Run ``run_one(seed, run_dir)`` per seed; a seed whose marker exists, made from the same models
    (``deps``), is not run again."""
    runs = []
    for s in seeds:
        key = f"seed-{s}"
        if stage.is_done(key, deps):
            runs.append(_result(stage, key))
            continue
        r = run_one(s, join(stage.url, key))
        stage.mark_done(key, r, deps)
        runs.append(r)
    return runs


def _bad_summary(stage: StageDir, bad: list) -> dict[str, Any]:
    errors_file = stage.write_errors("input", [b.to_dict() for b in bad])
    first = [b.message() for b in bad[:3]]
    return {"bad_rows": len(bad), "errors_file": errors_file, "first_errors": first}


@dataclass
class TaskData:
    """The examples one fine-tuning task trains and scores on, and what the table says about them."""

    train: list
    held_out: list
    files: dict[str, str | None]
    notes: list[str] = field(default_factory=list)
    bad: list = field(default_factory=list)


def glue_data(cfg: EvaluateConfig, task: str) -> TaskData:
    """Train/evaluation examples of a GLUE task: train vs dev, or a split of dev when there is no train file."""
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
    return _subsampled(cfg, t.name, TaskData(train, held_out, {"train": files.train, "dev": files.dev}, notes, bad))


def squad_data(cfg: EvaluateConfig) -> TaskData:
    """SQuAD questions: train vs dev, or the dev articles split by ``squad_train_frac``."""
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
    return _subsampled(cfg, "squad", TaskData(train, held_out, {"train": cfg.squad_train, "dev": cfg.squad_dev},
                                              notes, bad))


def _subsampled(cfg: EvaluateConfig, name: str, d: TaskData) -> TaskData:
    d.train = _subset(d.train, cfg.max_train_examples, 0, f"{name}-train")
    d.held_out = _subset(d.held_out, cfg.max_eval_examples, 0, f"{name}-eval")
    if cfg.max_train_examples or cfg.max_eval_examples:
        d.notes.append("subsampled (--max-train/eval-examples): not comparable with the reference")
    ft = finetune_for(cfg, name)
    if ft.max_steps:
        d.notes.append(f"training capped at max_steps={ft.max_steps}: not comparable with the reference")
    return d


@dataclass(frozen=True)
class Variant:
    """Which model one fine-tuning run starts from, and how it is trained (see EvaluateConfig.variants)."""

    name: str  # "" (the model), teacher, distilled, scratch, teacher-scratch
    model: str
    tokenizer: str | None
    from_scratch: bool = False
    teachers: dict[int, str] = field(default_factory=dict)  # distilled: fine-tuned teacher per seed
    record: dict[str, Any] = field(default_factory=dict)  # what the stage fingerprint adds
    note: str = ""


def variant_of(cfg: EvaluateConfig, task: str, name: str, output: str) -> Variant:
    """Resolve a variant: its model, and for ``distilled`` the fine-tuned teachers (fine-tuning them first)."""
    on_teacher = name.startswith("teacher")
    model = (cfg.teacher or "") if on_teacher else cfg.model
    tok = None if on_teacher else cfg.tokenizer  # the teacher carries its own tokenizer
    scratch = name.endswith("scratch")
    if name == "distilled":
        kd = task_distill_config(cfg)
        teachers = _task_teachers(cfg, task, output)
        return Variant(name, model, tok, teachers=teachers,
                       record={"variant": name, "kd": kd.to_dict(), "teachers": {str(s): p for s, p in teachers.items()}},
                       note=f"task distillation: soft targets of the fine-tuned teacher (T={kd.temperature:g}, "
                            f"alpha={kd.alpha:g}) plus the task loss")
    note = {"teacher": f"the teacher ({model}) fine-tuned with the same recipe",
            "scratch": "from scratch: the model's architecture, random init, same fine-tuning",
            "teacher-scratch": "from scratch: the teacher's architecture, random init, same fine-tuning"}.get(name, "")
    return Variant(name, model, tok, from_scratch=scratch, record={"variant": name} if name else {}, note=note)


def _task_teachers(cfg: EvaluateConfig, task: str, output: str) -> dict[int, str]:
    """Seed -> fine-tuned teacher folder: from --task-teacher, or by fine-tuning --teacher here (resumable)."""
    if cfg.task_teacher:
        return find_task_teachers(cfg.task_teacher, task, cfg.seed_list())
    r = run_finetune_task(cfg, task, output, "teacher")
    return {int(run["seed"]): run["model_dir"] for run in r["runs"]}


def find_task_teachers(root: str, task: str, seeds: list[int]) -> dict[int, str]:
    """``--task-teacher``: an evaluate output (its ``<task>/seed-N/model``; seeds it lacks use its first run)
    or one fine-tuned model folder for every seed."""
    res = join(root, task, "result.json")
    if exists(res):
        runs = {int(r["seed"]): r["model_dir"] for r in read_json(res)["runs"] if r.get("model_dir")}
        if runs:
            first = runs[min(runs)]
            return {s: runs.get(s, first) for s in seeds}
    if exists(join(root, "config.json")):
        return dict.fromkeys(seeds, root)
    raise InputError(f"--task-teacher {root}: neither {task}/result.json (the output of `distilflow evaluate "
                     "--model TEACHER`) nor a fine-tuned model folder (config.json)")


def run_finetune_task(cfg: EvaluateConfig, task: str, output: str, variant: str = "") -> dict[str, Any]:
    """Fine-tune + score one GLUE task or SQuAD for every seed (one variant); writes ``OUT/<name>/result.json``."""
    is_squad = task == "squad"
    t = None if is_squad else get_task(task)
    tname = "squad" if t is None else t.name
    name = f"{tname}-{variant}" if variant else tname
    v = variant_of(cfg, tname, variant, output)
    ft = finetune_for(cfg, tname)
    d = squad_data(cfg) if is_squad else glue_data(cfg, tname)
    stage_cfg: dict[str, Any] = {"model": v.model, "tokenizer": v.tokenizer, **({} if is_squad else {"task": tname}),
                                 "train_file": d.files["train"], "dev_file": d.files["dev"], "n_train": len(d.train),
                                 "n_eval": len(d.held_out), "finetune": ft.to_dict(), **v.record}
    stage = StageDir(output, name, stage_cfg, _hash(stage_cfg))
    stage.open(overwrite=cfg.overwrite)
    kd = task_distill_config(cfg) if v.teachers else None

    def run_one(seed: int, run_dir: str) -> dict[str, Any]:
        kw = {"out_dir": run_dir, "tokenizer_path": v.tokenizer, "from_scratch": v.from_scratch,
              "teacher": v.teachers.get(seed), "kd": kd}
        if t is None:
            return finetune_squad(v.model, d.train, d.held_out, ft, seed, **kw)
        return finetune_glue(v.model, tname, d.train, d.held_out, ft, seed, **kw)

    teachers = sorted({t for t in v.teachers.values() if t})
    runs = _run_seeds(stage, cfg.seed_list(), run_one, model_deps(v.model, v.tokenizer, *teachers))
    keys = ("exact_match", "f1") if t is None else t.metrics
    metrics = median_over_seeds(runs, keys)
    metric = "f1" if t is None else t.metrics[0]
    result = {"task": name, "metric": metric, "score": metrics[metric], "metrics": metrics,
              "n_train": len(d.train), "n_eval": len(d.held_out), "runs": runs, "seeds": cfg.seed_list(),
              "files": d.files, "hyperparameters": ft.to_dict(), "notes": ([v.note] if v.note else []) + d.notes,
              **({"variant": variant, "model": v.model} if variant else {}), **_bad_summary(stage, d.bad)}
    write_json(join(stage.url, "result.json"), result)
    return result


def run_glue_task(cfg: EvaluateConfig, task: str, output: str, variant: str = "") -> dict[str, Any]:
    """Fine-tune + score one GLUE task for every seed; writes ``OUT/<task>/result.json``."""
    return run_finetune_task(cfg, task, output, variant)


def run_squad_task(cfg: EvaluateConfig, output: str, variant: str = "") -> dict[str, Any]:
    """Fine-tune + score SQuAD v1.1 for every seed; writes ``OUT/squad/result.json``."""
    return run_finetune_task(cfg, "squad", output, variant)

def run_mlm_task(cfg: EvaluateConfig, output: str) -> dict[str, Any]:
    """Held-out masked-LM scores of the model and (optionally) the teacher; ``OUT/mlm/result.json``."""
    mcfg = mlm_config(cfg)
    models = {"student": cfg.model, **({"teacher": cfg.teacher} if cfg.teacher else {})}
    stage_cfg = {"data": cfg.data, "models": models, "mlm": mcfg.to_dict()}
    stage = StageDir(output, "mlm", stage_cfg, _hash(stage_cfg))
    stage.open(overwrite=cfg.overwrite)
    scores = {}
    for role, path in models.items():
        deps = model_deps(path)
        if not stage.is_done(role, deps):
            stage.mark_done(role, evaluate_mlm(path, cfg.data or "", mcfg), deps)
        scores[role] = _result(stage, role)
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


def run_bias_task(cfg: EvaluateConfig, output: str) -> dict[str, Any]:
    """The bias probe on the model (and the teacher when given); ``OUT/bias/result.json``."""
    bcfg = bias_config(cfg)
    models = {"student": cfg.model, **({"teacher": cfg.teacher} if cfg.teacher else {})}
    stage_cfg = {"models": models, "bias": bcfg.to_dict(), "tokenizer": cfg.tokenizer}
    stage = StageDir(output, "bias", stage_cfg, _hash(stage_cfg))
    stage.open(overwrite=cfg.overwrite)
    probes = {}
    for role, path in models.items():
        # the teacher carries its own tokenizer; --tokenizer applies to the evaluated model only
        tok = cfg.tokenizer if role == "student" else None
        deps = model_deps(path, tok)
        if not stage.is_done(role, deps):
            stage.mark_done(role, run_bias_probe(path, bcfg, tokenizer_path=tok), deps)
        probes[role] = _result(stage, role)
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


def run_benchmark(name: str, cfg: EvaluateConfig, output: str) -> dict[str, Any]:
    """Run one benchmark (all its seeds); its result dict is also saved as ``OUT/<name>/result.json``."""
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    if name == "mlm":
        return run_mlm_task(cfg, output)
    if name == "bias":
        return run_bias_task(cfg, output)
    task, variant = split_benchmark(name)
    return run_finetune_task(cfg, task, output, variant)


def failed_result(name: str, exc: BaseException | None) -> dict[str, Any]:
    """The entry of a benchmark that raised: the table shows FAILED and the reason, the others are kept."""
    return {"task": name, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
