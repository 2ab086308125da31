"""Folder watcher: emit one "file ready" event per completely written file (no Prefect import here).

A file counts as completely written when its (size, mtime) has not changed over ``stable_polls``
consecutive polls (and it is not empty). Hidden files (``.name``) and temp/partial files
(``*.tmp``, ``*.part``, ``*.partial``, ``*.crdownload``, ``*.swp``, ``~name``, our own
``.name.tmp-*``) are ignored: writers that upload to a temp name and rename are picked up after the
rename. Emitted files are recorded in a JSON state file (written atomically), so a restarted watcher
never emits the same file twice; with ``reprocess_changed`` a file whose size/mtime changed after it
was emitted is emitted again.

Event contract (prefect.yaml's deployment trigger is written against it)::

    event    = "distilflow.file.ready"
    resource = {"prefect.resource.id": "distilflow.file.<url>"}
    payload  = {"path": url, "size": bytes}

``emit`` is passed in (flows/inference.py passes ``prefect.events.emit_event``).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from distilflow.tasks.core.io import exists, read_json, write_json

log = logging.getLogger(__name__)

EVENT_NAME = "distilflow.file.ready"
RESOURCE_PREFIX = "distilflow.file."
TEMP_PATTERNS = ("*.tmp", "*.temp", "*.part", "*.partial", "*.crdownload", "*.swp", "~*", "*.tmp-*", "*.inprogress")

Emit = Callable[..., Any]  # emit(event=..., resource=..., payload=...)


@dataclass
class FileSeen:
    size: int
    mtime: float
    stable: int = 1  # consecutive polls with this (size, mtime)


def event_for(url: str, size: int) -> dict[str, Any]:
    """The keyword arguments of one emit call (the contract above)."""
    return {"event": EVENT_NAME, "resource": {"prefect.resource.id": f"{RESOURCE_PREFIX}{url}"},
            "payload": {"path": url, "size": size}}


def _mtime(info: dict[str, Any]) -> float:
    for k in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(k)
        if v is None:
            continue
        if isinstance(v, datetime):
            return v.timestamp()
        try:
            return float(v)
        except (TypeError, ValueError):
            return float(hash(str(v)))  # opaque but changes when the object changes
    return 0.0


def is_ignored(name: str, patterns: tuple[str, ...] = TEMP_PATTERNS) -> bool:
    return name.startswith(".") or any(fnmatch.fnmatch(name, p) for p in patterns)


def default_state_url(folder: str) -> str:
    """``~/.distilflow/watch-<folder as a file name>.json``: one state file per watched folder."""
    name = "".join(ch if ch.isalnum() else "_" for ch in folder.rstrip("/"))
    return os.path.join(os.path.expanduser("~"), ".distilflow", f"watch-{name}.json")


class FolderWatcher:
    def __init__(self, folder: str, emit: Emit, state_url: str, stable_polls: int = 2,
                 include: tuple[str, ...] = ("*",), recursive: bool = False, reprocess_changed: bool = False):
        if stable_polls < 1:
            raise ValueError("stable_polls must be >= 1")
        self.folder = folder.rstrip("/")
        self.emit = emit
        self.state_url = state_url
        self.stable_polls = stable_polls
        self.include = include
        self.recursive = recursive
        self.reprocess_changed = reprocess_changed
        self.fs, self.root = url_to_fs(self.folder)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.seen: dict[str, FileSeen] = {}
        self.emitted: dict[str, dict[str, Any]] = read_json(state_url).get("emitted", {}) if exists(state_url) else {}

    def _url(self, path: str) -> str:
        return path if self.local else self.fs.unstrip_protocol(path)

    def list_files(self) -> dict[str, tuple[int, float]]:
        """url -> (size, mtime) of candidate files (temp, hidden and excluded names skipped)."""
        self.fs.invalidate_cache()
        if not self.fs.exists(self.root):
            return {}
        infos = (self.fs.find(self.root, detail=True) if self.recursive
                 else {i["name"]: i for i in self.fs.ls(self.root, detail=True)})
        out: dict[str, tuple[int, float]] = {}
        for path, info in infos.items():
            if info.get("type") != "file":
                continue
            rel = path[len(self.root.rstrip("/")) + 1:] if path.startswith(self.root) else path
            parts = rel.split("/")
            if any(is_ignored(p) for p in parts):
                continue
            if not any(fnmatch.fnmatch(parts[-1], pat) for pat in self.include):
                continue
            out[self._url(path)] = (int(info.get("size") or 0), _mtime(info))
        return out

    def poll(self) -> list[str]:
        """One poll: update stability counters, emit ready files; returns the URLs emitted now."""
        now = self.list_files()
        ready: list[str] = []
        for url, (size, mtime) in sorted(now.items()):
            prev = self.seen.get(url)
            if prev and (prev.size, prev.mtime) == (size, mtime):
                prev.stable += 1
            else:
                self.seen[url] = prev = FileSeen(size, mtime)
            done = self.emitted.get(url)
            if done and not (self.reprocess_changed and (done["size"], done["mtime"]) != (size, mtime)):
                continue
            if size > 0 and prev.stable >= self.stable_polls:
                ready.append(url)
        for url in list(self.seen):
            if url not in now:
                del self.seen[url]
        for url in ready:
            size, mtime = now[url]
            self.emit(**event_for(url, size))
            self.emitted[url] = {"size": size, "mtime": mtime, "emitted_at": time.time()}
            # recorded right after each emit: a crash between two files re-emits nothing already sent
            write_json(self.state_url, {"folder": self.folder, "emitted": self.emitted})
            log.info("ready: %s (%d bytes)", url, size)
        return ready

    def run(self, interval: float = 2.0, max_polls: int = 0, stop: Callable[[], bool] | None = None) -> int:
        """Poll every ``interval`` s until ``stop()`` or ``max_polls`` polls; returns files emitted."""
        n = polls = 0
        while not (stop and stop()):
            n += len(self.poll())
            polls += 1
            if max_polls and polls >= max_polls:
                break
            time.sleep(interval)
        return n


def watch_folder(cfg: Any, emit: Emit) -> int:
    """``distilflow watch``: poll ``cfg.dir`` until Ctrl-C or ``cfg.max_polls``; prints what it does."""
    state = cfg.state or default_state_url(cfg.dir)
    w = FolderWatcher(cfg.dir, emit, state, stable_polls=cfg.stable_polls, include=cfg.include,
                      recursive=cfg.recursive, reprocess_changed=cfg.reprocess_changed)
    print(f"watching {cfg.dir} every {cfg.interval}s (state: {state}); Ctrl-C to stop", flush=True)
    try:
        n = w.run(interval=cfg.interval, max_polls=cfg.max_polls)
    except KeyboardInterrupt:
        return 0
    print(f"emitted {n} event(s)")
    return 0
