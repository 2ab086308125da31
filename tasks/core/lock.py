"""One run per output folder: an exclusive lock held for the whole run. No Prefect here.

Two runs writing one ``--output`` corrupt each other (one reports the other's counts, one's stale-temp
cleanup deletes the other's in-flight file, a rename fails half way), so every job holds the folder's lock
while it runs and a second run refuses with one line naming the holder::

    OUT is in use by another distilflow run (prepare, pid 4242 on host-a, started 2026-12-01 02:03:04 UTC);
    wait for it to finish, or use another --output

* Local folders: ``fcntl.flock`` on ``OUT/.distilflow/lock`` (the bookkeeping folder of issue 13). The kernel
  drops the lock when its process dies, however it dies, so a lock left by a killed run is simply free: the
  next run takes it over, with nothing to expire and no pid to guess about. The file holds the holder's
  pid, host and start time for the refusal message and is removed on release. Works on NFS v4 (flock is
  emulated with byte-range locks there).
* Object stores (``s3://`` ...; also ``memory://``): a lease object ``OUT/.distilflow/lock.json`` with an
  expiry, refreshed by a daemon thread while the run lives; an expired lease (its run was killed) is taken
  over. Without compare-and-swap, a new holder writes its lease, waits :data:`SETTLE` seconds and reads it
  back: of two runs starting together, only the last writer keeps it.

Re-entrant within a process (a flow that runs another flow on the same folder holds it once).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from distilflow.tasks.core.errors import InputError, ResumeError
from distilflow.tasks.core.io import is_local, join, read_json, remote_errors, remove, write_json

META = ".distilflow"  # the bookkeeping folder (tasks/core/stage.py)
LOCK_NAME = "lock"  # local lock file; object stores: lock.json (the lease)
LEASE_TTL = 60.0  # seconds a lease lives without a refresh (a killed run's lease is free after this)
SETTLE = 1.0  # seconds between writing a lease and reading it back (two runs starting at once)

_HELD: dict[str, list[Any]] = {}  # normalised URL -> [count, holder handle]
_GUARD = threading.Lock()


def lock_names() -> tuple[str, str]:
    """The bookkeeping names a folder clean-up must leave alone (``--overwrite``)."""
    return LOCK_NAME, LOCK_NAME + ".json"


def holder_record(what: str) -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
            "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")}


def describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another distilflow run (holder unknown)"
    what = f"{holder['what']}, " if holder.get("what") else ""
    return (f"another distilflow run ({what}pid {holder.get('pid')} on {holder.get('host')}, "
            f"started {holder.get('started')})")


def _key(url: str) -> str:
    return os.path.realpath(url) if is_local(url) and "://" not in url else url.rstrip("/")


@contextmanager
def hold(url: str, what: str = "", ttl: float = LEASE_TTL) -> Iterator[None]:
    """Hold the exclusive lock of output folder ``url`` for the block (created if missing).

    Raises :class:`ResumeError` naming the holder when another run has it, :class:`InputError` when the
    folder cannot be written (a file in the way, read-only, permission denied)."""
    key = _key(url)
    with _GUARD:
        entry = _HELD.get(key)
        if entry is not None:
            entry[0] += 1
    if entry is None:
        handle: Any = _LocalLock(url, what) if is_local(url) else _Lease(url, what, ttl)
        handle.acquire()
        with _GUARD:
            _HELD[key] = [1, handle]
    try:
        yield
    finally:
        with _GUARD:
            entry = _HELD[key]
            entry[0] -= 1
            last = entry[0] == 0
            if last:
                del _HELD[key]
        if last:
            entry[1].release()


def is_held(url: str) -> bool:
    """Whether this process holds the lock of ``url``."""
    with _GUARD:
        return _key(url) in _HELD


def writable_folder(url: str, exc: OSError) -> InputError:
    """One line for an output folder that cannot be written (what ``makedirs``/``open`` raised)."""
    if isinstance(exc, NotADirectoryError | FileExistsError) or exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return InputError(f"--output {url}: a file is in the way (the output must be a folder); remove the file "
                          "or choose another --output")
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return InputError(f"--output {url}: cannot write there ({exc.strerror or exc}); choose a writable "
                          "--output or fix the folder's permissions")
    return InputError(f"--output {url}: cannot create the folder ({exc.strerror or exc})")


def check_output(url: str) -> None:
    """Before a command starts its flow: a local ``--output`` that cannot become a writable folder (a file
    in the way, a read-only parent) is one :class:`InputError` line. Creates nothing."""
    if not is_local(url) or "://" in url:
        return
    path = os.path.abspath(url)
    while not os.path.exists(path):  # the first part of the path that exists decides
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent
    if not os.path.isdir(path):
        raise writable_folder(url, NotADirectoryError(errno.ENOTDIR, "Not a directory"))
    if not os.access(path, os.W_OK | os.X_OK):
        raise writable_folder(url, PermissionError(errno.EACCES, "Permission denied"))


class _LocalLock:
    def __init__(self, url: str, what: str):
        self.url, self.what = url, what
        self.path = os.path.join(url, META, LOCK_NAME)
        self.fd = -1

    def acquire(self) -> None:
        import fcntl

        self.created = not os.path.exists(self.url)
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        except OSError as e:
            raise writable_folder(self.url, e) from e
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise writable_folder(self.url, e) from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_local(self.path)
                os.close(fd)
                raise ResumeError(f"{self.url} is in use by {describe(holder)}; wait for it to finish, or use "
                                  "another --output") from None
            # the holder before us may have removed the file between our open and flock: lock the live one
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder_record(self.what), sort_keys=True) + "\n").encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd < 0:
            return
        # removed while still locked: a run that opened it meanwhile sees another inode and retries
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = -1
        # leave no trace in a folder that holds nothing else (a run that failed on a bad model path)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(self.path))
            if self.created:
                os.rmdir(self.url)


def _read_local(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            rec = json.loads(f.read() or "null")
        return rec if isinstance(rec, dict) else None
    except (OSError, ValueError):
        return None


class _Lease:
    """A lease object with an expiry, refreshed every ``ttl / 3`` seconds while held."""

    def __init__(self, url: str, what: str, ttl: float):
        self.url, self.what, self.ttl = url, what, ttl
        self.lease_url = join(url, META, LOCK_NAME + ".json")
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _current(self) -> dict[str, Any] | None:
        try:
            rec = read_json(self.lease_url)
        except (FileNotFoundError, ValueError):
            return None
        return rec if isinstance(rec, dict) else None

    def _write(self) -> None:
        write_json(self.lease_url, {**holder_record(self.what), "token": self.token,
                                    "expires": time.time() + self.ttl, "ttl": self.ttl})

    def _refuse(self, cur: dict[str, Any]) -> ResumeError:
        until = datetime.fromtimestamp(float(cur.get("expires", 0)), UTC).strftime("%H:%M:%S UTC")
        return ResumeError(f"{self.url} is in use by {describe(cur)}; wait for it to finish (a killed run's "
                           f"lease expires at {until}), or use another --output")

    def acquire(self) -> None:
        # a bucket that does not exist or denies access: one line naming the --output URL (not the lease)
        try:
            with remote_errors(self.url):
                self._acquire()
        except InputError as e:
            raise InputError(str(e).replace(self.lease_url, self.url)) from e

    def _acquire(self) -> None:
        cur = self._current()
        if cur is not None and cur.get("token") != self.token and float(cur.get("expires", 0)) > time.time():
            raise self._refuse(cur)
        self._write()
        if not self.lease_url.startswith("memory://"):  # memory:// lives in this process: no other writer
            time.sleep(SETTLE)
        cur = self._current()
        if cur is None or cur.get("token") != self.token:
            raise self._refuse(cur or {})
        self._thread = threading.Thread(target=self._refresh, name=f"lease {self.url}", daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            cur = self._current()
            if cur is not None and cur.get("token") != self.token:
                self.lost = True  # taken over after we stalled past the expiry: stop claiming it
                return
            with contextlib.suppress(Exception):
                self._write()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        cur = self._current()
        if cur is not None and cur.get("token") == self.token:
            with contextlib.suppress(Exception):
                remove(self.lease_url)
