"""Model cards for what ``distilflow evaluate`` writes and probes (issue 12 item 4).

* Every fine-tuned model (``OUT/<task>[-variant]/seed-N/model``) gets a Hugging Face model card
  ``README.md``: YAML metadata with ``base_model`` (the model it was fine-tuned from), ``model-index`` with its
  GLUE / SQuAD result, how it was trained (the fine-tuning config of record, the data, steps; the teacher
  and the soft-target weights of a task-distilled run), and the bias probe of its base model when the
  evaluation ran one.
* A masked-LM that the bias probe ran on and that already has a distilflow card (``pretrain`` / ``distill``
  write one) gets its "Bias probe" section added or refreshed -- the section of the DistilBERT model card.

The card writer itself is the shared one (``tasks/core/model_card.py``). No Prefect here.
"""

from __future__ import annotations

import os
import re
from typing import Any

from distilflow.tasks.core.io import exists, join, read_bytes, write_bytes
from distilflow.tasks.core.model_card import EvalResult, ModelCard, results_table, write_model_card
from distilflow.tasks.evaluate.config import EvaluateConfig, split_benchmark
from distilflow.tasks.evaluate.report import BIAS_LEGEND, bias_markdown

GLUE_NAMES = {"sst2": "SST-2", "mrpc": "MRPC", "cola": "CoLA", "stsb": "STS-B", "rte": "RTE", "qqp": "QQP",
              "qnli": "QNLI", "mnli": "MNLI"}
METRIC_TYPES = {"accuracy": "accuracy", "f1": "f1", "matthews": "matthews_correlation", "pearson": "pearsonr",
                "spearman": "spearmanr", "exact_match": "exact_match"}
BIAS_TITLE = "Bias probe"


def write_cards(cfg: EvaluateConfig, report: dict[str, Any]) -> list[str]:
    """Cards for every fine-tuned model of ``report`` and the bias section of probed MLM cards; the paths written."""
    results = report["results"]
    probes = (results.get("bias") or {}).get("probes") or {}
    written = []
    for name, res in results.items():
        task, variant = split_benchmark(name)
        if task in ("mlm", "bias") or res.get("status") == "failed":
            continue
        # the base MLM whose bias probe applies: the model, or the teacher for the teacher's own runs
        role = None if variant.endswith("scratch") else ("teacher" if variant == "teacher" else "student")
        for run in res.get("runs", []):
            if run.get("model_dir") and exists(join(run["model_dir"], "config.json")):  # local or in a bucket
                card = finetuned_card(cfg, name, res, run, probes.get(role) if role else None)
                written.append(write_model_card(run["model_dir"], card))
    paths = {"student": cfg.model, "teacher": cfg.teacher}
    for role, probe in probes.items():
        path = paths.get(role)
        if path and add_bias_section(path, probe):
            written.append(join(path, "README.md"))
    return written


