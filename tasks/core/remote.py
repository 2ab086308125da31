"""Folders on object storage (``s3://`` or any fsspec URL) for the jobs that need a local folder.

Hugging Face ``from_pretrained`` / ``save_pretrained``, ``torch.save`` checkpoints and tokenizers want
local paths. This module moves whole folders between a bucket and the local disk, safely:

* :func:`local_copy` -- a verified local copy of a remote folder (or file), kept in a cache
  (``$DISTILFLOW_CACHE``, default ``~/.cache/distilflow``). Every call lists the remote folder once and
  downloads only what changed, so a cache never serves stale files; files gone from the bucket are
  removed from the copy. Downloads are streamed, hashed while they stream and renamed into place only
  when complete. When the folder was written by :func:`upload_folder`, each file's sha256 is checked
  against its ``.distilflow-files.json``; otherwise sizes are checked against the listing.
* :func:`upload_folder` -- every file of a local folder to a URL, each atomically (streaming multipart
  through :func:`~distilflow.tasks.core.io.atomic_open`: an interrupted upload leaves no object), files
  already there with the same sha256 skipped (a resumed upload sends only the rest), then the
  ``.distilflow-files.json`` manifest last, so a reader that sees it sees a complete folder.
* :class:`Staged` / :func:`staged_output` -- a job's output folder as a local working folder that is
  pushed to the URL (checkpoints after each save, the rest at the end) and pulled back from it to
  resume on a machine whose disk is gone. For a local URL it is the folder itself and push/pull do
  nothing.

Local paths pass through unchanged everywhere. A bucket that does not exist or denies access raises one
:class:`~distilflow.tasks.core.errors.InputError` line naming the URL.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import posixpath
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsspec.core import url_to_fs

from distilflow.tasks.core import io
from distilflow.tasks.core.errors import DataError, InputError

MANIFEST = ".distilflow-files.json"  # written last by upload_folder: names, sizes and sha256 of every file
_CACHE_META = ".distilflow-cache.json"  # beside a cached copy: what each local file was downloaded from
CHUNK = 8 << 20


def is_remote(url: str | os.PathLike[str]) -> bool:
    return not io.is_local(str(url))


def cache_root() -> Path:
    return Path(os.environ.get("DISTILFLOW_CACHE") or Path.home() / ".cache" / "distilflow")


def cache_dir_for(url: str) -> Path:
    """Where the local copy of ``url`` lives: readable name + a hash of the full URL."""
    name = posixpath.basename(url.rstrip("/")) or "root"
    return cache_root() / "remote" / f"{name}-{hashlib.sha256(url.rstrip('/').encode()).hexdigest()[:16]}"


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


# -------------------------------------------------------------------------------------------- reading
def list_remote(url: str) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size", "etag"}}`` of the files under folder ``url`` (hidden temp files excluded,
    the manifest included). Empty when nothing is there; InputError for a missing bucket / no access."""
    fs, root = url_to_fs(url)
    root = root.rstrip("/")
    with io.remote_errors(url):
        if not fs.exists(root):
            return {}
        if fs.isfile(root):
            info = fs.info(root)
            return {"": {"size": int(info.get("size") or 0), "etag": _etag(info)}}
        found = fs.find(root, detail=True)
    out = {}
    for path, info in found.items():
        rel = path[len(root) + 1:]
        name = posixpath.basename(rel)
        if not rel or ".tmp-" in name or (name.startswith(".") and name != MANIFEST):
            continue
        out[rel] = {"size": int(info.get("size") or 0), "etag": _etag(info)}
    return out


def _etag(info: dict[str, Any]) -> str:
    return str(info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("mtime") or "")


def read_manifest(url: str) -> dict[str, dict[str, Any]] | None:
    """The ``{file: {"size", "sha256"}}`` that :func:`upload_folder` wrote under ``url``, or None."""
    target = io.join(url, MANIFEST)
    with io.remote_errors(url):
        if not io.exists(target):
            return None
        return dict(io.read_json(target)["files"])


