"""Streaming record readers for text, JSONL, CSV and Parquet inputs (optionally compressed).

Every reader yields either a :class:`Record` or a :class:`BadRecord` and never raises for bad data:
one bad line is reported (file, line, reason, what to do) and the rest of the file is still read.
Memory is bounded: lines are read with a length limit, Parquet in record batches.

Used by the corpus sharder (documents) and by the batch-inference jobs (one text per row).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Literal

import pyarrow.parquet as pq

from distilflow.tasks.core.io import open_input, split_compression

Format = Literal["text", "jsonl", "csv", "parquet"]
FORMAT_BY_SUFFIX: dict[str, Format] = {
    ".txt": "text", ".text": "text", ".md": "text", "": "text",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
    ".csv": "csv", ".tsv": "csv",
    ".parquet": "parquet", ".pq": "parquet",
}
# How to fix each kind of bad input: appended to the message so the user knows what to do.
FIXES: dict[str, str] = {
    "empty_file": "the file has no text; remove it or check the upload",
    "binary_file": "this is not a UTF-8 text file (an image, archive or other binary data); remove it from the "
                   "inputs (if it is text in another encoding, re-encode it as UTF-8)",
    "empty_document": "the document has no sentence text (only whitespace); nothing to do, or drop it",
    "invalid_utf8": "re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
    "line_too_long": "a single line is longer than max_line_bytes; insert line breaks or raise the limit",
    "malformed_json": "each line must be one JSON object",
    "missing_field": "each JSON object needs the text field (set --text-field/--text-column)",
    "not_a_string": "the text field must be a string",
    "null_text": "the text column has a null here",
    "missing_column": "the Parquet/CSV file lacks the text column (set --text-field/--text-column)",
    "unreadable_file": "the file could not be read (corrupt or truncated?)",
    "unknown_format": "use .txt, .jsonl, .csv or .parquet (optionally .gz)",
}


@dataclass(frozen=True)
class Record:
    text: str
    line: int  # 1-based line number (text/jsonl/csv) or 0-based row number (parquet)
    fields: dict[str, Any] = field(default_factory=dict)  # other columns (JSONL/CSV/Parquet)


@dataclass(frozen=True)
class BadRecord:
    file: str
    line: int | None
    reason: str
    detail: str = ""

    def message(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        detail = f" ({self.detail})" if self.detail else ""
        return f"{where}: {self.reason}{detail}; fix: {FIXES.get(self.reason, 'check this record')}"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "reason": self.reason, "detail": self.detail}


def detect_format(url: str) -> Format:
    base, _ = split_compression(url)
    name = base.rsplit("/", 1)[-1]
    suffix = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
    fmt = FORMAT_BY_SUFFIX.get(suffix)
    if fmt is None:
        return "text"  # unknown suffixes (e.g. README, .log) are read as plain text
    return fmt


# -- binary detection ------------------------------------------------------------------------------------
SNIFF_BYTES = 8192  # what git and `file` look at: the first 8 KiB decide text or binary
# Bytes that never occur in text: C0 controls other than \t \n \v \f \r and ESC (ANSI colours), and DEL.
_CONTROL = bytes(b for b in range(32) if b not in b"\t\n\x0b\x0c\r\x1b") + b"\x7f"
CONTROL_SHARE = 0.10  # above this share of control bytes the file is binary (text has next to none)
UNDECODABLE_SHARE = 0.30  # ... or of bytes that are not UTF-8 (a Latin-1 French text has ~5-12%)


def binary_reason(head: bytes) -> str | None:
    """Why ``head`` (a file's first :data:`SNIFF_BYTES`, decompressed) is not text, or None if it is text.

    Like git (a NUL byte) and ``file`` (bytes outside the text set): a NUL byte, or more than
    :data:`CONTROL_SHARE` of control bytes, or more than :data:`UNDECODABLE_SHARE` of bytes that are not
    valid UTF-8. A Latin-1 text (some accented letters) stays text, so its lines are quarantined one by one
    with the re-encoding fix."""
    head = head[:SNIFF_BYTES]
    if not head:
        return None
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16 text (byte-order mark)"
    if b"\x00" in head:
        return "NUL bytes in the first 8 KiB"
    control = len(head) - len(head.translate(None, _CONTROL))
    if control > CONTROL_SHARE * len(head):
        return f"{control / len(head):.0%} control bytes in the first 8 KiB"
    body = head if len(head) < SNIFF_BYTES else head[: len(head) - 3]  # a character cut at the end is fine
    undecodable = len(body) - len(body.decode("utf-8", "ignore").encode("utf-8"))
    if undecodable > UNDECODABLE_SHARE * max(len(body), 1):
        return f"{undecodable / len(body):.0%} of the first 8 KiB is not UTF-8"
    return None


class Sniffed(io.RawIOBase):
    """A binary stream whose first block has been read (to sniff it) and is handed out again first."""

    def __init__(self, head: bytes, f: IO[bytes]) -> None:
        self.head, self.f = memoryview(head), f

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if len(self.head):
            n = min(len(b), len(self.head))
            b[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        data = self.f.read(len(b))
        b[: len(data)] = data
        return len(data)


def sniff(f: IO[bytes]) -> tuple[str | None, IO[bytes]]:
    """(:func:`binary_reason` of the stream's first block, a stream that still starts at its first byte)."""
    head = b""
    while len(head) < SNIFF_BYTES:  # compressed and remote streams may return short reads
        more = f.read(SNIFF_BYTES - len(head))
        if not more:
            break
        head += more
    return binary_reason(head), io.BufferedReader(Sniffed(head, f), buffer_size=1 << 20)


def iter_lines(f: IO[bytes], url: str, max_line_bytes: int, start_line: int = 0) -> Iterator[tuple[int, str] | BadRecord]:
    """Yield ``(line_no, text)`` without the line ending, or BadRecord for undecodable/huge lines.

    A line longer than ``max_line_bytes`` is skipped in chunks (never held whole in memory).
    The first block is sniffed (:func:`binary_reason`): a binary file is reported once, as one
    ``binary_file`` record, and not read further. ``start_line`` > 0: ``f`` continues a file after that
    many lines (no empty/binary/BOM checks).
    """
    line_no = start_line
    first = start_line == 0
    if first:
        why, f = sniff(f)
        if why is not None:
            yield BadRecord(url, None, "binary_file", why)
            return
    while True:
        raw = f.readline(max_line_bytes + 1)
        if not raw:
            if first:
                yield BadRecord(url, None, "empty_file")
            return
        first = False
        line_no += 1
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            size = len(raw)
            while raw and not raw.endswith(b"\n"):  # drain the rest of the long line
                raw = f.readline(1 << 20)
                size += len(raw)
            size -= raw.endswith(b"\n")  # report the line's own length, without its newline
            yield BadRecord(url, line_no, "line_too_long", f"{size:,} bytes > max_line_bytes={max_line_bytes:,}")
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield BadRecord(url, line_no, "invalid_utf8", f"byte {e.start}: {raw[e.start:e.start + 4]!r}")
            continue
        if line_no == 1 and text.startswith("\ufeff"):
            text = text[1:]  # UTF-8 byte-order mark
        yield line_no, text.rstrip("\r\n")


def iter_records(
    url: str,
    fmt: Format | None = None,
    text_field: str = "text",
    max_line_bytes: int = 1 << 20,
    keep_fields: tuple[str, ...] = (),
) -> Iterator[Record | BadRecord]:
    """One record per text line / JSON object / CSV row / Parquet row."""
    fmt = fmt or detect_format(url)
    try:
        if fmt == "parquet":
            yield from _iter_parquet(url, text_field, keep_fields)
            return
        with open_input(url) as f:
            if fmt == "text":
                for item in iter_lines(f, url, max_line_bytes):
                    yield item if isinstance(item, BadRecord) else Record(item[1], item[0])
            elif fmt == "jsonl":
                yield from _iter_jsonl(f, url, text_field, max_line_bytes, keep_fields)
            elif fmt == "csv":
                yield from _iter_csv(f, url, text_field, keep_fields)
            else:
                yield BadRecord(url, None, "unknown_format", fmt)
    except (OSError, EOFError, ValueError) as e:  # gzip CRC errors, truncated files, S3 errors
        yield BadRecord(url, None, "unreadable_file", f"{type(e).__name__}: {e}")


def _iter_jsonl(f: IO[bytes], url: str, text_field: str, max_line_bytes: int,
                keep_fields: tuple[str, ...]) -> Iterator[Record | BadRecord]:
    for item in iter_lines(f, url, max_line_bytes):
        if isinstance(item, BadRecord):
            yield item
            continue
        line_no, line = item
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield BadRecord(url, line_no, "malformed_json", str(e))
            continue
        if not isinstance(obj, dict):
            yield BadRecord(url, line_no, "malformed_json", f"expected an object, got {type(obj).__name__}")
        elif text_field not in obj:
            yield BadRecord(url, line_no, "missing_field", f"no {text_field!r} key")
        elif not isinstance(obj[text_field], str):
            yield BadRecord(url, line_no, "not_a_string", f"{text_field!r} is {type(obj[text_field]).__name__}")
        else:
            yield Record(obj[text_field], line_no, {k: obj.get(k) for k in keep_fields})


def _iter_csv(f: IO[bytes], url: str, text_field: str, keep_fields: tuple[str, ...]) -> Iterator[Record | BadRecord]:
    base, _ = split_compression(url)
    delimiter = "\t" if base.endswith(".tsv") else ","
    why, f = sniff(f)
    if why is not None:
        yield BadRecord(url, None, "binary_file", why)
        return
    text_io = codecs.getreader("utf-8")(f, "strict")
    reader = csv.DictReader(_strip_bom(text_io), delimiter=delimiter)
    row_no = 1  # the header is line 1
    try:
        if reader.fieldnames is None or text_field not in reader.fieldnames:
            yield BadRecord(url, None, "missing_column", f"columns are {reader.fieldnames}, need {text_field!r}")
            return
        for row in reader:
            row_no = reader.line_num
            text = row.get(text_field)
            if text is None:
                yield BadRecord(url, row_no, "null_text", "short row")
            else:
                yield Record(text, row_no, {k: row.get(k) for k in keep_fields})
    except UnicodeDecodeError as e:
        yield BadRecord(url, row_no + 1, "invalid_utf8", str(e))
    except csv.Error as e:
        yield BadRecord(url, row_no + 1, "unreadable_file", f"csv: {e}")


def _strip_bom(lines: io.TextIOBase | Any) -> Iterator[str]:
    first = True
    for line in lines:
        if first and line.startswith("\ufeff"):
            line = line[1:]
        first = False
        yield line


def _iter_parquet(url: str, text_field: str, keep_fields: tuple[str, ...]) -> Iterator[Record | BadRecord]:
    import fsspec

    with fsspec.open(url, "rb") as f:
        pf = pq.ParquetFile(f)
        if text_field not in pf.schema_arrow.names:
            yield BadRecord(url, None, "missing_column", f"columns are {pf.schema_arrow.names}, need {text_field!r}")
            return
        cols = [text_field, *[k for k in keep_fields if k != text_field and k in pf.schema_arrow.names]]
        row = 0
        for batch in pf.iter_batches(batch_size=4096, columns=cols):
            texts = batch.column(0).to_pylist()
            others = {name: batch.column(name).to_pylist() for name in cols[1:]}
            for i, t in enumerate(texts):
                if t is None:
                    yield BadRecord(url, row, "null_text")
                elif not isinstance(t, str):
                    yield BadRecord(url, row, "not_a_string", type(t).__name__)
                else:
                    yield Record(t, row, {k: v[i] for k, v in others.items()})
                row += 1
