"""``distilflow serve --model DIR``: the hosted catalogue's request shapes answered over HTTP at ``POST /score``.

One code path with the batch jobs: a request body is read by the same parser as the batch jobs' ``.json``
request files (``batch_io.request_rows``: ``{"input_data": [...]}``, ``{"input_data": {"columns", "data"}}``,
``{"inputs": {"input_string": [...]}}``, ``{"question": ..., "context": ...}``) and scored by the same job
objects (``FillMasker``, ``QuestionAnswerer``, ``Embedder``: length-sorted batches, the mask-only last
layer, one batch per core). Answers are what the batch jobs' ``--format json`` writes for the same text:

* fill-mask: one element per input, the pipeline's list of ``{score, token, token_str, sequence}``
  (a list of such lists for a text with several masks);
* qa: the answer strings, ``{"question": "What's my name?", "context": "My name is John ..."}`` ->
  ``["John"]`` (as the catalogue card shows);
* embed: one vector per input.

Micro-batching: requests wait in a queue; a single worker takes whatever has arrived -- up to
``max_batch`` rows, waiting at most ``max_wait_ms`` for more after the first -- and scores it as one window,
so concurrent requests share forward passes. A bad request gets 400 with the reason and the fix (the
batch jobs' error rows, e.g. ``no_mask: write the blank to fill as [MASK]``); a body that is not JSON 400.
Binds 127.0.0.1 unless ``--host`` says otherwise (the endpoint has no authentication).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from distilflow.tasks.core.errors import InputError
from distilflow.tasks.infer.config import ServeConfig


def resolve_task(cfg: ServeConfig) -> str:
    if cfg.task != "auto":
        return cfg.task
    from distilflow.tasks.core.hf import local_model

    path = local_model(cfg.model)
    try:
        with open(f"{path}/config.json") as f:
            archs = json.load(f).get("architectures") or []
    except OSError as e:
        raise InputError(f"{cfg.model}: no config.json ({e.strerror}); give a model folder written by "
                         "save_pretrained") from e
    return "qa" if any("QuestionAnswering" in a for a in archs) else "fill-mask"


def build_job(cfg: ServeConfig, task: str) -> Any:
    """The batch job that scores the rows (the same classes as ``distilflow fill-mask/qa/embed``)."""
    common: dict[str, Any] = {"model": cfg.model, "device": cfg.device, "threads": cfg.threads, "format": "json"}
    if cfg.top_k is not None and task != "embed":
        common["top_k"] = cfg.top_k
    if task == "fill-mask":
        from distilflow.tasks.infer.config import FillMaskConfig
        from distilflow.tasks.infer.fill_mask import FillMasker

        return FillMasker(FillMaskConfig(**common, batch_size=cfg.max_batch,
                                         window_rows=cfg.max_batch))
    if task == "qa":
        from distilflow.tasks.infer.config import QAConfig
        from distilflow.tasks.infer.qa import QuestionAnswerer

        return QuestionAnswerer(QAConfig(**common))
    from distilflow.tasks.infer.config import EmbedConfig
    from distilflow.tasks.infer.embed import Embedder

    return Embedder(EmbedConfig(**common, batch_size=cfg.max_batch))


@dataclass
class _Pending:
    rows: list[Any]  # InputRow, row_id = index in the request
    future: asyncio.Future[Any]
    answers: dict[int, Any] = field(default_factory=dict)


class MicroBatcher:
    """Collects the rows of concurrent requests into one window for ``job.process`` (run in one thread)."""

    def __init__(self, job: Any, max_batch: int, max_wait_ms: float):
        self.job, self.max_batch, self.max_wait = job, max_batch, max_wait_ms / 1000.0
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.batches = 0

    async def score(self, rows: list[Any]) -> tuple[dict[int, Any], list[Any]]:
        """(answers by row_id, error rows) for one request's rows."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(rows, fut))
        return await fut  # type: ignore[no-any-return]

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            group = [await self.queue.get()]
            n, deadline = len(group[0].rows), loop.time() + self.max_wait
            while n < self.max_batch:
                try:
                    nxt = await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    break
                group.append(nxt)
                n += len(nxt.rows)
            try:
                results = await loop.run_in_executor(None, self._process, group)
            except Exception as e:  # a bug: every waiting request gets it (500), the server keeps serving
                for p in group:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            for p, res in zip(group, results, strict=True):
                if not p.future.done():
                    p.future.set_result(res)

    def _process(self, group: list[_Pending]) -> list[tuple[dict[int, Any], list[Any]]]:
        """All rows of the group as one window; answers and errors handed back to their requests."""
        from distilflow.tasks.infer.batch_io import InputRow

        rows: list[Any] = []
        owner: list[tuple[int, int]] = []
        for gi, p in enumerate(group):
            for r in p.rows:
                owner.append((gi, r.row_id))
                rows.append(InputRow(len(rows), r.line, r.values, r.keep))
        self.batches += 1
        res = self.job.process(rows, "request")
        out: list[tuple[dict[int, Any], list[Any]]] = [({}, []) for _ in group]
        for rid, item in res.json_items:
            gi, own = owner[rid]
            out[gi][0][own] = item
        for e in res.errors:
            gi, own = owner[e.row_id]
            out[gi][1].append((own, e))
        return out


