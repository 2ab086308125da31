"""fsspec I/O shared by every job: input discovery, compressed reads, atomic writes, stage folders.

Every path is a URL understood by fsspec (a local path, ``file://``, ``s3://``, ``memory://`` ...).
Writes are atomic: locally we write ``.name.tmp-<pid>`` in the destination folder and ``os.replace``
it; object stores (s3, gcs, ...) publish an object only when its upload completes, so writes stream
straight to the object (multipart, one block of memory, never the whole object) and an upload that
fails or is interrupted is aborted -- nothing half-written ever becomes visible. Other fsspec stores
write a temp object beside the target and move it into place.

A bucket that does not exist or denies access is reported as one :class:`InputError` line naming the
URL (:func:`storage_error`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from distilflow.tasks.core.errors import InputError

# Compression suffixes we open transparently (fsspec's "infer" also knows these).
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma", ".zst": "zstd"}
# Parquet writer settings are fixed so that the same table always gives the same bytes.
PARQUET_WRITE_OPTS: dict[str, Any] = {"compression": "zstd", "use_dictionary": False, "write_statistics": True}


def is_local(url: str) -> bool:
    fs, _ = url_to_fs(url)
    return isinstance(fs, LocalFileSystem)


def join(base: str, *parts: str) -> str:
    """Join URL parts with '/', keeping the protocol (``s3://b/x`` + ``y`` -> ``s3://b/x/y``)."""
    if "://" in base:
        proto, rest = base.split("://", 1)
        return f"{proto}://{posixpath.join(rest, *parts)}"
    return os.path.join(base, *parts)


def _full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def expand_inputs(urls: list[str] | tuple[str, ...]) -> list[str]:
    """Directories (recursively), globs and files -> a sorted, de-duplicated list of file URLs.

    Hidden files and folders (``.name``) and our own temp files are skipped. Raises InputError naming
    the URL when it matches nothing, so a typo never turns into an empty, "successful" run.
    """
    out: set[str] = set()
    for url in urls:
        try:
            fs, path = url_to_fs(url)
        except (ImportError, ValueError) as e:
            raise InputError(f"{url}: cannot open this URL ({e}); install the fsspec backend for it") from e
        try:
            if any(c in path for c in "*?[") and not fs.exists(path):  # notes[v2].txt that exists is a file
                found = [p for p in fs.glob(path) if fs.isfile(p)]
            elif fs.isdir(path):  # hidden folders inside it too (an output folder's .distilflow/ bookkeeping)
                root = path.rstrip("/") + "/"
                found = [p for p in fs.find(path) if not any(s.startswith(".") for s in p[len(root):].split("/"))]
            elif fs.isfile(path):
                found = [path]
            else:
                raise InputError(f"{url}: no such file or directory (check the path and your credentials)")
        except PermissionError as e:
            raise InputError(f"{url}: permission denied ({e}); check credentials/ACLs") from e
        found = [p for p in found if not any(part.startswith(".") for part in p.split("/")[-1:])]
        if not found:
            raise InputError(f"{url}: matched no files")
        out.update(_full_url(fs, p) for p in found)
    return sorted(out)


# -- identity of inputs: what a completion marker records, so a changed input is never taken for done ------
IDENTITY_BLOCK = 1 << 20  # bytes hashed at each end of a large input


def file_identity(url: str) -> dict[str, Any]:
    """``{"url", "size", "mtime", "sample"}`` of one file, cheap whatever its size: ``sample`` is the sha256
    of the size and the first and last :data:`IDENTITY_BLOCK` bytes (the whole file when it is at most
    twice that), so an append, a truncation or a rewrite of either end changes it; ``mtime`` is the
    store's modification time (local mtime in ns, S3 LastModified; None where the store has none).
    :func:`content_identity` adds the full content hash, which :func:`same_file` falls back on."""
    fs, path = url_to_fs(url)
    with remote_errors(url):
        info = fs.info(path)
        size = int(info.get("size") or 0)
        h = hashlib.sha256(f"{size}:".encode())
        with fs.open(path, "rb") as f:
            if size <= 2 * IDENTITY_BLOCK:
                h.update(f.read())
            else:
                h.update(f.read(IDENTITY_BLOCK))
                f.seek(size - IDENTITY_BLOCK)
                h.update(f.read(IDENTITY_BLOCK))
    return {"url": url, "size": size, "mtime": _mtime(info), "sample": h.hexdigest()}


def content_identity(ident: dict[str, Any]) -> dict[str, Any]:
    """:func:`file_identity` plus ``sha256`` of the whole content (recorded when a unit reads the file)."""
    return {**ident, "sha256": ident.get("sha256") or sha256_file(ident["url"])}


def same_file(recorded: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether the file a unit read (``recorded``) is the file there now (``current``), as git decides it:
    same size, sampled hash and mtime -> the same; same size and sample but another mtime (touched, copied,
    re-downloaded) -> compare the full content hash; anything else -> changed."""
    if recorded.get("size") != current.get("size") or recorded.get("sample") != current.get("sample"):
        return False
    if recorded.get("mtime") == current.get("mtime"):
        return True
    return bool(recorded.get("sha256")) and recorded["sha256"] == content_identity(current)["sha256"]


def _mtime(info: dict[str, Any]) -> str | None:
    if isinstance(fs_mtime := info.get("mtime"), int | float):  # local: st_mtime (float seconds)
        return str(int(round(fs_mtime * 1e9)))
    for key in ("LastModified", "last_modified", "updated", "mtime", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return None


def sha256_file(url: str) -> str:
    """Full sha256 of a file (our own outputs: what a downstream unit depends on)."""
    h = hashlib.sha256()
    with fsspec.open(url, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


NOT_MODEL_FILES = (".md", ".png", ".jsonl")  # card, curves, metrics log: beside a model, not read by it


def folder_identity(url: str) -> str:
    """One digest of the files directly in a folder (name + :func:`file_identity`), e.g. a model folder:
    weights, config and tokenizer files (``from_pretrained`` reads nothing below; a training output's
    ``checkpoints/`` are not hashed). Documentation beside the weights is not part of it: an evaluation that
    adds a section to the model card (``README.md``) or a redrawn ``curves.png`` leaves the model the same.
    A URL that is not a folder (a hub id) is its own identity."""
    fs, path = url_to_fs(url)
    if not fs.isdir(path):
        return f"name:{url}"
    files = sorted(p for p in fs.ls(path, detail=False)
                   if not posixpath.basename(p.rstrip("/")).startswith(".")
                   and not p.endswith(NOT_MODEL_FILES) and fs.isfile(p))
    h = hashlib.sha256()
    for p in files:
        ident = file_identity(_full_url(fs, p))
        h.update(json.dumps([posixpath.basename(p), ident["size"], ident["mtime"], ident["sample"]]).encode())
    return h.hexdigest()


def split_compression(url: str) -> tuple[str, str | None]:
    """``a/b.jsonl.gz`` -> (``a/b.jsonl``, "gzip")."""
    for suffix, comp in COMPRESSIONS.items():
        if url.endswith(suffix):
            return url[: -len(suffix)], comp
    return url, None


def open_input(url: str) -> IO[bytes]:
    """Open a (possibly compressed) input for binary streaming reads."""
    _, comp = split_compression(url)
    f = fsspec.open(url, "rb", compression=comp).open()
    if not isinstance(fs_of(url), LocalFileSystem) and comp is None:
        # remote fsspec files (s3fs, gcsfs ...) do not take readline(size); buffer them like local files
        return io.BufferedReader(f, buffer_size=1 << 20)  # type: ignore[arg-type]
    return f


def fs_of(url: str) -> fsspec.AbstractFileSystem:
    return url_to_fs(url)[0]


def file_size(url: str) -> int:
    fs, path = url_to_fs(url)
    return int(fs.size(path) or 0)


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return bool(fs.exists(path))


def makedirs(url: str) -> None:
    fs, path = url_to_fs(url)
    fs.makedirs(path, exist_ok=True)


def listdir(url: str, suffix: str = "") -> list[str]:
    """Sorted file URLs directly inside folder ``url`` ending with ``suffix`` (empty if missing)."""
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        return []
    names = [p for p in fs.ls(path, detail=False) if p.endswith(suffix) and fs.isfile(p)]
    names = [p for p in names if not posixpath.basename(p).startswith(".")]
    return sorted(_full_url(fs, p) for p in names)


def remove(url: str) -> None:
    fs, path = url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@contextmanager
def atomic_open(url: str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write to a temp file beside ``url`` and rename it into place only if the block succeeds."""
    fs, path = url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        with remote_errors(url):
            yield from _remote_atomic_write(fs, path, mode)


# Part size of streaming uploads: memory per open writer, and 10,000 parts x 16 MiB = 156 GiB per object.
UPLOAD_BLOCK = 16 << 20


# Stores that publish an object only when its upload completes and whose file objects abort on discard().
_STREAMING_PROTOCOLS = {"s3", "s3a", "gs", "gcs"}


def _remote_atomic_write(fs: fsspec.AbstractFileSystem, path: str, mode: str) -> Iterator[IO[Any]]:
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & _STREAMING_PROTOCOLS:
        # parts go up as they fill (one block in memory); close() completes the upload, discard() aborts it
        target, final = fs.open(path, "wb", block_size=UPLOAD_BLOCK), None
    else:  # any other store: a temp object beside the target, moved into place when complete
        folder, name = posixpath.split(path)
        final = path
        target = fs.open(posixpath.join(folder, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"), "wb")
    text = io.TextIOWrapper(target, encoding="utf-8", newline="") if "b" not in mode else None
    ok = False
    try:
        yield text if text is not None else target
        if text is not None:
            text.flush()
            text.detach()
        target.close()  # completes the upload
        ok = True
        if final is not None:
            fs.mv(target.path, final)
    finally:
        if not ok:
            _abandon(fs, target, text, temp=final is not None)


def _abandon(fs: fsspec.AbstractFileSystem, f: Any, text: io.TextIOWrapper | None, temp: bool) -> None:
    """Drop a failed upload: abort a multipart upload; never let what was written become the target."""
    with contextlib.suppress(Exception):
        if text is not None:
            text.detach()
    if temp:  # a temp object: it may be committed on close, then it is removed
        with contextlib.suppress(Exception):
            f.close()
        with contextlib.suppress(Exception):
            fs.rm(f.path)
        return
    with contextlib.suppress(Exception):
        f.discard()  # s3fs: AbortMultipartUpload and drop the buffer
    with contextlib.suppress(Exception):
        f.closed = True  # garbage collection must not close (= complete) it later


def storage_error(url: str, exc: BaseException) -> InputError | None:
    """One line for the storage errors a user fixes (bucket missing, access denied, no credentials),
    naming ``url``; None for anything else (a bug or a transient failure keeps its traceback)."""
    text = " ".join(str(exc).split())
    low = text.lower()
    if "nosuchbucket" in low or "bucket does not exist" in low or "specified bucket does not exist" in low:
        return InputError(f"{url}: the bucket does not exist; create it or fix the URL")
    if isinstance(exc, PermissionError) or "accessdenied" in low or "access denied" in low or "forbidden" in low:
        return InputError(f"{url}: access denied; check the credentials (AWS_ACCESS_KEY_ID/AWS_PROFILE ...) "
                          "and the bucket policy")
    if "nocredentials" in low.replace(" ", "") or "unable to locate credentials" in low:
        return InputError(f"{url}: no credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
                          "AWS_PROFILE")
    if isinstance(exc, FileNotFoundError) and _bucket_missing(url):
        return InputError(f"{url}: the bucket does not exist; create it or fix the URL")
    return None


def _bucket_missing(url: str) -> bool:
    try:
        fs, path = url_to_fs(url)
        bucket = path.split("/", 1)[0]
        return bool(bucket) and not fs.exists(bucket)
    except Exception:
        return False


@contextmanager
def remote_errors(url: str) -> Iterator[None]:
    """Turn storage errors a user can fix into one :class:`InputError` line naming ``url``."""
    try:
        yield
    except InputError:
        raise
    except (OSError, ValueError) as e:
        err = storage_error(url, e)
        if err is None:
            raise
        raise err from e


def write_bytes(url: str, data: bytes) -> None:
    with atomic_open(url, "wb") as f:
        f.write(data)


def read_bytes(url: str, attempts: int = 3) -> bytes:
    """The object's bytes. An object store object replaced by another writer between the client's look-up
    and its read (s3fs ``FileExpired``: the ETag no longer matches) is read again: the new version is whole
    too (uploads are atomic per object)."""
    for attempt in range(attempts):
        try:
            with fsspec.open(url, "rb") as f:
                return f.read()
        except OSError as e:
            if type(e).__name__ != "FileExpired" or attempt == attempts - 1:
                raise
            fs, path = url_to_fs(url)
            fs.invalidate_cache(path)
    raise AssertionError("unreachable")


def write_json(url: str, obj: Any) -> None:
    """Canonical JSON (sorted keys, 2-space indent, trailing newline): same object -> same bytes."""
    write_bytes(url, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def release_memory() -> None:
    """Give memory freed by Arrow back to the OS after a unit of work (its allocator keeps it otherwise,
    so a long-lived worker's RSS would grow to the largest unit it ever held, times fragmentation)."""
    pa.default_memory_pool().release_unused()


def write_parquet(table: pa.Table, url: str, row_group_size: int = 8192) -> None:
    """Atomically write ``table`` (schema enforced by the caller) with the fixed writer settings."""
    with atomic_open(url, "wb") as f:
        pq.write_table(table, f, row_group_size=row_group_size, **PARQUET_WRITE_OPTS)


class ParquetRowGroups:
    """Write a Parquet file table by table, holding at most one row group of rows: the same bytes as
    ``write_parquet(concat_tables(tables), url, row_group_size)`` (row groups are cut at the same rows),
    without the whole table in memory. Atomic like :func:`write_parquet`; use as a context manager."""

    def __init__(self, url: str, schema: pa.Schema, row_group_size: int = 8192):
        self.url, self.schema, self.size = url, schema, row_group_size
        self.rows = 0

    def __enter__(self) -> ParquetRowGroups:
        self._file_cm = atomic_open(self.url, "wb")
        self._writer = pq.ParquetWriter(self._file_cm.__enter__(), self.schema, **PARQUET_WRITE_OPTS)
        self._buf: list[pa.Table] = []
        self._n = 0
        return self

    def add(self, table: pa.Table) -> None:
        self._buf.append(table)
        self._n += table.num_rows
        self.rows += table.num_rows
        if self._n >= self.size:
            big = pa.concat_tables(self._buf)
            full = self._n - self._n % self.size
            self._writer.write_table(big.slice(0, full), row_group_size=self.size)
            self._buf, self._n = [big.slice(full)], self._n - full

    def __exit__(self, *exc: Any) -> None:
        try:
            if exc[0] is None and (self._n or not self.rows):  # an empty table still gets its one row group
                self._writer.write_table(pa.concat_tables(self._buf) if self._buf else self.schema.empty_table(),
                                         row_group_size=self.size)
            self._writer.close()
        finally:
            self._buf = []
            self._file_cm.__exit__(*exc)


def read_parquet(url: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file. ``ParquetFile`` rather than ``read_table``: the latter goes through
    ``pyarrow.dataset``, whose first import (with pandas) costs ~0.5 s of every command that reads one."""
    with fsspec.open(url, "rb") as f:
        return pq.ParquetFile(f).read(columns=columns)


def iter_parquet_batches(url: str, columns: list[str] | None = None, batch_size: int = 4096) -> Iterator[pa.RecordBatch]:
    """Stream a Parquet file batch by batch (bounded memory for files larger than RAM)."""
    with fsspec.open(url, "rb") as f:
        pf = pq.ParquetFile(f)
        yield from pf.iter_batches(batch_size=batch_size, columns=columns)
