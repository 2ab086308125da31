"""``distilflow evaluate``: one Prefect task per benchmark, one results table beside the reference numbers.

Benchmarks (``tasks/evaluate/suite.py``): ``mlm`` (held-out masked-LM accuracy/perplexity, student and
teacher side by side), the GLUE tasks (fine-tune + official metric), ``squad`` (fine-tune + official EM/F1)
and ``bias`` (the model cards' masked-LM bias probe). Each runs as its own task (tagged ``gpu`` on CUDA, so
a Prefect concurrency limit on that tag turns a work pool into a GPU queue) and writes ``OUT/<task>/``;
the flow then writes ``OUT/results.json`` + ``OUT/results.md`` and publishes table artifacts (results;
bias-probe divergences) and a markdown report. A failing benchmark is reported as FAILED in the table
and does not lose the others; rerunning the same command skips every finished (task, seed).
"""

from __future__ import annotations

from typing import Any

from prefect import allow_failure, task
from prefect.artifacts import create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from distilflow.flows.common import config_flow, publish
from distilflow.flows.runners import make_task_runner
from distilflow.tasks.core.io import join, write_bytes, write_json
from distilflow.tasks.evaluate import report as R
from distilflow.tasks.evaluate.card import write_cards
from distilflow.tasks.evaluate.config import (
    EvaluateConfig,
    config_record,
    glue_finetune,
    squad_finetune,
    teacher_benchmark,
)
from distilflow.tasks.evaluate.suite import assemble, failed_result, run_benchmark


@task(name="evaluate-benchmark")
def benchmark_task(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """Run one benchmark (all its seeds); also saved as OUT/<name>/result.json."""
    cfg = EvaluateConfig.from_dict(config)
    return run_benchmark(name, cfg, cfg.output)


# Benchmarks run one after the other by default: one device, and from_pretrained is not thread-safe
# (transformers initialises on the meta device through process-global state). workers > 1 uses
# processes (make_task_runner), never threads.
@config_flow(EvaluateConfig, name="evaluate", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def evaluate_flow(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate ``model`` on ``tasks``; returns the content of ``OUT/results.json``."""
    from distilflow.tasks.core.hf import resolve_device

    write_json(join(cfg.output, "config.json"), config_record(cfg))
    dev = resolve_device(cfg.device)
    tags = ["gpu"] if dev.type == "cuda" else []
    futures: dict[str, Any] = {}
    for name in cfg.benchmarks():
        # a distilled run reads the fine-tuned teachers: after that benchmark, whatever its outcome
        upstream = [allow_failure(futures[t])] if (t := teacher_benchmark(name)) in futures else []
        futures[name] = benchmark_task.with_options(tags=tags, task_run_name=f"evaluate-{name}").submit(
            name, cfg.to_dict(), wait_for=upstream, return_state=False)
    results: dict[str, dict[str, Any]] = {}
    for name, fut in futures.items():
        fut.wait()
        if fut.state.is_completed():
            results[name] = fut.result()
        else:  # keep the other benchmarks; the table says FAILED with the reason
            results[name] = failed_result(name, fut.state.result(raise_on_failure=False))
            print(f"evaluate: {name} failed: {results[name]['error']}")

    report = assemble(cfg, results, R.environment(str(dev)))
    report["hyperparameters"] = {"glue": glue_finetune(cfg).to_dict(), "squad": squad_finetune(cfg).to_dict()}
    markdown = R.render_markdown(report)
    write_json(join(cfg.output, "results.json"), report)
    write_bytes(join(cfg.output, "results.md"), markdown.encode())
    write_cards(cfg, report)  # README.md model cards of the fine-tuned models (+ bias section of probed MLMs)
    create_table_artifact(table=R.table_artifact_rows(report), key="evaluation-results",
                          description=f"evaluation of {cfg.model}")
    if bias := R.bias_artifact_rows(report):
        create_table_artifact(table=bias, key="bias-probe", description=f"bias probe of {cfg.model}")
    publish(markdown, key="evaluation-report", description=f"evaluation of {cfg.model}")
    return report


def run_evaluate(cfg: EvaluateConfig) -> int:
    """``distilflow evaluate``: the flow on ``--workers`` processes; exit 1 when a benchmark failed."""
    flow_fn = evaluate_flow.with_options(task_runner=make_task_runner(cfg.workers)) if cfg.workers > 1 else evaluate_flow
    report = flow_fn(**cfg.to_dict())
    print("\n".join(R.console_lines(report, cfg.output)))
    return 1 if R.failed_benchmarks(report) else 0
