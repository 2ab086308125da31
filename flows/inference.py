"""Batch inference flows: fill-mask, extractive QA, embeddings; and the file watcher that triggers them.

One Prefect task per input file (streaming its rows through the model in length-sorted batches);
results go to ``<output>/<input file stem>.parquet`` with ``_errors/``, ``_done/`` and ``manifest.json``
beside them (tasks/batch_io.py). A rerun skips files whose done marker exists.

File trigger: ``distilflow watch DIR`` emits ``distilflow.file.ready`` (payload ``{"path", "size"}``) for
each completely written file; a deployment of :func:`fill_mask_flow` with :func:`file_ready_trigger`
maps ``{{ event.payload.path }}`` to the flow's ``input`` parameter (see :func:`serve_fill_mask`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from prefect import flow, task
from prefect.events import DeploymentEventTrigger
from tqdm import tqdm

from distilflow.flows.common import (
    make_task_runner,
    markdown_table,
    publish,
    run_in_subflow,
    wait_with_progress,
)
from distilflow.tasks.core.config import Config
from distilflow.tasks.core.io import expand_inputs
from distilflow.tasks.infer.batch_io import (
    BatchJob,
    open_output,
    output_stage,
    plan_units,
    run_file,
    write_run_manifest,
)
from distilflow.tasks.infer.embed import EmbedConfig, Embedder
from distilflow.tasks.infer.fill_mask import FillMaskConfig, FillMasker
from distilflow.tasks.infer.qa import QAConfig, QuestionAnswerer
from distilflow.tasks.infer.watch import EVENT_NAME, RESOURCE_PREFIX, FolderWatcher

JOBS: dict[str, tuple[type[Config], Callable[[Any], BatchJob]]] = {
    "fill-mask": (FillMaskConfig, FillMasker),
    "qa": (QAConfig, QuestionAnswerer),
    "embed": (EmbedConfig, Embedder),
}


# -- one task per input file -------------------------------------------------------------------------
@task(name="batch-inference-file", retries=0)
def infer_file(unit: tuple[str, str], job_name: str, cfg_dict: dict[str, Any], output: str) -> dict[str, Any]:
    """Run one input file through the model into ``<output>/<key>.parquet``; returns its marker."""
    url, key = unit
    cfg_cls, job_cls = JOBS[job_name]
    cfg = cfg_cls.from_dict(cfg_dict)
    stage = output_stage(output, job_name, cfg.to_dict(), cfg.output_fingerprint())  # type: ignore[attr-defined]
    job = job_cls(cfg)
    show = os.environ.get("DISTILFLOW_PROGRESS", "1") != "0"
    with tqdm(desc=key, unit="row", disable=not show) as bar:
        return run_file(job, stage, url, key, keep_columns=cfg.keep_columns,  # type: ignore[attr-defined]
                        fmt=cfg.format, window_rows=cfg.window_rows, progress=bar.update)  # type: ignore[attr-defined]


def _run(job_name: str, cfg: Config, inputs: str | list[str], output: str, overwrite: bool, workers: int = 1,
         dask_address: str | None = None, dask_workers: int = 0) -> dict[str, Any]:
    """Run the per-file tasks in worker processes or on Dask when the flow's parameters ask for it."""
    if workers > 1 or dask_address or dask_workers:
        return run_in_subflow(_run_files, f"{job_name}-files", make_task_runner(workers, dask_address, dask_workers),
                              job_name=job_name, cfg=cfg, inputs=inputs, output=output, overwrite=overwrite)
    return _run_files(job_name, cfg, inputs, output, overwrite)


def _run_files(job_name: str, cfg: Config, inputs: str | list[str], output: str, overwrite: bool) -> dict[str, Any]:
    """The body shared by the three flows: expand inputs, one task per file, manifest, artifact."""
    urls = expand_inputs([inputs] if isinstance(inputs, str) else list(inputs))
    stage = open_output(output, job_name, cfg.to_dict(), cfg.output_fingerprint(), overwrite)  # type: ignore[attr-defined]
    units = plan_units(urls)
    shard_task = infer_file.with_options(task_run_name=f"{job_name}-{{unit[1]}}")
    # one task per input file, never per row
    futures = [shard_task.submit(u, job_name=job_name, cfg_dict=cfg.to_dict(), output=output) for u in units]
    markers = wait_with_progress(futures, f"{job_name} files")
    manifest = write_run_manifest(stage, [k for _, k in units], {"job": job_name})
    agree, checked = manifest["counts"].get("int8_top1_agree"), manifest["counts"].get("int8_check_masks")
    if checked:
        manifest["int8_top1_agreement"] = agree / checked
    rows = [{"file": m.get("output"), "input_rows": m.get("input_rows"), "ok_rows": m.get("ok_rows"),
             "error_rows": m.get("error_rows"), "resumed": bool(m.get("skipped_done"))} for m in markers]
    publish(f"# {job_name}: {output}\n\n" + markdown_table(rows), key=f"distilflow-{job_name}",
            description=f"{job_name} over {len(units)} file(s)")
    return manifest