def local_copy(url: str, cache: str | os.PathLike[str] | None = None) -> str:
    """A local path holding what ``url`` holds; ``url`` itself when it is local.

    Remote folders (and single files) are mirrored into ``cache`` (default :func:`cache_dir_for`):
    listed once per call, only new or changed files downloaded, each verified -- against the sha256 of
    the folder's manifest when :func:`upload_folder` wrote it, else its listed size. Concurrent callers
    on one machine wait for each other (a lock file), so two jobs never download into the same copy.
    Raises InputError when nothing is at ``url`` and DataError when a file does not match its manifest.
    """
    if not is_remote(url):
        return url
    listing = list_remote(url)
    if not listing:
        raise InputError(f"{url}: no such file or folder (check the URL and your credentials)")
    dest = Path(cache) if cache is not None else cache_dir_for(url)
    dest.mkdir(parents=True, exist_ok=True)
    with _locked(dest):
        meta = _read_cache_meta(dest)
        if "" in listing:  # a single file: its copy is dest/<name>
            name = posixpath.basename(url.rstrip("/"))
            meta[name] = _sync_file(url, dest, name, listing[""], None, meta.get(name))
            _write_cache_meta(dest, meta)
            return str(dest / name)
        manifest = read_manifest(url) if MANIFEST in listing else None
        if manifest is not None:
            missing = sorted(set(manifest) - set(listing))
            if missing:
                raise DataError(f"{url}: {len(missing)} file(s) of its {MANIFEST} are missing from the bucket "
                                f"(first: {missing[0]}); upload the folder again")
        wanted = {rel: info for rel, info in listing.items() if rel != MANIFEST}
        for rel, info in sorted(wanted.items()):
            expected = _expected_sha(manifest, rel, info)
            meta[rel] = _sync_file(io.join(url, rel), dest, rel, info, expected, meta.get(rel))
        for rel in sorted(set(meta) - set(wanted)):  # gone from the bucket: gone from the copy
            with contextlib.suppress(FileNotFoundError):
                (dest / rel).unlink()
            meta.pop(rel)
        _write_cache_meta(dest, meta)
    return str(dest)


def _expected_sha(manifest: dict[str, dict[str, Any]] | None, rel: str, info: dict[str, Any]) -> str | None:
    """The sha256 ``rel`` must have: the manifest's, unless the object was replaced after the manifest
    was written (its etag differs: an upload_folder that was interrupted before writing the new
    manifest), in which case the listing's size is what is checked."""
    entry = (manifest or {}).get(rel)
    if entry is None or ("etag" in entry and entry["etag"] != info["etag"]):
        return None
    return str(entry["sha256"])


def _sync_file(src: str, dest: Path, rel: str, info: dict[str, Any], expected_sha: str | None,
               cached: dict[str, Any] | None = None) -> dict[str, Any]:
    """Download ``src`` to ``dest/rel`` unless the copy there came from the same object; verify it."""
    local = dest / rel
    if cached and local.is_file() and cached.get("etag") == info["etag"] and cached.get("size") == info["size"] \
            and local.stat().st_size == info["size"] and cached.get("mtime_ns") == local.stat().st_mtime_ns \
            and (expected_sha is None or cached.get("sha256") == expected_sha):
        return cached
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    h = hashlib.sha256()
    size = 0
    try:
        with io.remote_errors(src), io.fs_of(src).open(url_to_fs(src)[1], "rb") as r, open(tmp, "wb") as w:
            while chunk := r.read(CHUNK):
                h.update(chunk)
                w.write(chunk)
                size += len(chunk)
        digest = h.hexdigest()
        if size != info["size"] or (expected_sha is not None and digest != expected_sha):
            want = f"sha256 {expected_sha[:12]}..." if expected_sha else f"{info['size']} bytes"
            raise DataError(f"{src}: downloaded {size} bytes, sha256 {digest[:12]}..., expected {want}; the "
                            "object changed during the download or is corrupt -- rerun, or upload it again")
        os.replace(tmp, local)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return {"size": size, "etag": info["etag"], "sha256": digest, "mtime_ns": local.stat().st_mtime_ns}


def _read_cache_meta(dest: Path) -> dict[str, dict[str, Any]]:
    try:
        return dict(json.loads((dest / _CACHE_META).read_text())["files"])
    except (FileNotFoundError, ValueError, KeyError):
        return {}


def _write_cache_meta(dest: Path, meta: dict[str, dict[str, Any]]) -> None:
    io.write_json(str(dest / _CACHE_META), {"files": meta})


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[None]:
    with open(dest.parent / f".{dest.name}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# -------------------------------------------------------------------------------------------- writing
def upload_file(path: str | os.PathLike[str], url: str) -> str:
    """Stream one local file to ``url`` atomically; returns its sha256."""
    h = hashlib.sha256()
    with open(path, "rb") as r, io.atomic_open(url, "wb") as w:
        while chunk := r.read(CHUNK):
            h.update(chunk)
            w.write(chunk)
    return h.hexdigest()


def upload_folder(path: str | os.PathLike[str], url: str, only: str = "") -> dict[str, dict[str, Any]]:
    """Upload every file under ``path`` (or under its sub-folder ``only``) to ``url``; returns the manifest.

    Each file is streamed and published atomically; a file whose sha256 the remote manifest already
    records is skipped, so rerunning after an interruption sends only what is missing. The manifest,
    merged with the previous one (other sub-folders keep their entries; files deleted locally under
    ``only`` are deleted remotely), is written last. For a local ``url`` equal to ``path`` nothing is done.
    """
    root = Path(path)
    if not is_remote(url) and Path(url).resolve() == root.resolve():
        return {}
    previous = read_manifest(url) or {}
    base = root / only
    candidates = [base] if only and base.is_file() else sorted(base.rglob("*"))  # ``only`` may name one file
    local = {p.relative_to(root).as_posix(): p for p in candidates
             if p.is_file() and not _hidden(p.relative_to(root).as_posix())}
    manifest = {rel: e for rel, e in previous.items() if not _under(rel, only)}
    for rel, p in local.items():
        size, old = p.stat().st_size, previous.get(rel)
        digest = sha256_file(p) if old and old["size"] == size else None
        if old is not None and digest == old["sha256"] and io.exists(io.join(url, rel)):
            manifest[rel] = old
            continue
        target = io.join(url, rel)
        manifest[rel] = {"size": size, "sha256": upload_file(p, target), "etag": _etag_of(target)}
    # The manifest goes up before anything is deleted: killed at any point, the bucket holds a manifest
    # whose files all exist (files it does not list yet are fetched by size; see local_copy).
    io.write_json(io.join(url, MANIFEST), {"files": manifest, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                      time.gmtime())})
    for rel in sorted(set(previous) - set(manifest)):  # deleted locally (e.g. an old checkpoint)
        with io.remote_errors(url):
            io.remove(io.join(url, rel))
    return manifest


