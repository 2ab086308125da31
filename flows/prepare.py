"""Prepare job: ``distilflow prepare`` = shard -> pairs -> mask, each also a flow of its own.

    distilflow prepare --input ../shared/data/corpus/gutenberg/pg*.txt --output runs/prep \\
        --tokenizer ../shared/data/tokenizers/bert-base-uncased --max-seq-len 128 --workers 2

One Prefect task per unit (input file / corpus part); units are keyed by input, so the output is
byte-identical whatever ``--workers`` is, and a rerun skips every unit whose completion marker exists.
Planning, records and reports live in ``tasks/prepare/job.py``; this module only orchestrates.
"""

from __future__ import annotations

import os
import time
from typing import Any

from prefect import get_run_logger, task
from prefect.task_runners import ThreadPoolTaskRunner

from distilflow.flows import runners
from distilflow.flows.common import config_flow, publish
from distilflow.tasks.core.markdown import markdown_table
from distilflow.tasks.core.stage import StageDir
from distilflow.tasks.prepare import job
from distilflow.tasks.prepare.config import (
    MaskJobConfig,
    PairsJobConfig,
    PairsOptions,
    PrepareConfig,
    ShardJobConfig,
)
from distilflow.tasks.prepare.mask import mask_part
from distilflow.tasks.prepare.pairs import pairs_part
from distilflow.tasks.prepare.shard import shard_file


@task(name="shard-file", retries=1, retry_delay_seconds=2)
def shard_task(key: str, unit: Any, stage: StageDir, record: Any, deps: dict[str, Any] | None = None) -> dict[str, Any]:
    return job.run_unit(stage, key, deps, runners.offload, shard_file, unit, stage, record)


@task(name="pairs-part", retries=1, retry_delay_seconds=2)
def pairs_task(key: str, corpus_url: str, neighbour: str | None, tokenizer: Any, stage: StageDir,
               record: Any, deps: dict[str, Any] | None = None) -> dict[str, Any]:
    return job.run_unit(stage, key, deps, runners.offload, pairs_part, corpus_url, key, neighbour, stage, record,
                        job.localize(tokenizer))


@task(name="mask-part", retries=1, retry_delay_seconds=2)
def mask_task(key: str, pairs_url: str, tokenizer: Any, stage: StageDir, record: Any,
              deps: dict[str, Any] | None = None) -> dict[str, Any]:
    return job.run_unit(stage, key, deps, runners.offload, mask_part, pairs_url, key, stage, record,
                        job.localize(tokenizer))


def _run(plan: job.StagePlan, unit_task: Any, title: str) -> None:
    """Submit the units that are not done yet, with one progress bar (MB/s or tokens/s) for the stage."""
    pending = plan.pending()
    if len(pending) < len(plan.units):
        get_run_logger().info("%s: %d of %d units already done (resuming)", title, len(plan.units) - len(pending),
                              len(plan.units))
    futures = [unit_task.submit(k, *plan.units[k], plan.stage, plan.record, deps=plan.deps.get(k)) for k in pending]
    runners.wait_with_progress(futures, title, sizes=[plan.sizes.get(k, 0.0) for k in pending], unit=plan.unit)


def _stage(cfg: Any, name: str) -> dict[str, Any]:
    """One stage: plan (tasks/prepare/job.py), one task per pending unit, manifest + dataset card, report."""
    t0 = time.perf_counter()
    plan_fn, unit_task, title = {"corpus": (job.plan_shard, shard_task, "shard"),
                                 "pairs": (job.plan_pairs, pairs_task, "pairs"),
                                 "masked": (job.plan_mask, mask_task, "mask")}[name]
    plan = plan_fn(cfg, cfg.overwrite)
    if name == "pairs":
        backend, why_not = job.tokenizer_backend(plan.tokenizer)
        get_run_logger().info("pairs: tokenizing with %s%s", backend, f" ({why_not})" if why_not else "")
    _run(plan, unit_task, title)
    manifest = job.finish_stage(plan)
    rows = job.stage_report(name, manifest, time.perf_counter() - t0)
    publish(f"## {name}\n\n" + markdown_table(rows, ["metric", "value"]), key=f"distilflow-{title}",
            description=f"{title} of {cfg.output}")
    for reason, n in manifest["skipped"].items():
        get_run_logger().warning("%s: skipped %s x %d (details in %s)", name, reason, n, manifest["error_files"])
    return manifest


def run_shard_stage(cfg: ShardJobConfig | PrepareConfig) -> dict[str, Any]:
    """Input files -> ``output/corpus/part-*.parquet`` (doc_id, source, sentences)."""
    return _stage(cfg, "corpus")


