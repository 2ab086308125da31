"""``distilflow evaluate``: one Prefect task per benchmark, one results table beside the reference numbers.

Benchmarks: ``mlm`` (held-out masked-LM accuracy/perplexity, student and teacher side by side), the GLUE
tasks (fine-tune + official metric), ``squad`` (fine-tune + official EM/F1) and ``bias`` (the model
cards' masked-LM bias probe). Each runs as its own task (tagged ``gpu`` on CUDA, so a Prefect
concurrency limit on that tag turns a work pool into a GPU queue) and writes ``OUT/<task>/``; the flow
then writes ``OUT/results.json`` + ``OUT/results.md`` and publishes table artifacts (results;
bias-probe divergences) and a markdown report. A failing benchmark is reported as FAILED in the table
and does not lose the others; rerunning the same command skips every finished (task, seed).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from distilflow.flows.common import make_task_runner, markdown_table, publish
from distilflow.tasks.core.config import ConfigError
from distilflow.tasks.core.io import InputError, join, write_bytes, write_json
from distilflow.tasks.core.stage import ResumeError
from distilflow.tasks.evaluate.bias import completion_rows
from distilflow.tasks.evaluate.finetune import SQUAD_DEFAULTS, FinetuneConfig
from distilflow.tasks.evaluate.glue import TASKS as GLUE_TASKS
from distilflow.tasks.evaluate.suite import (
    BENCHMARKS,
    REFERENCES,
    EvalConfig,
    assemble,
    run_bias_task,
    run_glue_task,
    run_mlm_task,
    run_squad_task,
    summary_rows,
)


@task(name="evaluate-benchmark")
def benchmark_task(name: str, config: dict[str, Any], glue: dict[str, Any], squad: dict[str, Any],
                   output: str, threads: int = 0) -> dict[str, Any]:
    """Run one benchmark (all its seeds) and return its result dict (also saved as OUT/<name>/result.json)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    cfg = EvalConfig.from_dict(config)
    if name == "mlm":
        return run_mlm_task(cfg, output)
    if name == "bias":
        return run_bias_task(cfg, output)
    if name == "squad":
        return run_squad_task(cfg, FinetuneConfig.from_dict(squad), output)
    return run_glue_task(cfg, name, FinetuneConfig.from_dict(glue), output)


def _environment(device: str) -> dict[str, Any]:
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "device": device, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