def _etag_of(url: str) -> str:
    fs, path = url_to_fs(url)
    fs.invalidate_cache(path)
    return _etag(fs.info(path))


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def _under(rel: str, folder: str) -> bool:
    return not folder or rel == folder or rel.startswith(folder.rstrip("/") + "/")


# ------------------------------------------------------------------------------------ staged outputs
@dataclass
class Staged:
    """A job's output ``url`` as a local working folder ``local``.

    ``pull(sub)`` fills ``local`` from the bucket (resume after the disk is gone); ``push(sub)`` uploads
    ``local`` (or its sub-folder ``sub``) -- call it after each checkpoint and once at the end. For a
    local ``url`` both do nothing and ``local`` is the folder itself.
    """

    url: str
    local: Path

    @property
    def remote(self) -> bool:
        return is_remote(self.url)

    def pull(self, sub: str = "") -> bool:
        """Download ``url/sub`` into ``local/sub``; False when the bucket holds nothing there."""
        if not self.remote:
            return (self.local / sub).exists()
        src = io.join(self.url, sub) if sub else self.url
        if not list_remote(src):
            return False
        target = self.local / sub if sub else self.local
        local_copy(src, cache=target)
        return True

    def push(self, sub: str = "") -> None:
        if self.remote:
            upload_folder(self.local, self.url, only=sub)


@contextlib.contextmanager
def written_locally(url: str) -> Iterator[str]:
    """A local folder to write ``url``'s files into: ``url`` itself when it is local, else a temporary folder
    that is uploaded file by file (each atomic, the manifest last: :func:`upload_folder`) when the block ends
    without an error. For outputs written in one go (a saved model); see :func:`staged_output` for working
    folders pushed while they grow."""
    if not is_remote(url):
        yield url
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="distilflow-upload-") as tmp:
        yield tmp
        upload_folder(tmp, url)


@contextlib.contextmanager
def staged_output(url: str, work_dir: str | os.PathLike[str] | None = None) -> Iterator[Staged]:
    """:class:`Staged` for ``url``; its local folder is ``work_dir`` or a folder in the cache.

    On success the whole folder is pushed; on failure nothing more is pushed (what earlier ``push``
    calls uploaded -- finished checkpoints -- stays in the bucket for ``--resume``) and the local
    folder is kept for the next attempt on this machine. A bucket that does not exist or denies
    writes fails on entry (:func:`check_writable`).
    """
    if not is_remote(url):
        Path(url).mkdir(parents=True, exist_ok=True)
        yield Staged(url, Path(url))
        return
    check_writable(url)  # a missing bucket / denied write fails now, not at the first push hours later
    local = Path(work_dir) if work_dir is not None else work_dir_for(url)
    local.mkdir(parents=True, exist_ok=True)
    stage = Staged(url, local)
    yield stage
    stage.push()


def check_writable(url: str) -> None:
    """Write and delete an empty hidden object under ``url``: one InputError line naming ``url`` when the
    bucket does not exist or denies writes."""
    key = io.join(url, f".distilflow-probe-{uuid.uuid4().hex[:12]}")
    try:
        io.write_bytes(key, b"")
    except InputError as e:
        raise InputError(str(e).replace(key, url)) from e
    with io.remote_errors(url):
        io.remove(key)


def work_dir_for(url: str) -> Path:
    """The default local working folder of remote output ``url`` (the same on every process of a host
    that shares ``$DISTILFLOW_CACHE``, e.g. the ranks of one torchrun)."""
    return cache_dir_for(url).with_name(cache_dir_for(url).name + "-work")


def clear_local(stage: Staged) -> None:
    """Remove the local working folder of a remote stage (never a local output)."""
    if stage.remote:
        shutil.rmtree(stage.local, ignore_errors=True)