def _targets(targets: str | list[str] | None) -> tuple[str, ...]:
    if targets is None:
        return ()
    if isinstance(targets, str):
        return tuple(t.strip() for t in targets.split(",") if t.strip())
    return tuple(targets)


@flow(name="fill-mask")
def fill_mask_flow(
    input: str | list[str],
    output: str,
    model: str,
    top_k: int = 5,
    targets: str | list[str] | None = None,
    text_column: str = "text",
    keep_columns: list[str] | None = None,
    batch_size: int = 64,
    max_length: int = 0,
    too_long: str = "truncate",
    format: str = "parquet",
    device: str = "auto",
    dtype: str = "auto",
    quantize: str = "none",
    threads: int = 0,
    overwrite: bool = False,
    workers: int = 1,
    dask_address: str | None = None,
    dask_workers: int = 0,
) -> dict[str, Any]:
    """Fill-mask predictions for every row of ``input`` (file, folder, glob or list) into ``output``."""
    cfg = FillMaskConfig(model=model, top_k=top_k, targets=_targets(targets), text_column=text_column,
                         keep_columns=tuple(keep_columns or ()), batch_size=batch_size, max_length=max_length,
                         too_long=too_long, format=format, device=device, dtype=dtype,  # type: ignore[arg-type]
                         quantize=quantize, threads=threads)  # type: ignore[arg-type]
    return _run("fill-mask", cfg, input, output, overwrite, workers, dask_address, dask_workers)


@flow(name="qa")
def qa_flow(
    input: str | list[str],
    output: str,
    model: str,
    question_column: str = "question",
    context_column: str = "context",
    keep_columns: list[str] | None = None,
    top_k: int = 1,
    max_seq_len: int = 384,
    doc_stride: int = 128,
    max_answer_len: int = 15,
    handle_impossible_answer: bool = False,
    batch_size: int = 32,
    format: str = "parquet",
    device: str = "auto",
    threads: int = 0,
    overwrite: bool = False,
    workers: int = 1,
    dask_address: str | None = None,
    dask_workers: int = 0,
) -> dict[str, Any]:
    """Extractive QA (answer, score, start, end) for every (question, context) row of ``input``."""
    cfg = QAConfig(model=model, question_column=question_column, context_column=context_column,
                   keep_columns=tuple(keep_columns or ()), top_k=top_k, max_seq_len=max_seq_len,
                   doc_stride=doc_stride, max_answer_len=max_answer_len,
                   handle_impossible_answer=handle_impossible_answer, batch_size=batch_size,
                   format=format, device=device, threads=threads)  # type: ignore[arg-type]
    return _run("qa", cfg, input, output, overwrite, workers, dask_address, dask_workers)


@flow(name="embed")
def embed_flow(
    input: str | list[str],
    output: str,
    model: str,
    pooling: str = "mean",
    normalize: bool = False,
    text_column: str = "text",
    keep_columns: list[str] | None = None,
    max_length: int = 0,
    too_long: str = "truncate",
    batch_size: int = 64,
    format: str = "parquet",
    device: str = "auto",
    threads: int = 0,
    overwrite: bool = False,
    workers: int = 1,
    dask_address: str | None = None,
    dask_workers: int = 0,
) -> dict[str, Any]:
    """Mean-pooled or [CLS] embeddings for every row of ``input`` into ``output``."""
    cfg = EmbedConfig(model=model, pooling=pooling, normalize=normalize, text_column=text_column,  # type: ignore[arg-type]
                      keep_columns=tuple(keep_columns or ()), max_length=max_length, too_long=too_long,  # type: ignore[arg-type]
                      batch_size=batch_size, format=format, device=device, threads=threads)  # type: ignore[arg-type]
    return _run("embed", cfg, input, output, overwrite, workers, dask_address, dask_workers)


# -- trigger -----------------------------------------------------------------------------------------
def file_ready_trigger(parameters: dict[str, Any] | None = None, name: str = "on-file-ready") -> DeploymentEventTrigger:
    """Run the deployment once per ``distilflow.file.ready`` event, with ``input`` = the file's path."""
    return DeploymentEventTrigger(
        name=name,
        expect={EVENT_NAME},
        match={"prefect.resource.id": f"{RESOURCE_PREFIX}*"},
        parameters={"input": "{{ event.payload.path }}", **(parameters or {})},
    )


