"""Reader / writer / batching machinery shared by the batch-inference jobs (fill-mask, QA, embed).

One input file = one unit of work (a Prefect task in flows/inference.py). For each file we:

1. read rows with :func:`iter_rows` -- text/JSONL/CSV/Parquet(+gz) through ``readers.iter_records``,
   plus the JSON *request* files users already send to hosted endpoints::

       {"input_data": ["Paris is the [MASK] of France.", ...]}
       {"inputs": {"input_string": ["...", ...]}}
       {"inputs": {"question": [...], "context": [...]}}          (QA, also {"question": .., "context": ..})

   Every row gets a stable ``row_id`` (0-based input order in its file, counting bad rows too);
2. take a window of rows, let the job sort them by token length and run length-sorted batches
   (:func:`length_sorted_batches`), and get back output columns in ``row_id`` order;
3. stream those columns into one Parquet file with an explicit schema (:class:`ParquetStreamWriter`,
   written to a temp file and renamed into place by ``io.atomic_open``) -- or a JSON array;
4. write bad rows (reason + how to fix) to ``_errors/<key>.jsonl`` and a ``_done/<key>.json`` marker
   whose counts account for every input row (``ok + errors == input_rows``); ``StageDir`` turns the
   markers into ``manifest.json`` and skips finished files on a rerun.

No Prefect here: flows/inference.py calls :func:`run_file` once per input file.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import IO, Any, Protocol, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from distilflow.tasks.core.io import (
    PARQUET_WRITE_OPTS,
    atomic_open,
    file_identity,
    join,
    open_input,
    split_compression,
)
from distilflow.tasks.core.readers import FIXES, BadRecord, Record, detect_format, iter_records
from distilflow.tasks.core.stage import StageDir, complete_deps, deps_unchanged

T = TypeVar("T")

# Reasons specific to batch inference, appended to the readers' list of fixes.
BATCH_FIXES: dict[str, str] = {
    "empty_text": "the row has no text; drop blank lines/rows",
    "no_mask": "write the blank to fill as [MASK] (or [mask])",
    "too_long": "the text has more tokens than the model accepts; use --too-long truncate or shorten it",
    "masks_too_far_apart": "the masks are further apart than the model's max length; split the text",
    "question_too_long": "the question alone is longer than --max-seq-len; shorten it",
    "malformed_request": 'a JSON request must look like {"input_data": [...]} or {"inputs": {"input_string": [...]}}',
    **FIXES,
}


@dataclass(frozen=True)
class InputRow:
    """One good input row: ``values`` holds the job's input columns (e.g. text, or question+context)."""

    row_id: int
    line: int | None
    values: dict[str, str]
    keep: dict[str, Any] = field(default_factory=dict)  # --keep-columns carried to the output


@dataclass(frozen=True)
class ErrorRow:
    """A row (or a whole file when ``row_id`` is None) that produced no output, and why."""

    file: str
    row_id: int | None
    line: int | None
    reason: str
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        detail = f" ({self.detail})" if self.detail else ""
        fix = BATCH_FIXES.get(self.reason, "check this record")
        return {"file": self.file, "row_id": self.row_id, "line": self.line, "reason": self.reason,
                "detail": self.detail, "message": f"{where}: {self.reason}{detail}; fix: {fix}"}


# -- reading ---------------------------------------------------------------------------------------
def output_stem(url: str) -> str:
    """``s3://b/in/day-01.jsonl.gz`` -> ``day-01`` (the output is ``<output>/<stem>.parquet``)."""
    base, _ = split_compression(url)
    name = base.rstrip("/").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in name[1:] else name


def _is_json_document(url: str) -> bool:
    base, _ = split_compression(url)
    return base.lower().endswith(".json")


