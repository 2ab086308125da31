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
own. All the names are in one folder so that later records (issue 14: per-input identity in the markers,
an exclusive lock file ``.distilflow/lock``) have their place.

Units are keyed by their input (never by worker rank), so outputs do not depend on how many workers
ran them; a rerun skips every unit whose marker exists, and the marker is written only after the
unit's outputs are in place, so a killed run loses at most the units that were in flight.

Folders written before this layout (``config.json``, ``manifest.json``, ``_done/``, ``_errors/``, ``_counts/``
beside the data) are migrated in place when a writer opens them (:meth:`StageDir.open`), and refused with
a one-line message by readers (:func:`read_manifest`).
"""

from __future__ import annotations

import json
import os
import posixpath
from collections import Counter
from typing import Any

from distilflow.tasks.core.errors import DataError, ResumeError
from distilflow.tasks.core.io import (
    exists,
    fs_of,
    is_local,
    join,
    listdir,
    read_json,
    remove,
    write_bytes,
    write_json,
)

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

    def meta(self, *parts: str) -> str:
        return meta_url(self.url, *parts)

    # -- config / resume -------------------------------------------------------------------------
    def open(self, overwrite: bool = False) -> None:
        """Create the folder and save the config; refuse to mix configs unless ``overwrite``."""
        cfg_url = config_url(self.url)
        if overwrite:
            remove(self.url)
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

    def is_done(self, key: str) -> bool:
        return exists(self.marker_url(key))

    def mark_done(self, key: str, stats: dict[str, Any]) -> None:
        write_json(self.marker_url(key), {"key": key, "fingerprint": self.fingerprint, **stats})

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
        for key in expected_keys:
            m = markers[key]
            files.extend(m.get("files", []))
            skipped.update(m.get("skipped", {}))
            counts.update(m.get("counts", {}))
            if m.get("errors_file"):
                error_files.append(m["errors_file"])
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
            **(extra or {}),
        }
        write_json(manifest_url(self.url), manifest)
        return manifest


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
    """Delete ``.name.tmp-*`` files a killed run left behind (local folders only: object stores never
    expose a half-written object). Assumes one run per output folder at a time."""
    if not is_local(url) or not os.path.isdir(url):
        return 0
    n = 0
    for dirpath, _dirs, names in os.walk(url):
        for name in names:
            if name.startswith(".") and ".tmp-" in name:
                os.unlink(os.path.join(dirpath, name))
                n += 1
    return n


def read_manifest(stage_url: str) -> dict[str, Any]:
    """Read a finished stage's manifest, with a clear error if the stage has not completed."""
    url = manifest_url(stage_url)
    if not exists(url):
        if exists(join(stage_url, "manifest.json")):
            raise DataError(f"{stage_url} was written by an older distilflow (manifest.json beside the data); "
                            "rerun the same command with the same --output to migrate it in place")
        raise FileNotFoundError(f"{url} not found: the stage at {stage_url} has not finished (run it first)")
    return read_json(url)
