"""Batch inference flows: fill-mask, extractive QA, embeddings; and the file watcher that triggers them.

One Prefect task per input file (streaming its rows through the model in length-sorted batches, see
``tasks/infer/batch_io.py``); a rerun skips files whose completion marker exists. The flows' parameters
are the fields of the job configs in ``tasks/infer/config.py``.

File trigger: ``distilflow watch DIR`` emits ``distilflow.file.ready`` (payload ``{"path", "size"}``) for
each completely written file; a deployment of :func:`fill_mask_flow` with :func:`file_ready_trigger`
maps ``{{ event.payload.path }}`` to the flow's ``input`` parameter (see :func:`serve_fill_mask`).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from prefect import task
from prefect.events import DeploymentEventTrigger
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm import tqdm

from distilflow.flows.common import ProgressArtifact, config_flow, publish
from distilflow.flows.runners import make_task_runner, run_in_subflow
from distilflow.tasks.core.errors import UserError
from distilflow.tasks.core.hf import check_model
from distilflow.tasks.core.io import expand_inputs, folder_identity
from distilflow.tasks.infer import batch_io as io
from distilflow.tasks.infer.config import BatchRun, EmbedJob, FillMaskJob, QAJob, WatchConfig, load_job
from distilflow.tasks.infer.report import add_agreement, files_markdown, summary_lines
from distilflow.tasks.infer.watch import EVENT_NAME, RESOURCE_PREFIX, watch_folder

_ROWS: tqdm | None = None  # the stage's rows/s bar, when the file tasks run in this process
# Flows run one file at a time in the flow process: the model is loaded once and uses every core
# (``workers`` / Dask for more).


@task(name="batch-inference-file", retries=0)
def infer_file(unit: tuple[str, str], job_name: str, record: dict[str, Any], output: str,
               model_identity: str | None = None) -> dict[str, Any]:
    """Run one input file through the model into ``<output>/<key>.parquet``; returns its marker."""
    url, key = unit
    io.forget_stale_model(job_name, record["model"], model_identity)  # weights replaced since loaded here
    cfg, job = load_job(job_name, record)
    stage = io.output_stage(output, job_name, cfg.to_dict(), cfg.output_fingerprint())
    bar = _ROWS
    return io.run_file(job, stage, url, key, keep_columns=cfg.keep_columns, fmt=cfg.format,
                       window_rows=cfg.window_rows, progress=bar.update if bar is not None else None,
                       model=model_identity)


def _run(job_name: str, cfg: BatchRun) -> dict[str, Any]:
    """Run the per-file tasks in worker processes or on Dask when the flow's parameters ask for it."""
    if not cfg.in_process:
        runner = make_task_runner(cfg.workers, cfg.dask_address, cfg.dask_workers)
        return run_in_subflow(_run_files, f"{job_name}-files", runner, job_name=job_name, cfg=cfg)
    return _run_files(job_name, cfg)


def _run_files(job_name: str, cfg: Any) -> dict[str, Any]:
    """Expand the inputs, one task per file (never per row), then the manifest and the artifact."""
    global _ROWS
    record = cfg.record()
    check_model(cfg.model)  # a bad --model is named before anything is written (no poisoned output folder)
    model_identity = folder_identity(cfg.model)  # its files' hashes: replaced weights rerun every file
    units = io.plan_units(expand_inputs(list(cfg.input)))
    stage = io.open_output(cfg.output, job_name, record.to_dict(), record.output_fingerprint(), cfg.overwrite)
    show = os.environ.get("DISTILFLOW_PROGRESS", "1") != "0"
    with ProgressArtifact(f"{job_name} files") as progress, tqdm(desc=job_name, unit="row", disable=not show) as bar:
        _ROWS = bar if cfg.in_process else None
        try:
            file_task = infer_file.with_options(task_run_name=f"{job_name}-{{unit[1]}}")
            futures = [file_task.submit(u, job_name=job_name, record=record.to_dict(), output=cfg.output,
                                        model_identity=model_identity) for u in units]
            for done, fut in enumerate(as_completed(futures), start=1):
                progress.update(100.0 * done / len(futures))
                fut.wait()  # done: its final state from the future itself, not from the API
                if not cfg.in_process and fut.state.is_completed():
                    bar.update(fut.result().get("input_rows", 0))
        finally:
            _ROWS = None
    markers = [f.result() for f in futures]  # re-raises the first failed file's own exception
    manifest = add_agreement(io.write_run_manifest(stage, [k for _, k in units], {"job": job_name}))
    publish(files_markdown(job_name, cfg.output, markers), key=f"distilflow-{job_name}",
            description=f"{job_name} over {len(units)} file(s)")
    return manifest