def iter_rows(
    url: str,
    columns: Sequence[str] = ("text",),
    keep_columns: Sequence[str] = (),
    fmt: str | None = None,
) -> Iterator[InputRow | ErrorRow]:
    """Rows of one input file, each with the ``columns`` the job needs (all strings) and a row_id.

    ``columns[0]`` is the text column (``--text-column``); QA passes ``("question", "context")``.
    ``.json`` files are first tried as one request document; if that fails they are read as JSONL.
    """
    if _is_json_document(url) and fmt in (None, "json"):
        request = _read_request(url)
        if request is not None:
            yield from _rows_from_request(url, request, columns, keep_columns)
            return
    row_id = 0
    others = tuple(c for c in columns[1:])
    keep = tuple(dict.fromkeys([*others, *keep_columns]))
    for rec in iter_records(url, fmt=None if fmt in (None, "json") else fmt,  # type: ignore[arg-type]
                            text_field=columns[0], keep_fields=keep):
        if isinstance(rec, BadRecord):
            if rec.line is None:  # whole-file problem (empty, binary, unreadable, missing column)
                yield ErrorRow(rec.file, None, None, rec.reason, rec.detail)
                continue
            yield ErrorRow(rec.file, row_id, rec.line, rec.reason, rec.detail)
        else:
            yield _make_row(url, row_id, rec, columns, keep_columns)
        row_id += 1


def _make_row(url: str, row_id: int, rec: Record, columns: Sequence[str],
              keep_columns: Sequence[str]) -> InputRow | ErrorRow:
    values = {columns[0]: rec.text}
    for c in columns[1:]:
        v = rec.fields.get(c)
        if v is None:
            return ErrorRow(url, row_id, rec.line, "missing_field", f"no {c!r} value")
        if not isinstance(v, str):
            return ErrorRow(url, row_id, rec.line, "not_a_string", f"{c!r} is {type(v).__name__}")
        values[c] = v
    for c, v in values.items():
        if not v.strip():
            return ErrorRow(url, row_id, rec.line, "empty_text", f"{c!r} is blank")
    return InputRow(row_id, rec.line, values, {k: rec.fields.get(k) for k in keep_columns})