# Benchmarks run one after the other by default: one device, and from_pretrained is not thread-safe
# (transformers initialises on the meta device through process-global state). --workers N > 1 uses
# processes (make_task_runner), never threads.
@flow(name="evaluate", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))  # type: ignore[arg-type]
def evaluate_flow(model: str, tasks: list[str], output: str, teacher: str | None = None, tokenizer: str | None = None,
                  data: str | None = None, glue_dir: str | None = None, squad_train: str | None = None,
                  squad_dev: str | None = None, max_train_examples: int = 0, max_eval_examples: int = 0,
                  seeds: int = 1, seed: int = 42, device: str = "auto", glue_hparams: dict[str, Any] | None = None,
                  squad_hparams: dict[str, Any] | None = None, bias_groups: list[str] | None = None,
                  bias_templates: list[str] | None = None, bias_top_k: int = 10, mlm_batch_size: int = 32,
                  overwrite: bool = False, threads: int = 0) -> dict[str, Any]:
    """Evaluate ``model`` on ``tasks``; returns the content of ``OUT/results.json``.

    glue_hparams / squad_hparams: FinetuneConfig fields overriding the defaults (GLUE: lr 5e-5, batch 32,
    3 epochs, seq 128; SQuAD: lr 3e-5, batch 12, 2 epochs, seq 384, stride 128).
    """
    extra: dict[str, Any] = {}
    if bias_groups:
        extra["bias_groups"] = tuple(bias_groups)
    if bias_templates:
        extra["bias_templates"] = tuple(bias_templates)
    cfg = EvalConfig(model=model, tasks=tuple(tasks), teacher=teacher, tokenizer=tokenizer, data=data,
                     glue_dir=glue_dir, squad_train=squad_train, squad_dev=squad_dev,
                     max_train_examples=max_train_examples, max_eval_examples=max_eval_examples, seeds=seeds,
                     seed=seed, bias_top_k=bias_top_k, mlm_batch_size=mlm_batch_size, device=device,
                     overwrite=overwrite, **extra)
    glue = FinetuneConfig(device=device).replace(**(glue_hparams or {}))
    squad = FinetuneConfig(device=device, **SQUAD_DEFAULTS).replace(**(squad_hparams or {}))
    write_json(join(output, "config.json"), {"evaluation": cfg.to_dict(), "glue": glue.to_dict(),
                                            "squad": squad.to_dict()})

    from distilflow.tasks.core.hf import resolve_device

    dev = resolve_device(device)
    tags = ["gpu"] if dev.type == "cuda" else []
    futures = {name: benchmark_task.with_options(tags=tags, task_run_name=f"evaluate-{name}").submit(
        name, cfg.to_dict(), glue.to_dict(), squad.to_dict(), output, threads) for name in cfg.tasks}
    results: dict[str, dict[str, Any]] = {}
    for name, fut in futures.items():
        fut.wait()
        if fut.state.is_completed():
            results[name] = fut.result()
        else:  # keep the other benchmarks; the table says FAILED with the reason
            exc = fut.state.result(raise_on_failure=False)
            results[name] = {"task": name, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
            print(f"evaluate: {name} failed: {exc}")

    report = assemble(cfg, results, _environment(str(dev)))
    report["hyperparameters"] = {"glue": glue.to_dict(), "squad": squad.to_dict()}
    markdown = render_markdown(report)
    write_json(join(output, "results.json"), report)
    write_bytes(join(output, "results.md"), markdown.encode())
    table = [{k: ("" if v is None else v) for k, v in row.items()} for row in report["table"]]
    create_table_artifact(table=table, key="evaluation-results", description=f"evaluation of {model}")
    bias = results.get("bias", {}).get("probes")
    if bias:  # the divergences between groups, one row per (model, template, pair of groups)
        rows = [{"model": role, "template": t["template"], **p}
                for role, probe in bias.items() for t in probe["templates"] for p in t["pairs"]]
        create_table_artifact(table=rows, key="bias-probe", description=f"bias probe of {model}")
    publish(markdown, key="evaluation-report", description=f"evaluation of {model}")
    return report


def render_markdown(report: dict[str, Any]) -> str:
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
        out.append("Top-k completions per group (probability); JS = Jensen-Shannon divergence between the groups' "
                   "distributions at [MASK] (bits, 0 = identical), overlap = shared share of the top-k.\n")
        for role, probe in results["bias"]["probes"].items():
            for i, t in enumerate(probe["templates"]):
                out.append(f"\n### {role}: `{t['template']}`\n")
                out.append(markdown_table(completion_rows(probe, i)))
                out.append("\n")
                out.append(markdown_table(t["pairs"]))
    runs = [{"task": name, "seed": r.get("seed"), "score": r.get("score"), "steps": r.get("steps"),
             "train_seconds": r.get("train_seconds"), "examples_per_s": r.get("examples_per_s"),
             "final_loss": r.get("final_loss"), "model_dir": r.get("model_dir", "")}
            for name, res in results.items() for r in res.get("runs", [])]
    if runs:
        out.append("\n## Fine-tuning runs\n")
        out.append(markdown_table(runs))
    hp = report.get("hyperparameters", {})
    used = {"glue": any(n in GLUE_TASKS for n in results), "squad": "squad" in results}
    for kind, params in hp.items():
        if used.get(kind):
            out.append(f"\n## Hyper-parameters ({kind})\n")
            out.append(markdown_table([{"parameter": k, "value": str(v)} for k, v in params.items()]))
    out.append("\n## Environment\n")
    out.append(markdown_table([{"key": k, "value": str(v)} for k, v in report["environment"].items()]))
    return "".join(out)


# -- CLI ----------------------------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="held-out MLM, GLUE, SQuAD and bias probe -> one table beside the reference numbers",
        description="Evaluate a (distilled) model: held-out masked-LM accuracy/perplexity (student and teacher side "
        "by side), GLUE fine-tuning with the official metric per task, SQuAD v1.1 fine-tuning with the official "
        "EM/F1, and a bias probe. Writes OUT/results.json, OUT/results.md and one folder per task (fine-tuned "
        "models in OUT/<task>/seed-N/model, loadable with from_pretrained / transformers pipelines).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="local model folder (save_pretrained) with its tokenizer")
    p.add_argument("--tasks", default="mlm,sst2,mrpc,cola,stsb,rte,squad,bias",
                   help=f"comma-separated benchmarks, from {','.join(BENCHMARKS)}")
    p.add_argument("--output", required=True, help="local output folder (fine-tuned models are written here)")
    p.add_argument("--teacher", default=None, help="teacher model folder: scored beside the model on mlm and bias")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder if the model folder has none")
    p.add_argument("--data", default=None,
                   help="prepared held-out folder (distilflow prepare on held-out text) whose masked/ is scored by mlm")
    p.add_argument("--glue-dir", default=None,
                   help="folder with one sub-folder per GLUE task (sst2/, mrpc/, ...) in GLUE TSV, stsa.binary.*, raw "
                   "CoLA or HF-export layout; a task without a train file trains on part of dev (marked in the table)")
    p.add_argument("--squad-train", default=None,
                   help="SQuAD v1.1 train JSON; without it the dev file is split by article (demo only)")
    p.add_argument("--squad-dev", default=None, help="SQuAD v1.1 dev JSON (scored with the official EM/F1)")
    p.add_argument("--squad-train-frac", type=float, default=0.5,
                   help="share of dev articles used for training when --squad-train is not given")
    p.add_argument("--dev-split-frac", type=float, default=0.5,
                   help="share of dev used for training for GLUE tasks that have no train file")
    p.add_argument("--max-train-examples", type=int, default=0,
                   help="train on a fixed random subset of N examples per task (0 = all); for smoke runs")
    p.add_argument("--max-eval-examples", type=int, default=0,
                   help="score a fixed random subset of N examples (mlm: the first N rows) per task (0 = all)")
    p.add_argument("--seeds", type=int, default=1, help="runs per fine-tuning task; the table shows the median "
                   "(the DistilBERT paper reports medians of 5)")
    p.add_argument("--seed", type=int, default=42, help="first seed; runs use seed, seed+1, ...")
    p.add_argument("--epochs", type=float, default=3.0, help="GLUE fine-tuning epochs (BERT/DistilBERT recipe)")
    p.add_argument("--lr", type=float, default=5e-5, help="GLUE peak learning rate (AdamW, linear warm-up/decay)")
    p.add_argument("--batch-size", type=int, default=32, help="GLUE batch size")
    p.add_argument("--max-seq-len", type=int, default=128, help="GLUE max tokens per (pair of) sentence(s)")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="share of steps with linear warm-up")
    p.add_argument("--max-steps", type=int, default=0, help="cap optimizer steps per run (0 = epochs decide)")
    p.add_argument("--squad-epochs", type=float, default=2.0, help="SQuAD fine-tuning epochs (BERT's run_squad)")
    p.add_argument("--squad-lr", type=float, default=3e-5, help="SQuAD peak learning rate")
    p.add_argument("--squad-batch-size", type=int, default=12, help="SQuAD batch size")
    p.add_argument("--squad-max-seq-len", type=int, default=384, help="SQuAD window length in tokens")
    p.add_argument("--doc-stride", type=int, default=128, help="SQuAD overlap between context windows")
    p.add_argument("--max-answer-length", type=int, default=30, help="SQuAD longest answer span in tokens")
    p.add_argument("--n-best", type=int, default=20, help="SQuAD start/end candidates per window")
    p.add_argument("--mlm-batch-size", type=int, default=32, help="batch size of the held-out MLM scoring")
    p.add_argument("--bias-groups", default="White man,Black man,White woman,Black woman",
                   help="comma-separated groups for the bias probe (model-card examples)")
    p.add_argument("--bias-template", action="append", default=None, metavar="TEMPLATE",
                   help="bias template with {group} and one [MASK]; repeat for several (default: 'The {group} "
                   "worked as a [MASK].' and 'The {group} was known for being [MASK].')")
    p.add_argument("--bias-top-k", type=int, default=10, help="completions shown and compared per group")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N; "
                   "bf16 autocast on CUDA")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="full fp32 on CUDA too")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per benchmark (0 = torch default)")
    p.add_argument("--workers", type=int, default=1,
                   help="benchmarks run at once (1: one after the other, right for a single GPU)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard earlier results in --output that were made with a different config")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(a: argparse.Namespace) -> int:
    if "://" in a.output and not a.output.startswith("file://"):
        print("distilflow evaluate: error: --output must be a local folder (models are saved with save_pretrained)",
              file=sys.stderr)
        return 2
    tasks = [t.strip().lower().replace("-", "") for t in a.tasks.split(",") if t.strip()]
    glue = {"epochs": a.epochs, "learning_rate": a.lr, "batch_size": a.batch_size, "max_seq_len": a.max_seq_len,
            "warmup_ratio": a.warmup_ratio, "max_steps": a.max_steps, "bf16": a.bf16}
    squad = {"epochs": a.squad_epochs, "learning_rate": a.squad_lr, "batch_size": a.squad_batch_size,
             "max_seq_len": a.squad_max_seq_len, "doc_stride": a.doc_stride, "max_answer_length": a.max_answer_length,
             "n_best": a.n_best, "warmup_ratio": a.warmup_ratio, "max_steps": a.max_steps, "bf16": a.bf16}
    groups = [g.strip() for g in a.bias_groups.split(",") if g.strip()]
    try:
        flow_fn = evaluate_flow.with_options(task_runner=make_task_runner(a.workers))
        report = flow_fn(a.model, tasks, a.output.removeprefix("file://"), teacher=a.teacher, tokenizer=a.tokenizer,
                         data=a.data, glue_dir=a.glue_dir, squad_train=a.squad_train, squad_dev=a.squad_dev,
                         max_train_examples=a.max_train_examples, max_eval_examples=a.max_eval_examples,
                         seeds=a.seeds, seed=a.seed, device=a.device, glue_hparams=glue, squad_hparams=squad,
                         bias_groups=groups, bias_templates=a.bias_template, bias_top_k=a.bias_top_k,
                         mlm_batch_size=a.mlm_batch_size, overwrite=a.overwrite, threads=a.threads)
    except (ConfigError, InputError, ResumeError, FileNotFoundError, RuntimeError) as e:
        print(f"distilflow evaluate: error: {e}", file=sys.stderr)
        return 2
    for row in report["table"]:
        if row["task"] in report["results"]:
            ref = f"reference {_num(row['reference'])}" if row["reference"] not in ("", None) else "no reference"
            print(f"{row['task']:>6}: {row['metric']} {_num(row['ours'])}  ({ref})"
                  + (f"  [{row['notes']}]" if row["notes"] else ""))
    print(f"results: {os.path.join(a.output, 'results.md')} and results.json; Prefect UI: flow run 'evaluate', "
          "artifacts 'evaluation-results' and 'evaluation-report'")
    failed = [n for n, r in report["results"].items() if r.get("status") == "failed"]
    return 1 if failed else 0


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


__all__ = ["evaluate_flow", "register", "render_markdown", "summary_rows", "REFERENCES"]