def run_pairs_stage(cfg: PairsJobConfig | PrepareConfig) -> dict[str, Any]:
    """``output/corpus`` -> ``output/pairs/part-*.parquet`` (NSP pairs or single segments) + token counts."""
    return _stage(cfg, "pairs")


def run_mask_stage(cfg: MaskJobConfig | PrepareConfig) -> dict[str, Any]:
    """``output/pairs`` -> ``output/masked/part-*.parquet`` with ``labels`` (static masking)."""
    return _stage(cfg, "masked")


def _prepare_stages(cfg: PrepareConfig) -> dict[str, Any]:
    """shard -> pairs -> mask in one flow (one worker pool for all three); finished stages are skipped."""
    t0 = time.perf_counter()
    manifests = {"corpus": run_shard_stage(cfg), "pairs": run_pairs_stage(cfg), "masked": run_mask_stage(cfg)}
    result, rows, headline = job.prepare_summary(cfg.output, manifests, time.perf_counter() - t0, cfg.workers)
    publish(f"# prepare: {cfg.output}\n\n{headline}\n\n" + markdown_table(rows), key="distilflow-prepare",
            description="prepare summary")
    return result


def _in_subflow(fn: Any, name: str, cfg: Any) -> Any:
    """Run a stage body as a sub-flow: its tasks on the Dask cluster when one is named, else one task per
    unit on the thread runner with the work in ``cfg.workers`` plain processes (``worker_processes``, one
    pool for all stages of a run). One task thread more than there are processes keeps the next unit
    queued while a task finishes its Prefect bookkeeping. ``memory://`` lives inside one process, so a
    run on it works in this process."""
    if cfg.dask_address or cfg.dask_workers:
        dask = runners.make_task_runner(1, cfg.dask_address, cfg.dask_workers)
        return runners.run_in_subflow(fn, name, dask, cfg=cfg)
    urls = [cfg.output, *getattr(cfg, "inputs", ())]
    in_memory = any(str(u).startswith("memory://") for u in urls)
    # workers inherit it: Arrow's system allocator hands memory back between units (mimalloc kept ~40 MB
    # more per worker at the same speed)
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    with runners.worker_processes(0 if in_memory else cfg.workers):
        return runners.run_in_subflow(fn, name, ThreadPoolTaskRunner(max_workers=cfg.workers + 1), cfg=cfg)


@config_flow(PrepareConfig, name="prepare", log_prints=True)
def prepare_flow(cfg: PrepareConfig) -> dict[str, Any]:
    """The prepare job: corpus files -> ``output/{corpus,pairs,masked}`` (see CONTRIBUTING.md contract)."""
    return _in_subflow(_prepare_stages, "prepare-stages", cfg)


@config_flow(ShardJobConfig, name="shard", log_prints=True)
def shard_flow(cfg: ShardJobConfig) -> dict[str, Any]:
    """Stage 1 alone: inputs -> ``output/corpus``."""
    return _in_subflow(run_shard_stage, "shard-stage", cfg)


@config_flow(PairsJobConfig, name="pairs", log_prints=True)
def pairs_flow(cfg: PairsJobConfig) -> dict[str, Any]:
    """Stage 2 alone: ``output/corpus`` -> ``output/pairs``."""
    return _in_subflow(run_pairs_stage, "pairs-stage", cfg)


@config_flow(MaskJobConfig, name="mask", log_prints=True)
def mask_flow(cfg: MaskJobConfig) -> dict[str, Any]:
    """Stage 3 alone: ``output/pairs`` -> ``output/masked``."""
    return _in_subflow(run_mask_stage, "mask-stage", cfg)


# -- command line (``CommandSpec.run``): run the flow, print its one result line ------------------------------
class _Command:
    """``distilflow prepare|shard|pairs|mask``: run the flow, print its result line. ``preload`` (called by the
    command line before it waits for a temporary Prefect server) loads the tokenizer meanwhile: importing
    transformers for it is ~1 s of every prepare and pairs command."""

    def __init__(self, flow: Any, name: str):
        self.flow, self.name = flow, name

    def __call__(self, cfg: Any) -> int:
        job.preflight(cfg)
        print(job.result_line(self.name, self.flow(**cfg.to_dict()), cfg.output))
        return 0

    def preload(self, cfg: Any) -> None:
        if isinstance(cfg, PairsOptions):  # a bad folder is named by the preflight in __call__, as before
            job.warm_tokenizer(cfg.tokenizer)


run_prepare = _Command(prepare_flow, "prepare")
run_shard = _Command(shard_flow, "shard")
run_pairs = _Command(pairs_flow, "pairs")
run_mask = _Command(mask_flow, "mask")