def _read_request(url: str) -> Any | None:
    """Parse a whole-file JSON request; None if the file is not one JSON document (then: JSONL)."""
    try:
        with open_input(url) as f:
            return json.loads(f.read().decode("utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, EOFError):
        return None


def _rows_from_request(url: str, req: Any, columns: Sequence[str],
                       keep_columns: Sequence[str]) -> Iterator[InputRow | ErrorRow]:
    """Accept the hosted-endpoint request shapes; items are strings or objects with the columns."""
    items: Any = None
    if isinstance(req, dict):
        if "input_data" in req:
            items = req["input_data"]
            if isinstance(items, dict):  # {"input_data": {"columns": [...], "data": [[...]]}}
                items = _split_records(items)
        elif "inputs" in req:
            inputs = req["inputs"]
            if isinstance(inputs, dict) and "input_string" in inputs:
                items = inputs["input_string"]
            elif isinstance(inputs, dict) and all(c in inputs for c in columns):
                items = _columns_to_items(inputs, columns)
            else:
                items = inputs
        elif all(c in req for c in columns):  # a single QA-style object, or {"question": [...], ...}
            items = _columns_to_items(req, columns)
    elif isinstance(req, list):
        items = req
    if isinstance(items, str | dict):
        items = [items]
    if not isinstance(items, list):
        yield ErrorRow(url, None, None, "malformed_request",
                       f"top-level keys {sorted(req) if isinstance(req, dict) else type(req).__name__}")
        return
    for row_id, item in enumerate(items):
        if isinstance(item, str) and len(columns) == 1:
            item = {columns[0]: item}
        if not isinstance(item, dict):
            yield ErrorRow(url, row_id, None, "not_a_string", f"item is {type(item).__name__}")
            continue
        rec_fields = {k: item.get(k) for k in [*columns[1:], *keep_columns]}
        text = item.get(columns[0])
        if not isinstance(text, str):
            reason = "missing_field" if text is None else "not_a_string"
            yield ErrorRow(url, row_id, None, reason, f"{columns[0]!r} in item {row_id}")
            continue
        yield _make_row(url, row_id, Record(text, row_id, rec_fields), columns, keep_columns)


def request_rows(req: Any, columns: Sequence[str]) -> Iterator[InputRow | ErrorRow]:
    """Rows of one request body in the hosted endpoints' shapes: ``distilflow serve`` reads its HTTP bodies
    with the same parser as the batch jobs' ``.json`` request files."""
    return _rows_from_request("request", req, columns, ())


def _columns_to_items(obj: dict[str, Any], columns: Sequence[str]) -> list[Any]:
    vals = [obj[c] for c in columns]
    if all(isinstance(v, list) for v in vals):
        return [dict(zip(columns, t, strict=False)) for t in zip(*vals, strict=False)]
    return [{c: obj[c] for c in columns}]


def _split_records(obj: dict[str, Any]) -> list[Any] | None:
    cols, data = obj.get("columns"), obj.get("data")
    if isinstance(cols, list) and isinstance(data, list):
        return [dict(zip(cols, r, strict=False)) if isinstance(r, list) else r for r in data]
    return None


def windows(rows: Iterable[T], size: int) -> Iterator[list[T]]:
    """Chunks of ``size`` items: the unit that is length-sorted and written (bounded memory)."""
    buf: list[T] = []
    for r in rows:
        buf.append(r)
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf


def length_sorted_batches(lengths: Sequence[int], batch_size: int, max_tokens: int = 0) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so padding is minimal.

    ``max_tokens`` > 0 also caps ``batch_len * max_len_in_batch`` (memory bound for long rows).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = lengths[cur[0]] if cur else lengths[i]
        if cur and (len(cur) >= batch_size or (max_tokens and (len(cur) + 1) * longest > max_tokens)):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


# -- writing ---------------------------------------------------------------------------------------
class ParquetStreamWriter:
    """Append column batches to one Parquet file with a fixed schema; the file appears atomically.

    >>> with ParquetStreamWriter(url, schema) as w:
    ...     w.write({"row_id": [0, 1], ...})
    """

    def __init__(self, url: str, schema: pa.Schema, row_group_size: int = 65536):
        self.url, self.schema, self.row_group_size = url, schema, row_group_size
        self.rows = 0
        self._stack = ExitStack()
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> ParquetStreamWriter:
        f = self._stack.enter_context(atomic_open(self.url, "wb"))
        self._writer = pq.ParquetWriter(f, self.schema, **PARQUET_WRITE_OPTS)
        return self

    def write(self, columns: dict[str, list[Any]]) -> None:
        assert self._writer is not None
        table = pa.Table.from_pydict({n: columns[n] for n in self.schema.names}, schema=self.schema)
        if table.num_rows:
            self._writer.write_table(table, row_group_size=self.row_group_size)
            self.rows += table.num_rows

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._writer is not None:
            self._writer.close()  # writes the footer (also for an empty file: the schema stays readable)
        # ExitStack renames the temp file into place only when no exception is pending
        self._stack.__exit__(exc_type, exc, tb)


class JsonArrayWriter:
    """A JSON array, one element per input row_id (``null`` for rows in the errors file)."""

    def __init__(self, url: str):
        self.url = url
        self.rows = 0
        self._stack = ExitStack()
        self._f: IO[str] | None = None
        self._next_row = 0

    def __enter__(self) -> JsonArrayWriter:
        self._f = self._stack.enter_context(atomic_open(self.url, "w"))
        self._f.write("[")
        return self

    def write_rows(self, items: list[tuple[int, Any]]) -> None:
        assert self._f is not None
        for row_id, obj in items:
            while self._next_row < row_id:  # rows that went to the errors file keep their slot
                self._emit(None)
            self._emit(obj)
            self.rows += obj is not None

    def pad_to(self, n_rows: int) -> None:
        while self._next_row < n_rows:
            self._emit(None)

    def _emit(self, obj: Any) -> None:
        assert self._f is not None
        self._f.write(("\n" if self._next_row == 0 else ",\n") + json.dumps(obj, ensure_ascii=False))
        self._next_row += 1

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._f is not None and exc_type is None:
            self._f.write("\n]\n")
        self._stack.__exit__(exc_type, exc, tb)


def keep_column_types(url: str, keep_columns: Sequence[str]) -> dict[str, pa.DataType]:
    """Arrow types of carried-through columns: the source type for Parquet inputs, else string."""
    types: dict[str, pa.DataType] = {c: pa.string() for c in keep_columns}
    if keep_columns and detect_format(url) == "parquet":
        with fsspec.open(url, "rb") as f:
            src = pq.ParquetFile(f).schema_arrow
        for c in keep_columns:
            if c in src.names:
                types[c] = src.field(c).type
    return types


def keep_value(v: Any, tp: pa.DataType) -> Any:
    """CSV/JSON values go to string columns (JSON values that are not strings as JSON text)."""
    if v is None or not pa.types.is_string(tp) or isinstance(v, str):
        return v
    return json.dumps(v, ensure_ascii=False)


# -- one input file = one unit ---------------------------------------------------------------------
@dataclass
class WindowResult:
    """What a job returns for one window of rows (columns already in row_id order)."""

    columns: dict[str, list[Any]]  # output columns without the keep columns
    row_ids: list[int]  # row_id of each output row (to repeat keep columns)
    json_items: list[tuple[int, Any]] = field(default_factory=list)  # (row_id, pipeline-style output)
    errors: list[ErrorRow] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)  # extra counters, summed over windows


class BatchJob(Protocol):
    """What fill-mask / QA / embed provide to :func:`run_file`."""

    input_columns: tuple[str, ...]

    def schema(self) -> pa.Schema: ...

    def process(self, rows: list[InputRow], url: str) -> WindowResult: ...


def unit_key(url: str, taken: set[str]) -> str:
    """Marker key / output stem of an input file; stems repeated within one run get a numeric suffix."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", output_stem(url)) or "input"
    key, n = stem, 1
    while key in taken:
        n += 1
        key = f"{stem}-{n}"
    taken.add(key)
    return key


def plan_units(urls: Sequence[str]) -> list[tuple[str, str]]:
    """(input URL, key) per file: the key names ``<output>/<key>.parquet`` and the done marker."""
    taken: set[str] = set()
    return [(u, unit_key(u, taken)) for u in urls]


def output_stage(output: str, stage_name: str, config: dict[str, Any], fingerprint: str) -> StageDir:
    """A StageDir whose folder is ``output`` itself (contract: ``<output>/<input stem>.parquet``)."""
    stage = StageDir(output, stage_name, config, fingerprint)
    stage.url = output.rstrip("/")  # results live directly in --output, not in a sub-folder
    return stage


def open_output(output: str, stage_name: str, config: dict[str, Any], fingerprint: str,
                overwrite: bool = False) -> StageDir:
    """:func:`output_stage`, opened: config.json saved, or checked against the one already there."""
    stage = output_stage(output, stage_name, config, fingerprint)
    stage.open(overwrite=overwrite)
    return stage


_LOADED: dict[str, str] = {}  # model path -> identity of the files loaded from it in this process


def forget_stale_model(job_name: str, model: str, identity: str | None) -> None:
    """The jobs cache loaded models per process, by path (``functools.lru_cache``). When the files at
    ``model`` changed since they were loaded here (weights replaced in place; a long-lived process), drop
    the job module's cached loads so that the new weights are the ones used."""
    if identity is None:
        return
    if _LOADED.get(model, identity) != identity:
        import importlib

        from distilflow.tasks.infer.config import _JOBS

        module = importlib.import_module(_JOBS[job_name][1].partition(":")[0])
        for obj in list(vars(module).values()):
            if callable(getattr(obj, "cache_clear", None)):
                obj.cache_clear()
    _LOADED[model] = identity


def run_file(
    job: BatchJob,
    stage: StageDir,
    url: str,
    key: str,
    keep_columns: Sequence[str] = (),
    fmt: str = "parquet",
    window_rows: int = 4096,
    progress: Callable[[int], None] | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """Process one input file into ``<stage>/<key>.parquet`` (or ``.json``); returns its done marker.

    Skips the file when its marker records the same input URL and identity (size, mtime, content hash)
    and the same ``model`` identity (:func:`~distilflow.tasks.core.io.folder_identity`): a grown input or
    replaced weights are run again. The marker is written only after the output and errors file are in
    place.
    """
    current = {"input": file_identity(url), **({"model": model} if model is not None else {})}
    marker = stage.marker(key)
    if marker is not None and deps_unchanged(marker.get("deps"), current):
        return {**marker, "skipped_done": True}
    if marker is not None:
        stage.invalidate(key, marker)
    deps = complete_deps(current)  # before reading: a file that changes while it is read is redone next time
    size = current["input"]["size"]
    out_name = f"{key}.{'json' if fmt == 'json' else 'parquet'}"
    out_url = join(stage.url, out_name)
    keep_types = keep_column_types(url, keep_columns) if fmt != "json" else {}
    schema = job.schema()
    for c in keep_columns:
        if c not in schema.names:
            schema = schema.append(pa.field(c, keep_types[c]))
    errors: list[dict[str, Any]] = []
    counts: Counter[str] = Counter()
    stats: Counter[str] = Counter()
    n_rows = 0
    written = 0  # input rows with output (counted from what is written: the manifest checks the sum)
    writer: ParquetStreamWriter | JsonArrayWriter
    writer = JsonArrayWriter(out_url) if fmt == "json" else ParquetStreamWriter(out_url, schema)
    with writer:
        for window in windows(iter_rows(url, job.input_columns, keep_columns), window_rows):
            good = [r for r in window if isinstance(r, InputRow)]
            bad = [r for r in window if isinstance(r, ErrorRow)]
            n_rows += sum(r.row_id is not None for r in window)
            res = job.process(good, url) if good else WindowResult({n: [] for n in schema.names}, [])
            bad.extend(res.errors)
            bad.sort(key=lambda e: (e.row_id is None, e.row_id or 0))
            errors.extend(e.to_dict() for e in bad)
            counts.update(e.reason for e in bad)
            stats.update(res.stats)
            written += len({i for i, obj in res.json_items if obj is not None} if fmt == "json" else set(res.row_ids))
            if isinstance(writer, JsonArrayWriter):
                writer.write_rows(res.json_items)
            else:
                by_id = {r.row_id: r for r in good}
                cols = dict(res.columns)
                for c in keep_columns:
                    if c not in cols:
                        cols[c] = [keep_value(by_id[i].keep.get(c), keep_types[c]) for i in res.row_ids]
                writer.write(cols)
            if progress:
                progress(len(window))
        if isinstance(writer, JsonArrayWriter):
            writer.pad_to(n_rows)
    bad_rows = sum(1 for e in errors if e["row_id"] is not None)
    errors_file = stage.write_errors(key, errors)
    marker = {
        "input": url,
        "input_size": size,
        "output": out_name,
        "files": [{"file": out_name, "rows": writer.rows}],
        "input_rows": n_rows,
        "ok_rows": n_rows - bad_rows,
        "error_rows": bad_rows,
        "file_errors": len(errors) - bad_rows,
        "counts": {"input_rows": n_rows, "ok_rows": n_rows - bad_rows, "error_rows": bad_rows,
                   **{k: v for k, v in stats.items()}},
        "skipped": dict(sorted(counts.items())),
        "errors_file": errors_file,
        # every row, and each whole-file problem (binary, empty, unreadable ...) as one record
        "records": {"read": n_rows + len(errors) - bad_rows, "written": written},
        "deps": deps,  # what the output was made from: the input file's identity, the model's
    }
    stage.mark_done(key, marker)
    return marker


def write_run_manifest(stage: StageDir, keys: Sequence[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """manifest.json over every finished file in the folder (earlier triggered runs included)."""
    all_keys = sorted(set(keys) | set(stage.done_markers()))
    return stage.write_manifest(all_keys, extra)
