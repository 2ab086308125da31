"""Stage 1 -- shard: input files -> documents -> sentences -> ``DIR/corpus/part-FFFFF-PPPP.parquet``.

One unit of work per input file (sorted input order gives file number ``FFFFF``); a large file is
written as several parts ``PPPP`` of at most ``part_bytes`` of text, so memory stays bounded whatever
the input size. Documents:

* plain text: a blank line ends a document; lines inside are joined (hard-wrapped paragraphs);
* JSONL / CSV / Parquet: one record = one document (``text_field``).

``doc_id`` is ``<input path relative to the common input folder>#<document number>``: stable across
reruns and machines, readable, and independent of how many workers ran.
"""

from __future__ import annotations

import io
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from distilflow.tasks.core.config import Config, require
from distilflow.tasks.core.io import ParquetRowGroups, file_size, join, open_input, release_memory
from distilflow.tasks.core.readers import (
    SNIFF_BYTES,
    BadRecord,
    binary_reason,
    detect_format,
    iter_lines,
    iter_records,
)
from distilflow.tasks.core.stage import StageDir
from distilflow.tasks.prepare.sentences import SPLITTER_VERSION, normalize_whitespace, split_sentences

CORPUS_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("sentences", pa.list_(pa.string()), nullable=False),
    ]
)


@dataclass(frozen=True)
class ShardConfig(Config):
    format: Literal["auto", "text", "jsonl", "csv", "parquet"] = "auto"
    text_field: str = "text"  # JSONL key / CSV or Parquet column holding the text
    one_sentence_per_line: bool = False  # Google's create_pretraining_data.py input layout
    max_line_bytes: int = 1 << 20  # longer lines are quarantined, never held in memory
    max_doc_bytes: int = 4 << 20  # a longer document is cut into several (counted)
    part_bytes: int = 16 << 20  # text per output part: bounds memory of this and the next stage
    # The sentence splitter's rules (2: abbreviations matched with their case). Part of the fingerprint:
    # a corpus split by another version is refused on resume instead of mixing parts of both.
    splitter_version: int = SPLITTER_VERSION

    def check(self) -> None:
        n = type(self).__name__
        require(bool(self.text_field), n, "text_field", "must not be empty")
        require(self.max_line_bytes >= 1024, n, "max_line_bytes", f"must be >= 1024, got {self.max_line_bytes}")
        require(self.max_doc_bytes >= 1024, n, "max_doc_bytes", f"must be >= 1024, got {self.max_doc_bytes}")
        require(self.part_bytes >= 1024, n, "part_bytes", f"must be >= 1024, got {self.part_bytes}")
        require(self.splitter_version == SPLITTER_VERSION, n, "splitter_version",
                f"this version of distilflow splits sentences with rules {SPLITTER_VERSION}, not {self.splitter_version}")


@dataclass(frozen=True)
class ShardUnit:
    key: str  # "00003": the input file's position in the sorted input list
    url: str  # the input file
    rel: str  # its path relative to the common input folder (used in doc_id)


def plan_shard_units(files: list[str]) -> list[ShardUnit]:
    """Sorted input files -> units. Relative names come from the longest common folder prefix."""
    files = sorted(files)
    if len(files) == 1:
        prefix = files[0].rsplit("/", 1)[0] + "/" if "/" in files[0] else ""
    else:
        prefix = _common_folder(files)
    return [ShardUnit(f"{i:05d}", f, f[len(prefix):]) for i, f in enumerate(files)]


def _common_folder(paths: list[str]) -> str:
    first, last = min(paths), max(paths)
    i = 0
    while i < min(len(first), len(last)) and first[i] == last[i]:
        i += 1
    common = first[:i]
    return common[: common.rfind("/") + 1] if "/" in common else ""


def iter_documents(unit: ShardUnit, cfg: ShardConfig) -> Iterator[tuple[str, int] | BadRecord]:
    """Yield ``(document_text, first_line)`` or BadRecord. Text documents end at blank lines."""
    fmt = detect_format(unit.url) if cfg.format == "auto" else cfg.format
    if fmt != "text":
        for rec in iter_records(unit.url, fmt, cfg.text_field, cfg.max_line_bytes):
            yield rec if isinstance(rec, BadRecord) else (rec.text, rec.line)
        return
    try:
        with open_input(unit.url) as f:
            yield from _text_documents(unit.url, f, cfg)
    except (OSError, EOFError, ValueError) as e:  # gzip CRC errors, truncated files, S3 errors
        yield BadRecord(unit.url, None, "unreadable_file", f"{type(e).__name__}: {e}")


