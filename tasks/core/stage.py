"""Stage output folders: data files only, bookkeeping hidden beside them. No Prefect here.

A stage (corpus, pairs, masked, a fill-mask output ...) writes into one folder::

    DIR/<stage>/<unit outputs>                  e.g. part-00003-0000.parquet, written atomically: the data
    DIR/<stage>/.distilflow/config.json         the stage config (refuse to resume if it differs)
    DIR/<stage>/.distilflow/done/<key>.json     completion marker of one unit of work, with its stats
    DIR/<stage>/.distilflow/errors/<key>.jsonl  quarantined bad records of that unit (file, line, reason)
    DIR/<stage>/.distilflow/manifest.json       written last: files, rows, tokens, config, counts by reason

Why a hidden folder *inside* the data folder: Parquet readers (pyarrow, Spark) skip ``.``- and
``_``-prefixed names, but ``datasets.load_dataset("parquet", data_dir=...)`` skips only ``.``-prefixed ones
(it failed on ``_done/*.json``), so ``.`` it is; and inside rather than beside, because the folder must
stay self-contained -- a copy (``aws s3 sync``, ``cp -r``) takes its resume state and quarantine along, and
an output that *is* the folder the user named (``fill-mask --output preds.parquet``) has no "beside" of its
own. All the names are in one folder: markers, quarantine, manifest, and the folder's exclusive lock
(``.distilflow/lock``, :mod:`distilflow.tasks.core.lock`).

Units are keyed by their input (never by worker rank), so outputs do not depend on how many workers
ran them; the marker is written only after the unit's outputs are in place, so a killed run loses at
most the units that were in flight. A marker records what its outputs were made from (``deps``: the
input file's size, mtime and content hash, the upstream part's sha256, the model's files): a rerun skips
a unit only when its marker exists *and* its deps are unchanged; a unit whose input changed is redone,
its old outputs removed first (:meth:`StageDir.pending`). Markers list their files with a sha256, which
is what the next stage's units depend on. Nothing stale survives a rerun, and nothing is redone for nothing.

Folders written before this layout (``config.json``, ``manifest.json``, ``_done/``, ``_errors/``, ``_counts/``
beside the data) are migrated in place when a writer opens them (:meth:`StageDir.open`), and refused with
a one-line message by readers (:func:`read_manifest`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import posixpath
from collections import Counter
from typing import Any

from distilflow.tasks.core.errors import DataError, ResumeError
from distilflow.tasks.core.io import (
    content_identity,
    exists,
    fs_of,
    is_local,
    join,
    listdir,
    read_bytes,
    read_json,
    remove,
    same_file,
    sha256_file,
    write_bytes,
    write_json,
)
from distilflow.tasks.core.lock import lock_names

MANIFEST_VERSION = 1
META = ".distilflow"  # the bookkeeping folder inside every output data folder
# old layout (before META) -> new name inside META
_LEGACY = {"config.json": "config.json", "manifest.json": "manifest.json", "_done": "done", "_errors": "errors",
           "_counts": "counts"}


# -- where things are (the one place that knows the layout) ----------------------------------------------
def meta_url(stage_url: str, *parts: str) -> str:
    """A bookkeeping path of the data folder ``stage_url``: ``<stage_url>/.distilflow/<parts>``."""
    return join(stage_url, META, *parts)


def manifest_url(stage_url: str) -> str:
    return meta_url(stage_url, "manifest.json")


def config_url(stage_url: str) -> str:
    return meta_url(stage_url, "config.json")


def token_counts_url(prepared_dir: str) -> str:
    """Token frequencies of a prepared folder (``token_id``, ``count``): a data folder of its own."""
    return join(prepared_dir, "token_counts", "token_counts.parquet")


def data_files(stage_url: str, suffix: str = ".parquet") -> list[str]:
    """The data files of a stage folder (sorted; bookkeeping and temp files are hidden, never listed)."""
    return listdir(stage_url, suffix)


def is_legacy(stage_url: str) -> bool:
    """A folder written before the hidden bookkeeping folder: *our* config.json beside the data (a stage
    record with ``stage`` and ``fingerprint``; a model's or a user's config.json is left alone)."""
    old = join(stage_url, "config.json")
    if exists(config_url(stage_url)) or not exists(old):
        return False
    try:
        record = read_json(old)
    except ValueError:
        return False
    return isinstance(record, dict) and {"stage", "fingerprint", "config"} <= set(record)


class StageDir:
    def __init__(self, root: str, stage: str, config: dict[str, Any], fingerprint: str):
        self.root = root
        self.stage = stage
        self.url = join(root, stage)
        self.config = config
        self.fingerprint = fingerprint
        self.unit_deps: dict[str, dict[str, Any]] = {}  # deps mark_done records for these units (for_unit)

    def for_unit(self, key: str, deps: dict[str, Any]) -> StageDir:
        """This stage as handed to one unit: its marker will record ``deps`` (written once, with the stats, so
        a kill can never leave a finished unit without them)."""
        unit = copy.copy(self)
        unit.unit_deps = {key: deps}
        return unit

    def meta(self, *parts: str) -> str:
        return meta_url(self.url, *parts)

    # -- config / resume -------------------------------------------------------------------------
    def open(self, overwrite: bool = False) -> None:
        """Create the folder and save the config; refuse to mix configs unless ``overwrite``."""
        cfg_url = config_url(self.url)
        if overwrite:
            clear_folder(self.url)
        remove_stale_temp_files(self.url)
        migrate_legacy(self.url)
        if exists(cfg_url):
            old = read_json(cfg_url)
            if old.get("fingerprint") != self.fingerprint:
                diff = sorted(k for k in set(old.get("config", {})) | set(self.config)
                              if old.get("config", {}).get(k) != self.config.get(k))
                raise ResumeError(
                    f"{self.url} was written with a different config (fields {diff} differ); "
                    "use a new output folder, or --overwrite to discard it"
                )
            return
        write_json(cfg_url, {"stage": self.stage, "fingerprint": self.fingerprint, "config": self.config})

    # -- markers ---------------------------------------------------------------------------------
    def marker_url(self, key: str) -> str:
        return self.meta("done", f"{key}.json")

    def marker(self, key: str) -> dict[str, Any] | None:
        try:
            m = read_json(self.marker_url(key))
        except (FileNotFoundError, ValueError):  # ValueError: an empty/garbled marker is no marker
            return None
        return m if isinstance(m, dict) else None

    def is_done(self, key: str, deps: dict[str, Any] | None = None) -> bool:
        """The unit's marker exists and (when ``deps`` is given) was made from these same inputs."""
        if deps is None:
            return exists(self.marker_url(key))
        m = self.marker(key)
        return m is not None and deps_unchanged(m.get("deps"), deps)

    def mark_done(self, key: str, stats: dict[str, Any], deps: dict[str, Any] | None = None) -> None:
        """Write the unit's completion marker (after its outputs): its stats, its files' sha256 (what the
        next stage depends on) and ``deps`` (what it was made from)."""
        deps = deps if deps is not None else self.unit_deps.get(key)
        files = [dict(f, sha256=f.get("sha256") or _sha_of(join(self.url, f["file"])))
                 if isinstance(f, dict) and "file" in f else f for f in stats.get("files", [])]
        extra = {"files": files} if "files" in stats else {}
        write_json(self.marker_url(key), {"key": key, "fingerprint": self.fingerprint, **stats, **extra,
                                          **({"deps": deps} if deps is not None else {})})

    def pending(self, deps: dict[str, dict[str, Any]]) -> list[str]:
        """The units (``key -> deps``) that must run: no marker, or a marker made from other inputs. A
        unit that must be redone loses its old marker and outputs first (an input that shrank leaves no
        stale part behind)."""
        todo = []
        for key, d in deps.items():
            m = self.marker(key)
            if m is not None and deps_unchanged(m.get("deps"), d):
                self._refresh_mtimes(key, m, d)
                continue
            if m is not None:
                self.invalidate(key, m)
            todo.append(key)
        return todo

    def _refresh_mtimes(self, key: str, m: dict[str, Any], current: dict[str, Any]) -> None:
        """A touched but unchanged input: record its new mtime, so the next run need not hash it again."""
        old = m.get("deps") or {}
        new = {k: ({**old[k], "mtime": v["mtime"]} if _is_identity(v) else old[k]) for k, v in current.items()}
        if new != old:
            write_json(self.marker_url(key), {**m, "deps": new})

    def invalidate(self, key: str, marker: dict[str, Any] | None = None) -> None:
        """Forget one unit: its marker first (so a kill in between leaves it *not done*), then its files."""
        m = marker if marker is not None else self.marker(key)
        remove(self.marker_url(key))
        if m is None:
            return
        for f in m.get("files", []):
            if isinstance(f, dict) and f.get("file"):
                remove(join(self.url, f["file"]))
        if m.get("errors_file"):
            remove(join(self.url, m["errors_file"]))

    def prune(self, keep: list[str]) -> list[str]:
        """Forget the units that are no longer planned (an upstream part that disappeared); returns them."""
        gone = [k for k in self.done_markers() if k not in set(keep)]
        for k in gone:
            self.invalidate(k)
        return gone

    def done_markers(self) -> dict[str, dict[str, Any]]:
        out = {}
        for url in listdir(self.meta("done"), ".json"):
            m = read_json(url)
            out[m["key"]] = m
        return out

    def write_errors(self, key: str, bad: list[dict[str, Any]]) -> str | None:
        """Quarantine bad records of one unit as JSONL; returns its path relative to the stage folder."""
        url = self.meta("errors", f"{key}.jsonl")
        if not bad:
            remove(url)
            return None
        write_bytes(url, "".join(json.dumps(b, sort_keys=True, ensure_ascii=False) + "\n" for b in bad).encode())
        return f"{META}/errors/{key}.jsonl"

    # -- manifest --------------------------------------------------------------------------------
    def write_manifest(self, expected_keys: list[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Aggregate the markers of ``expected_keys`` into the manifest (deterministic: no timings)."""
        markers = self.done_markers()
        missing = [k for k in expected_keys if k not in markers]
        if missing:
            raise RuntimeError(f"{self.url}: units not finished: {missing[:5]}{'...' if len(missing) > 5 else ''}")
        files: list[dict[str, Any]] = []
        skipped: Counter[str] = Counter()
        counts: Counter[str] = Counter()
        error_files = []
        inputs = {}
        records: Counter[str] = Counter()
        for key in expected_keys:
            m = markers[key]
            files.extend(m.get("files", []))
            skipped.update(m.get("skipped", {}))
            counts.update(m.get("counts", {}))
            records.update(m.get("records", {}))
            if m.get("errors_file"):
                error_files.append(m["errors_file"])
            if "deps" in m:
                inputs[key] = m["deps"]
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "stage": self.stage,
            "fingerprint": self.fingerprint,
            "config": self.config,
            "units": len(expected_keys),
            "files": files,
            "rows": sum(f.get("rows", 0) for f in files),
            "tokens": sum(f.get("tokens", 0) for f in files),
            "counts": dict(sorted(counts.items())),
            "skipped": dict(sorted(skipped.items())),
            "skipped_total": sum(skipped.values()),
            "error_files": error_files,
            **({"inputs": inputs} if inputs else {}),
            **({"accounting": self.accounting(records, skipped, error_files)} if records else {}),
            **(extra or {}),
        }
        write_json(manifest_url(self.url), manifest)
        return manifest


    def accounting(self, records: Counter[str], skipped: Counter[str], error_files: list[str]) -> dict[str, Any]:
        """Every input record is accounted for: ``read == written + quarantined`` (per reason), and each
        quarantined record has its entry in an errors file (counted from the files themselves)."""
        entries: Counter[str] = Counter()
        for rel in error_files:
            for line in read_bytes(join(self.url, rel)).decode("utf-8").splitlines():
                if line.strip():
                    entries[json.loads(line).get("reason", "?")] += 1
        quarantined = sum(skipped.values())
        return {"read": records["read"], "written": records["written"], "quarantined": quarantined,
                "by_reason": dict(sorted(skipped.items())), "errors_entries": dict(sorted(entries.items())),
                "balanced": records["read"] == records["written"] + quarantined and entries == skipped}


def _is_identity(v: Any) -> bool:
    return isinstance(v, dict) and {"url", "size", "sample"} <= set(v)


def deps_unchanged(recorded: Any, current: dict[str, Any]) -> bool:
    """Whether a marker's ``deps`` describe the same inputs as ``current``: input files compared with
    :func:`~distilflow.tasks.core.io.same_file` (a touched file with the same content is unchanged), other
    entries (upstream sha256, model identity) by equality. A marker without deps is not done."""
    if not isinstance(recorded, dict) or set(recorded) != set(current):
        return False
    for k, v in current.items():
        r = recorded[k]
        if _is_identity(v):
            if not (_is_identity(r) and same_file(r, v)):
                return False
        elif r != v:
            return False
    return True


def complete_deps(deps: dict[str, Any]) -> dict[str, Any]:
    """``deps`` with the full content hash of each input file: computed just *before* a unit reads them, so
    a file that changes while it is read is found changed next time."""
    return {k: content_identity(v) if _is_identity(v) else v for k, v in deps.items()}


def _sha_of(url: str) -> str | None:
    return sha256_file(url) if exists(url) else None


def clear_folder(url: str) -> None:
    """``--overwrite``: delete everything in the folder but its lock (held by this very run)."""
    if not exists(url):
        return
    fs = fs_of(url)

    def full(p: str) -> str:
        return p if is_local(url) else fs.unstrip_protocol(p)

    for entry in fs.ls(url.rstrip("/"), detail=False):
        if posixpath.basename(entry.rstrip("/")) != META:
            remove(full(entry))
            continue
        for inner in fs.ls(entry, detail=False):
            if posixpath.basename(inner.rstrip("/")) not in lock_names():
                remove(full(inner))


def migrate_legacy(stage_url: str) -> bool:
    """Move the bookkeeping of a folder in the old layout into ``.distilflow/`` (renames; the data files and
    fingerprints are unchanged, so finished units stay finished). Returns whether anything moved."""
    if not is_legacy(stage_url):
        return False
    fs = fs_of(stage_url)
    for old, new in _LEGACY.items():
        src = join(stage_url, old)
        if exists(src):
            dest = meta_url(stage_url, new)
            if is_local(stage_url):
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                os.replace(src, dest)
            else:
                fs.mv(src, dest, recursive=True)
    for url in listdir(meta_url(stage_url, "done"), ".json"):  # markers name their quarantine file
        m = read_json(url)
        if str(m.get("errors_file") or "").startswith("_errors/"):
            m["errors_file"] = f"{META}/errors/" + m["errors_file"].removeprefix("_errors/")
            write_json(url, m)
    # pairs/token_counts.parquet (a second schema among the pairs) moves to its own folder DIR/token_counts/
    old_counts = join(stage_url, "token_counts.parquet")
    if exists(old_counts):
        dest = token_counts_url(posixpath.dirname(stage_url.rstrip("/")) if "://" in stage_url
                                else os.path.dirname(stage_url.rstrip(os.sep)))
        if is_local(stage_url):
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.replace(old_counts, dest)
        else:
            fs.mv(old_counts, dest)
    return True


def remove_stale_temp_files(url: str) -> int:
    """Delete ``.name.tmp-<pid>-*`` files a killed run left behind (local folders only: object stores never
    expose a half-written object). Runs under the folder's lock (one run per output folder); a temp file
    whose writer is still alive on this host is left alone all the same -- never another live run's file."""
    if not is_local(url) or not os.path.isdir(url):
        return 0
    n = 0
    for dirpath, _dirs, names in os.walk(url):
        for name in names:
            if name.startswith(".") and ".tmp-" in name and not _writer_alive(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(dirpath, name))
                n += 1
    return n


def _writer_alive(temp_name: str) -> bool:
    """Whether the process that named a temp file ``.x.tmp-<pid>-<hex>`` still runs (on this host)."""
    pid = temp_name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def read_manifest(stage_url: str) -> dict[str, Any]:
    """Read a finished stage's manifest, with a clear error if the stage has not completed."""
    url = manifest_url(stage_url)
    if not exists(url):
        if exists(join(stage_url, "manifest.json")):
            raise DataError(f"{stage_url} was written by an older distilflow (manifest.json beside the data); "
                            "rerun the same command with the same --output to migrate it in place")
        raise FileNotFoundError(f"{url} not found: the stage at {stage_url} has not finished (run it first)")
    return read_json(url)