def finetuned_card(cfg: EvaluateConfig, name: str, res: dict[str, Any], run: dict[str, Any],
                   probe: dict[str, Any] | None) -> ModelCard:
    """The card of one fine-tuned run (one task, variant and seed)."""
    task, variant = split_benchmark(name)
    base = res.get("model") or cfg.model
    is_squad = task == "squad"
    shown = "SQuAD v1.1" if is_squad else f"GLUE {GLUE_NAMES.get(task, task)}"
    split = "validation" if (res.get("files") or {}).get("train") else "validation (held-out part)"
    metrics = ("exact_match", "f1") if is_squad else tuple(k for k in METRIC_TYPES if k in run and k != "exact_match")
    results = [EvalResult("question-answering" if is_squad else "text-classification",
                          "Extractive question answering" if is_squad else shown, shown,
                          "squad" if is_squad else "glue", METRIC_TYPES[m], float(run[m]), metric_name=f"{m} (%)",
                          dataset_config=None if is_squad else task, dataset_split=split)
               for m in metrics if m in run]
    what = {"": f"`{base}` fine-tuned on {shown}",
            "teacher": f"The teacher `{base}` fine-tuned on {shown}",
            "distilled": f"`{base}` fine-tuned on {shown} with task distillation: the soft targets of a teacher "
                         f"fine-tuned on the same task (`{run.get('teacher', '')}`) added "
                         "to the task loss, DistilBERT's second distillation step",
            "scratch": f"The architecture of `{base}` trained on {shown} from random weights (a baseline)",
            "teacher-scratch": f"The architecture of `{base}` trained on {shown} from random weights (a baseline)"
            }.get(variant, f"`{base}` fine-tuned on {shown}")
    hp = res.get("hyperparameters") or {}
    tags = ["distilflow", "question-answering" if is_squad else "text-classification", task]
    tags += {"distilled": ["task-distillation"], "scratch": ["from-scratch"],
             "teacher-scratch": ["from-scratch"]}.get(variant, [])
    training = [f"Seed {run.get('seed')}; {run.get('n_train', res.get('n_train')):,} training examples, "
                f"{run.get('steps')} optimizer steps ({run.get('train_seconds')} s on {run.get('device')}); "
                f"scored on {res.get('n_eval'):,} examples ({split}).",
                "", "Fine-tuning config of record:", "", "| parameter | value |", "|---|---|",
                *(f"| {k} | {v} |" for k, v in hp.items())]
    if variant == "distilled":
        training += ["", f"Loss: alpha * KL(softmax(teacher/T) || softmax(student/T)) * T^2 + (1 - alpha) * task "
                         f"loss, T = {cfg.kd_temperature:g}, alpha = {cfg.kd_alpha:g}."]
    files = res.get("files") or {}
    sections = {
        "How to use": _usage(run.get("model_dir", ""), is_squad),
        "Training": "\n".join(training),
        "Training data": f"Train: `{files.get('train') or files.get('dev')}`; evaluation: `{files.get('dev')}`."
                         + ("".join(f" {n}." for n in res.get("notes", [])) if res.get("notes") else ""),
        "Evaluation results": results_table(results) + f"\n\nMedian over the {len(res.get('runs', []))} seed(s) of "
                              f"this evaluation: {res.get('metric')} {res.get('score')}.",
    }
    if probe:
        sections[BIAS_TITLE] = (f"The bias probe of the model this one was fine-tuned from (`{base}`; the "
                                f"DistilBERT model card's probe). {BIAS_LEGEND}\n" + bias_markdown(probe, "", "###"))
    sections["Limitations"] = ("Fine-tuned by `distilflow evaluate` as a benchmark run: small data, one seed of "
                               "several; compare the median in the evaluation's results.md, not this run alone. "
                               "It inherits the associations of its base model and its training data.")
    return ModelCard(name=f"{os.path.basename(os.path.normpath(base))}-{name}-seed{run.get('seed')}",
                     summary=f"{what}, by `distilflow evaluate` (seed {run.get('seed')}).",
                     pipeline_tag="question-answering" if is_squad else "text-classification", tags=tags,
                     datasets=["squad" if is_squad else "glue"],
                     base_model=None if variant.endswith("scratch") else base, results=results, sections=sections)


def _usage(model_dir: str, is_squad: bool) -> str:
    if is_squad:
        return ("```python\nfrom distilflow.tasks.evaluate.finetune import answer_questions\n"
                f"print(answer_questions(\"{model_dir}\", [(\"Who won?\", \"The Broncos won the game.\")]))\n```")
    return ("```python\nfrom transformers import pipeline\n"
            f"clf = pipeline(\"text-classification\", model=\"{model_dir}\")\nprint(clf(\"a wonderful film\"))\n```")


def add_bias_section(model_dir: str, probe: dict[str, Any]) -> bool:
    """Add or refresh the bias-probe section of a distilflow model card in ``model_dir``; False when the folder
    has no distilflow card (a model from elsewhere: its card is not ours to edit) or cannot be written."""
    path = join(model_dir, "README.md")
    try:
        text = read_bytes(path).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if not text.startswith("---\n") or "distilflow" not in text.split("\n---\n", 1)[0]:
        return False
    section = (f"## {BIAS_TITLE}\n\n`distilflow evaluate --tasks bias` (the DistilBERT model card's probe). "
               f"{BIAS_LEGEND}\n{bias_markdown(probe, '', '###')}\n")
    pattern = re.compile(rf"^## {BIAS_TITLE}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    try:
        write_bytes(path, new.encode("utf-8"))  # atomic, local or in a bucket
    except OSError:
        return False
    return True