ROW_GROUP_DOCS = 1024  # documents per Parquet row group of a corpus part
BLOCK_BYTES = 2 << 20  # text read per block by the fast reader (8 MB blocks: +40 MB peak, no faster)
# A document ends at a line that is empty or whitespace-only. On bytes only ASCII-blank lines are seen:
# a subset of the boundaries, used only to cut blocks at a safe place (the decoded text is split exactly).
_BLANK_BYTES = re.compile(rb"\n[ \t\r\f\v]*\n")
_BLANK_TEXT = re.compile(r"\n\s*\n")  # \s is str.isspace(): exactly the old per-line test


def _text_documents(url: str, f, cfg: ShardConfig) -> Iterator[tuple[str, int] | BadRecord]:
    """Documents of a plain-text file, read in blocks of whole documents and split with one regex pass.

    The same documents as :func:`_line_documents` (the per-line reference, kept for everything unusual):
    a block is handed to it, with the rest of the file, as soon as it holds invalid UTF-8, a line longer
    than ``max_line_bytes``, a binary first block (readers.binary_reason), or a document that may need cutting
    (``>= max_doc_bytes``). Document texts differ only in whitespace, which sentence splitting collapses.
    """
    pending = b""  # bytes from a document boundary on, not processed yet
    lines_before = 0  # lines of the file before ``pending``
    start = True  # the next chunk starts the file (byte-order mark)
    max_pending = max(4 * BLOCK_BYTES, cfg.max_doc_bytes)
    raw = f.read(max(BLOCK_BYTES, SNIFF_BYTES))  # at least what the binary check looks at
    if not raw or binary_reason(raw[:SNIFF_BYTES]) is not None:  # empty or binary: reported by the reference
        yield from _line_documents(url, _Prefixed(raw, f), cfg)
        return
    while True:
        data = pending + raw
        if raw and len(data) - data.rfind(b"\n") - 1 > cfg.max_line_bytes:  # a too-long line: never hold it
            yield from _line_documents(url, _Prefixed(data, f), cfg, lines_before)
            return
        if raw:
            cut = _last_boundary(data)
            if cut == 0:
                if len(data) > max_pending:  # no boundary in sight: one huge document or a huge line
                    yield from _line_documents(url, _Prefixed(data, f), cfg, lines_before)
                    return
                pending = data
                raw = f.read(BLOCK_BYTES)
                continue
        else:
            cut = len(data)
        chunk, pending = data[:cut], data[cut:]
        if not chunk:
            return
        text = _clean_text(chunk, cfg.max_line_bytes)
        if text is None:
            yield from _line_documents(url, _Prefixed(chunk + pending, f), cfg, lines_before)
            return
        if start and text.startswith("\ufeff"):
            text = text[1:]  # UTF-8 byte-order mark
        start = False
        pos = 0
        for m in [*_BLANK_TEXT.finditer(text), None]:
            end = m.start() if m is not None else len(text)
            piece = text[pos:end]
            if len(piece) >= cfg.max_doc_bytes:  # may be cut into several: the reference decides where
                first = lines_before + text.count("\n", 0, pos)
                yield from _group_lines(url, enumerate(piece.split("\n"), first + 1), cfg)
            elif not piece.isspace() and piece:
                yield piece, 0
            pos = m.end() if m is not None else len(text)
        lines_before += chunk.count(b"\n")
        raw = f.read(BLOCK_BYTES)


def _last_boundary(data: bytes) -> int:
    """Offset just after the last ASCII-blank line in ``data`` (0 if none)."""
    tail = max(0, len(data) - (1 << 16))
    while True:
        ends = [m.end() for m in _BLANK_BYTES.finditer(data, tail)]
        if ends:
            return ends[-1]
        if tail == 0:
            return 0
        tail = 0


def _clean_text(chunk: bytes, max_line_bytes: int) -> str | None:
    """``chunk`` decoded, or None if it holds invalid UTF-8 or a line longer than ``max_line_bytes``."""
    nl = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10)
    ends = np.append(nl, len(chunk)) if not chunk.endswith(b"\n") else nl
    if len(ends) and int(np.diff(ends, prepend=-1).max()) - 1 > max_line_bytes:
        return None
    try:
        return chunk.decode("utf-8")
    except UnicodeDecodeError:
        return None


class _Prefixed(io.RawIOBase):
    """``prefix`` then the rest of ``f``, as one readable binary stream (hands a block back to the
    per-line reader)."""

    def __init__(self, prefix: bytes, f) -> None:
        self.prefix, self.f = memoryview(prefix), f

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        if len(self.prefix):
            n = min(len(b), len(self.prefix))
            b[:n] = self.prefix[:n]
            self.prefix = self.prefix[n:]
            return n
        data = self.f.read(len(b))
        b[:len(data)] = data
        return len(data)