def create_app(cfg: ServeConfig, job: Any | None = None, task: str | None = None) -> Any:
    """The FastAPI app (``job``/``task`` given by tests; otherwise built from ``cfg``)."""
    from contextlib import asynccontextmanager

    from distilflow.tasks.infer.batch_io import ErrorRow, request_rows

    task = task or resolve_task(cfg)
    job = job or build_job(cfg, task)
    batcher = MicroBatcher(job, cfg.max_batch, cfg.max_wait_ms)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        worker = asyncio.create_task(batcher.run())
        yield
        worker.cancel()

    app = FastAPI(title=f"distilflow {task}: {cfg.model}", lifespan=lifespan)
    app.state.batcher = batcher

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "task": task, "model": cfg.model, "batches": batcher.batches}

    @app.post("/score")
    async def score(request: Request) -> Any:
        t0 = time.perf_counter()
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return JSONResponse({"error": f"the body is not JSON ({e})"}, status_code=400)
        parsed = list(request_rows(body, job.input_columns))
        bad = [r for r in parsed if isinstance(r, ErrorRow)]
        rows = [r for r in parsed if not isinstance(r, ErrorRow)]
        if not bad and not rows:
            return JSONResponse({"error": "no inputs in the request"}, status_code=400)
        if not bad:
            answers, errs = await batcher.score(rows)
            bad = [e for _, e in sorted(errs, key=lambda x: x[0])]
        if bad:
            return JSONResponse({"error": "; ".join(_message(e) for e in bad[:5])}, status_code=400)
        ordered = [answers[r.row_id] for r in rows]
        if task == "qa":
            ordered = [[a["answer"] for a in (x if isinstance(x, list) else [x])] for x in ordered]
            ordered = [a for x in ordered for a in x]  # the card's shape: ["John"]
        return JSONResponse(ordered, headers={"x-distilflow-seconds": f"{time.perf_counter() - t0:.4f}"})

    return app


def _message(e: Any) -> str:
    m = e.to_dict()["message"]
    return str(m).replace("request: ", f"input {e.row_id}: " if e.row_id is not None else "")


def run_serve(cfg: ServeConfig) -> int:
    import uvicorn

    task = resolve_task(cfg)
    app = create_app(cfg, task=task)
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"distilflow serve: WARNING: binding {cfg.host}; the endpoint has no authentication")
    print(f"serving {task} for {cfg.model} at http://{cfg.host}:{cfg.port}/score (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    return 0
