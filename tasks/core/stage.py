"""Stage output folders: saved config, per-unit completion markers, manifest. No Prefect here.

A stage (corpus, pairs, masked, a fill-mask output ...) writes into one folder::

    DIR/<stage>/config.json          the stage config (refuse to resume if it differs)
    DIR/<stage>/<unit outputs>        e.g. part-00003-0000.parquet, written atomically
    DIR/<stage>/_done/<key>.json      completion marker of one unit of work, with its stats
    DIR/<stage>/_errors/<key>.jsonl   quarantined bad records of that unit (file, line, reason)
    DIR/<stage>/manifest.json         written last: files, rows, tokens, config, counts by reason

Units are keyed by their input (never by worker rank), so outputs do not depend on how many workers
ran them; a rerun skips every unit whose marker exists, and the marker is written only after the
unit's outputs are in place, so a killed run loses at most the units that were in flight.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

from distilflow.tasks.core.errors import ResumeError
from distilflow.tasks.core.io import (
    exists,
    is_local,
    join,
    listdir,
    read_json,
    remove,
    write_bytes,
    write_json,
)

MANIFEST_VERSION = 1


class StageDir:
    def __init__(self, root: str, stage: str, config: dict[str, Any], fingerprint: str):
        self.root = root
        self.stage = stage
        self.url = join(root, stage)
        self.config = config
        self.fingerprint = fingerprint

    # -- config / resume -------------------------------------------------------------------------
    def open(self, overwrite: bool = False) -> None:
        """Create the folder and save the config; refuse to mix configs unless ``overwrite``."""
        cfg_url = join(self.url, "config.json")
        if overwrite:
            remove(self.url)
        remove_stale_temp_files(self.url)
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
        return join(self.url, "_done", f"{key}.json")

    def is_done(self, key: str) -> bool:
        return exists(self.marker_url(key))

    def mark_done(self, key: str, stats: dict[str, Any]) -> None:
        write_json(self.marker_url(key), {"key": key, "fingerprint": self.fingerprint, **stats})

    def done_markers(self) -> dict[str, dict[str, Any]]:
        out = {}
        for url in listdir(join(self.url, "_done"), ".json"):
            m = read_json(url)
            out[m["key"]] = m
        return out

    def write_errors(self, key: str, bad: list[dict[str, Any]]) -> str | None:
        """Quarantine bad records of one unit as JSONL; returns the relative path (or None)."""
        url = join(self.url, "_errors", f"{key}.jsonl")
        if not bad:
            remove(url)
            return None
        write_bytes(url, "".join(json.dumps(b, sort_keys=True, ensure_ascii=False) + "\n" for b in bad).encode())
        return f"_errors/{key}.jsonl"

    # -- manifest --------------------------------------------------------------------------------
    def write_manifest(self, expected_keys: list[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Aggregate the markers of ``expected_keys`` into manifest.json (deterministic: no timings)."""
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
        write_json(join(self.url, "manifest.json"), manifest)
        return manifest


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
    url = join(stage_url, "manifest.json")
    if not exists(url):
        raise FileNotFoundError(f"{url} not found: the stage at {stage_url} has not finished (run it first)")
    return read_json(url)