def _line_documents(url: str, raw, cfg: ShardConfig, start_line: int = 0) -> Iterator[tuple[str, int] | BadRecord]:
    """The reference reader, line by line (also the fast reader's fallback from ``start_line`` on)."""
    f = raw if not isinstance(raw, _Prefixed) else io.BufferedReader(raw, buffer_size=1 << 20)
    yield from _group_lines(url, iter_lines(f, url, cfg.max_line_bytes, start_line), cfg)


def _group_lines(url: str, lines, cfg: ShardConfig) -> Iterator[tuple[str, int] | BadRecord]:
    # Straight on the line reader (no Record objects): this loop runs once per input line.
    buf: list[str] = []
    size = 0
    first_line = 0
    sep = "\n" if cfg.one_sentence_per_line else " "
    for item in lines:
        if isinstance(item, BadRecord):
            yield item
            continue
        line_no, text = item
        text = text.rstrip("\r\n")
        if not text or text.isspace():
            if buf:
                yield sep.join(buf), first_line
                buf, size = [], 0
            continue
        if not buf:
            first_line = line_no
        buf.append(text)
        size += len(text)
        if size >= cfg.max_doc_bytes:
            yield sep.join(buf), first_line
            yield BadRecord(url, first_line, "doc_split_too_long", f"document cut at {size:,} characters")
            buf, size = [], 0
    if buf:
        yield sep.join(buf), first_line


def to_sentences(text: str, cfg: ShardConfig) -> list[str]:
    if cfg.one_sentence_per_line:
        return [s for s in (normalize_whitespace(line) for line in text.split("\n")) if s]
    return split_sentences(text)


def shard_file(unit: ShardUnit, stage: StageDir, cfg: ShardConfig) -> dict[str, Any]:
    """Run one unit: write its parts, quarantine bad records, then write the completion marker."""
    files: list[dict[str, Any]] = []
    bad: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    rows: dict[str, list[Any]] = {"doc_id": [], "source": [], "sentences": []}
    part_chars = part_rows = part_sentences = 0
    doc_no = 0
    writer: ParquetRowGroups | None = None  # the open part: rows go in 1,024 at a time (its row groups)

    def add_rows() -> None:
        nonlocal rows, writer
        if not rows["doc_id"]:
            return
        if writer is None:
            writer = ParquetRowGroups(join(stage.url, f"part-{unit.key}-{len(files):04d}.parquet"), CORPUS_SCHEMA,
                                      row_group_size=ROW_GROUP_DOCS).__enter__()
        writer.add(pa.Table.from_pydict(rows, schema=CORPUS_SCHEMA))
        rows = {"doc_id": [], "source": [], "sentences": []}

    def flush() -> None:
        nonlocal writer, part_chars, part_rows, part_sentences
        add_rows()
        if writer is None:
            return
        writer.__exit__(None, None, None)
        files.append({"file": writer.url.rsplit("/", 1)[-1], "rows": part_rows, "sentences": part_sentences,
                      "chars": part_chars, "tokens": 0})
        writer, part_chars, part_rows, part_sentences = None, 0, 0, 0

    read = 0  # records the reader gave (documents, bad lines/rows, a whole bad file): = written + quarantined

    def quarantine(rec: BadRecord) -> None:
        skipped[rec.reason] += 1
        bad.append(rec.to_dict() | {"message": rec.message()})

    try:
        for item in iter_documents(unit, cfg):
            if isinstance(item, BadRecord):
                if item.reason == "doc_split_too_long":  # a note on the document before it, not a record
                    counts["documents_split"] += 1
                    continue
                read += 1
                quarantine(item)
                continue
            read += 1
            text, line = item
            sentences = to_sentences(text, cfg)
            if not sentences:
                quarantine(BadRecord(unit.url, line or None, "empty_document"))
                continue
            rows["doc_id"].append(f"{unit.rel}#{doc_no}")
            rows["source"].append(unit.url)
            rows["sentences"].append(sentences)
            doc_no += 1
            chars = sum(len(s) for s in sentences)
            part_chars += chars
            part_rows += 1
            part_sentences += len(sentences)
            counts["documents"] += 1
            counts["sentences"] += len(sentences)
            counts["chars"] += chars
            if part_chars >= cfg.part_bytes:
                flush()
            elif len(rows["doc_id"]) >= ROW_GROUP_DOCS:
                add_rows()
        flush()
    except BaseException:
        if writer is not None:  # drop the unfinished part's temp file
            writer.__exit__(*sys.exc_info())
        raise
    counts["input_bytes"] = file_size(unit.url)
    counts["input_files"] = 1
    errors_file = stage.write_errors(unit.key, bad)
    stats = {"files": files, "counts": dict(counts), "skipped": dict(skipped), "errors_file": errors_file,
             "input": unit.url, "records": {"read": read, "written": sum(f["rows"] for f in files)}}
    stage.mark_done(unit.key, stats)
    release_memory()
    return stats