def serve_fill_mask(output: str, model: str, name: str = "fill-mask-on-file", **params: Any) -> None:
    """Serve :func:`fill_mask_flow` (blocking), started by file events; ``params`` are flow defaults."""
    fill_mask_flow.serve(name=name, triggers=[file_ready_trigger()],
                         parameters={"output": output, "model": model, **params}, print_starting_message=True)


def emit_and_flush(**kwargs: Any) -> None:
    """``prefect.events.emit_event`` and wait until the event has left the process."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    if emit_event(**kwargs) is None:
        raise RuntimeError("Prefect did not emit the event: set PREFECT_API_URL to your Prefect server")
    EventsWorker.drain_all(timeout=30)


# -- CLI ---------------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, text: bool = True) -> None:
    p.add_argument("--input", required=True, nargs="+", metavar="URL_OR_GLOB",
                   help="input files, folders or globs (any fsspec URL): .txt (one text per line), .jsonl, "
                   ".csv/.tsv, .parquet, optionally .gz; .json request files "
                   '{"input_data": [...]} / {"inputs": {"input_string": [...]}}')
    p.add_argument("--output", required=True, metavar="URL",
                   help="output folder: <output>/<input stem>.parquet, _errors/, _done/, manifest.json")
    p.add_argument("--model", required=True, metavar="PATH_OR_HUB_ID", help="model folder or hub id")
    if text:
        p.add_argument("--text-column", default="text",
                       help="text field for .jsonl/.csv/.parquet/.json objects")
    p.add_argument("--keep-columns", default="", metavar="A,B",
                   help="input columns copied to every output row (empty = none)")
    p.add_argument("--format", choices=["parquet", "json"], default="parquet",
                   help="parquet: one row per prediction; json: what the transformers pipeline "
                   "returns, one array element per input row (null for rows in the errors file)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto = cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per worker (0 = torch default)")
    p.add_argument("--workers", type=int, default=1,
                   help="local worker processes, one input file each (1 = in this process)")
    p.add_argument("--dask-address", default=None, metavar="tcp://HOST:8786",
                   help="run the file tasks on this Dask scheduler (None = local)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the output folder first (without it: resume, skipping finished files)")


def _runner(a: argparse.Namespace) -> Any:
    """Local processes (--workers) or a Dask cluster (--dask-address) for the per-file tasks."""
    return make_task_runner(a.workers, a.dask_address)


def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _cmd_fill_mask(a: argparse.Namespace) -> int:
    m = fill_mask_flow.with_options(task_runner=_runner(a))(input=a.input, output=a.output, model=a.model, top_k=a.top_k, targets=_split(a.targets) or None,
                       text_column=a.text_column, keep_columns=_split(a.keep_columns), batch_size=a.batch_size,
                       max_length=a.max_length, too_long=a.too_long, format=a.format, device=a.device,
                       dtype=a.dtype, quantize=a.quantize, threads=a.threads, overwrite=a.overwrite)
    return _report(m)


def _cmd_qa(a: argparse.Namespace) -> int:
    m = qa_flow.with_options(task_runner=_runner(a))(input=a.input, output=a.output, model=a.model, question_column=a.question_column,
                context_column=a.context_column, keep_columns=_split(a.keep_columns), top_k=a.top_k,
                max_seq_len=a.max_seq_len, doc_stride=a.doc_stride, max_answer_len=a.max_answer_len,
                handle_impossible_answer=a.handle_impossible_answer, batch_size=a.batch_size, format=a.format,
                device=a.device, threads=a.threads, overwrite=a.overwrite)
    return _report(m)


def _cmd_embed(a: argparse.Namespace) -> int:
    m = embed_flow.with_options(task_runner=_runner(a))(input=a.input, output=a.output, model=a.model, pooling=a.pooling, normalize=a.normalize,
                   text_column=a.text_column, keep_columns=_split(a.keep_columns), max_length=a.max_length,
                   too_long=a.too_long, batch_size=a.batch_size, format=a.format, device=a.device,
                   threads=a.threads, overwrite=a.overwrite)
    return _report(m)


def _report(m: dict[str, Any]) -> int:
    c = m["counts"]
    extra = f", int8 top-1 agreement {m['int8_top1_agreement']:.4f}" if "int8_top1_agreement" in m else ""
    print(f"{c.get('input_rows', 0):,} input rows: {c.get('ok_rows', 0):,} ok, {c.get('error_rows', 0):,} "
          f"in the errors files{extra}; {m['rows']:,} output rows in {len(m['files'])} file(s)")
    if m.get("skipped"):
        print("errors by reason: " + ", ".join(f"{k}={v}" for k, v in m["skipped"].items()), file=sys.stderr)
    return 0


def _cmd_watch(a: argparse.Namespace) -> int:
    state = a.state or os.path.join(os.path.expanduser("~"), ".distilflow", "watch-" +
                                    "".join(ch if ch.isalnum() else "_" for ch in a.dir.rstrip("/")) + ".json")
    w = FolderWatcher(a.dir, emit_and_flush, state, stable_polls=a.stable_polls, include=tuple(_split(a.include)),
                      recursive=a.recursive, reprocess_changed=a.reprocess_changed)
    print(f"watching {a.dir} every {a.interval}s (state: {state}); Ctrl-C to stop", flush=True)
    try:
        n = w.run(interval=a.interval, max_polls=a.max_polls)
    except KeyboardInterrupt:
        return 0
    print(f"emitted {n} event(s)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    fm = subparsers.add_parser("fill-mask", help="batch fill-mask predictions over stored datasets",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(fm)
    fm.add_argument("--top-k", type=int, default=5, help="predictions per mask")
    fm.add_argument("--targets", default="", metavar="W1,W2",
                    help="restrict scores to these words, as the pipeline does (empty = whole vocabulary)")
    fm.add_argument("--batch-size", type=int, default=64, help="rows per forward pass (length-sorted)")
    fm.add_argument("--max-length", type=int, default=0, help="max tokens per text; 0 = the model's limit")
    fm.add_argument("--too-long", choices=["truncate", "error"], default="truncate",
                    help="texts over max length: keep a window around the masks, or send to the errors file")
    fm.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="auto = bf16 autocast on CUDA, float32 on CPU")
    fm.add_argument("--quantize", choices=["none", "int8"], default="none",
                    help="int8: dynamic int8 Linear layers on CPU (faster, approximate; top-1 agreement with "
                    "float32 is measured on the first window and reported)")
    fm.set_defaults(func=_cmd_fill_mask)

    qa = subparsers.add_parser("qa", help="batch extractive question answering",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(qa, text=False)
    qa.add_argument("--question-column", default="question", help="question field")
    qa.add_argument("--context-column", default="context", help="context field")
    qa.add_argument("--top-k", type=int, default=1, help="answers per question")
    qa.add_argument("--max-seq-len", type=int, default=384, help="tokens per feature (question + context chunk)")
    qa.add_argument("--doc-stride", type=int, default=128, help="overlap between context chunks")
    qa.add_argument("--max-answer-len", type=int, default=15, help="longest answer in tokens")
    qa.add_argument("--handle-impossible-answer", action="store_true", help="allow the empty answer")
    qa.add_argument("--batch-size", type=int, default=32, help="features per forward pass")
    qa.set_defaults(func=_cmd_qa)

    em = subparsers.add_parser("embed", help="batch text embeddings (mean-pooled or [CLS])",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(em)
    em.add_argument("--pooling", choices=["mean", "cls"], default="mean", help="mean over tokens, or [CLS]")
    em.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    em.add_argument("--max-length", type=int, default=0, help="max tokens per text; 0 = the model's limit")
    em.add_argument("--too-long", choices=["truncate", "error"], default="truncate",
                    help="texts over max length: cut the end, or send to the errors file")
    em.add_argument("--batch-size", type=int, default=64, help="rows per forward pass (length-sorted)")
    em.set_defaults(func=_cmd_embed)

    wa = subparsers.add_parser("watch", help="emit a Prefect event for each completely written file in DIR",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    wa.add_argument("dir", metavar="DIR", help="folder to watch (any fsspec URL)")
    wa.add_argument("--state", default=None,
                    help="JSON file recording emitted files (None = ~/.distilflow/watch-<DIR>.json)")
    wa.add_argument("--interval", type=float, default=2.0, help="seconds between polls")
    wa.add_argument("--stable-polls", type=int, default=2,
                    help="a file is ready when its size and mtime are unchanged over this many polls")
    wa.add_argument("--include", default="*", metavar="GLOB,GLOB", help="file name patterns to watch")
    wa.add_argument("--recursive", action="store_true", help="also watch sub-folders")
    wa.add_argument("--reprocess-changed", action="store_true",
                    help="emit again when an emitted file's size/mtime changes (without it: each path once)")
    wa.add_argument("--max-polls", type=int, default=0, help="stop after this many polls (0 = forever)")
    wa.set_defaults(func=_cmd_watch)
