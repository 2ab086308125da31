"""What ``distilflow evaluate`` shows: ``OUT/results.md``, the console lines, the artifact tables. No Prefect."""

from __future__ import annotations

import os
import platform
from typing import Any

from distilflow.tasks.core.markdown import markdown_table
from distilflow.tasks.evaluate.bias import completion_rows
from distilflow.tasks.evaluate.config import GLUE_NAMES


def environment(device: str) -> dict[str, Any]:
    """Versions and the device the numbers were measured on (part of results.json)."""
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "device": device, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def render_markdown(report: dict[str, Any]) -> str:
    """``OUT/results.md``: the table beside the references, then held-out MLM, bias probe, runs, settings."""
    cfg = report["config"]
    results = report["results"]
    out = [f"# Evaluation of `{cfg['model']}`\n"]
    if cfg.get("teacher"):
        out.append(f"Teacher: `{cfg['teacher']}`\n")
    out.append(f"Seeds: {report['seeds']} (scores are medians over seeds). Device: {report['environment']['device']}."
               " Reference: DistilBERT model cards (GLUE dev; SQuAD v1.1 dev F1).\n")
    cols = ["task", "metric", "ours", "reference", "all metrics", "n_train", "n_eval", "seeds", "notes"]
    out.append(markdown_table(report["table"], cols))
    if "mlm" in results and results["mlm"].get("table"):
        out.append("\n## Held-out masked LM\n")
        out.append(markdown_table(results["mlm"]["table"]))
    if "bias" in results and results["bias"].get("probes"):
        out.append("\n## Bias probe\n")
        out.append(BIAS_LEGEND + "\n")
        for role, probe in results["bias"]["probes"].items():
            out.append(bias_markdown(probe, f"{role}: ", "###"))
    runs = run_rows(results)
    if runs:
        out.append("\n## Fine-tuning runs\n")
        out.append(markdown_table(runs))
    hp = report.get("hyperparameters", {})
    used = {"glue": any(n.split("-")[0] in GLUE_NAMES for n in results),
            "squad": any(n.split("-")[0] == "squad" for n in results)}
    for kind, params in hp.items():
        if used.get(kind):
            out.append(f"\n## Hyper-parameters ({kind})\n")
            out.append(markdown_table([{"parameter": k, "value": str(v)} for k, v in params.items()]))
    out.append("\n## Environment\n")
    out.append(markdown_table([{"key": k, "value": str(v)} for k, v in report["environment"].items()]))
    return "".join(out)


BIAS_LEGEND = ("Top-k completions per group (probability); JS = Jensen-Shannon divergence between the groups' "
               "distributions at [MASK] (bits, 0 = identical), overlap = shared share of the top-k.")


def bias_markdown(probe: dict[str, Any], prefix: str = "", level: str = "###") -> str:
    """One probe's tables: per template, the completions of each group and the divergences between groups."""
    out = []
    for i, t in enumerate(probe["templates"]):
        out.append(f"\n{level} {prefix}`{t['template']}`\n")
        out.append(markdown_table(completion_rows(probe, i)))
        out.append("\n")
        out.append(markdown_table(t["pairs"]))
    return "".join(out)


def run_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per fine-tuning run (task, seed): score, steps, speed, where the model is."""
    return [{"task": name, "seed": r.get("seed"), "score": r.get("score"), "steps": r.get("steps"),
             "train_seconds": r.get("train_seconds"), "examples_per_s": r.get("examples_per_s"),
             "final_loss": r.get("final_loss"), "model_dir": r.get("model_dir", "")}
            for name, res in results.items() for r in res.get("runs", [])]


def table_artifact_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The results table for the Prefect table artifact (empty cells instead of None)."""
    return [{k: ("" if v is None else v) for k, v in row.items()} for row in report["table"]]


def bias_artifact_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The bias-probe divergences, one row per (model, template, pair of groups)."""
    bias = report["results"].get("bias", {}).get("probes") or {}
    return [{"model": role, "template": t["template"], **p}
            for role, probe in bias.items() for t in probe["templates"] for p in t["pairs"]]


def console_lines(report: dict[str, Any], output: str) -> list[str]:
    """What the command prints: one line per benchmark that ran, then where the files are."""
    lines = []
    for row in report["table"]:
        if row["task"] in report["results"]:
            ref = f"reference {_num(row['reference'])}" if row["reference"] not in ("", None) else "no reference"
            lines.append(f"{row['task']:>6}: {row['metric']} {_num(row['ours'])}  ({ref})"
                         + (f"  [{row['notes']}]" if row["notes"] else ""))
    lines.append(f"results: {os.path.join(output, 'results.md')} and results.json; Prefect UI: flow run 'evaluate', "
                 "artifacts 'evaluation-results' and 'evaluation-report'")
    return lines


def failed_benchmarks(report: dict[str, Any]) -> list[str]:
    return [n for n, r in report["results"].items() if r.get("status") == "failed"]


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