@config_flow(FillMaskJob, name="fill-mask", task_runner=ThreadPoolTaskRunner(max_workers=1))
def fill_mask_flow(cfg: FillMaskJob) -> dict[str, Any]:
    """Fill-mask predictions for every row of ``input`` (file, folder, glob or list) into ``output``."""
    return _run("fill-mask", cfg)


@config_flow(QAJob, name="qa", task_runner=ThreadPoolTaskRunner(max_workers=1))
def qa_flow(cfg: QAJob) -> dict[str, Any]:
    """Extractive QA (answer, score, start, end) for every (question, context) row of ``input``."""
    return _run("qa", cfg)


@config_flow(EmbedJob, name="embed", task_runner=ThreadPoolTaskRunner(max_workers=1))
def embed_flow(cfg: EmbedJob) -> dict[str, Any]:
    """Mean-pooled or [CLS] embeddings for every row of ``input`` into ``output``."""
    return _run("embed", cfg)


# -- command line --------------------------------------------------------------------------------------
class _Runner:
    """``distilflow fill-mask|qa|embed``: run the flow, print the result line. ``preload`` (called by the
    command line before it waits for a temporary Prefect server) loads the model meanwhile."""

    def __init__(self, flow: Any, job: str):
        self.flow, self.job = flow, job

    def __call__(self, cfg: BatchRun) -> int:
        line, errors = summary_lines(self.flow(**cfg.to_dict()))
        print(line)
        if errors:
            print(errors, file=sys.stderr)
        return 0

    def preload(self, cfg: Any) -> None:
        check_model(cfg.model)  # a missing folder, pickle weights, a corrupt tokenizer.json: one line, now
        if cfg.in_process:  # the file task then finds it in the per-process model cache
            load_job(self.job, cfg.record().to_dict())


run_fill_mask = _Runner(fill_mask_flow, "fill-mask")
run_qa = _Runner(qa_flow, "qa")
run_embed = _Runner(embed_flow, "embed")


def run_watch(cfg: WatchConfig) -> int:
    return watch_folder(cfg, emit_and_flush)


# -- trigger -------------------------------------------------------------------------------------------
def file_ready_trigger(parameters: dict[str, Any] | None = None, name: str = "on-file-ready") -> DeploymentEventTrigger:
    """Run the deployment once per ``distilflow.file.ready`` event, with ``input`` = the file's path."""
    return DeploymentEventTrigger(name=name, expect={EVENT_NAME}, match={"prefect.resource.id": f"{RESOURCE_PREFIX}*"},
                                  parameters={"input": "{{ event.payload.path }}", **(parameters or {})})


def serve_fill_mask(output: str, model: str, name: str = "fill-mask-on-file", **params: Any) -> None:
    """Serve :func:`fill_mask_flow` (blocking), started by file events; ``params`` are flow defaults."""
    fill_mask_flow.serve(name=name, triggers=[file_ready_trigger()],
                         parameters={"output": output, "model": model, **params}, print_starting_message=True)


def emit_and_flush(**kwargs: Any) -> None:
    """``prefect.events.emit_event`` and wait until the event has left the process."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    if emit_event(**kwargs) is None:
        raise UserError("Prefect did not emit the event: set PREFECT_API_URL to your Prefect server")
    EventsWorker.drain_all(timeout=30)
