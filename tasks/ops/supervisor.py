"""Operations helpers without Prefect: process supervision, health polling, storage and host checks.

Used by ``distilflow server`` (start a Prefect server plus workers as one unit, stop them together) and by
the ``doctor`` flow that checks a worker can reach its storage before real jobs are sent to it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from distilflow.tasks.core import io


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tail(path: Path | None, n: int = 4000) -> str:
    if path is None or not Path(path).exists():
        return ""
    return Path(path).read_text(errors="replace")[-n:]


def wait_http_ok(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll ``url`` until it answers HTTP 200.

    Fails early, with the tail of ``log``, when ``proc`` exits first: a server that cannot start (port in
    use, bad database URL) is reported in seconds instead of after the whole timeout.
    """
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before {url} was up:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s (last error: {last}):\n{tail(log)}")


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM the process group of ``proc`` (it was started in its own session), then SIGKILL leftovers.

    Workers start flow runs as child processes, and Prefect's process worker starts each in a session of
    its own (so a group-wide signal cannot reach it): descendants outside the group are found before the
    signal and stopped the same way.
    """
    stop_processes([proc], timeout)


def stop_processes(procs: Sequence[subprocess.Popen], timeout: float = 15) -> None:
    """:func:`stop_process` for several processes at once: all get SIGTERM together and share one
    ``timeout``, so stopping N slow-to-exit processes takes ``timeout``, not N times it."""
    # descendants first: once a leader is gone its children are re-parented and cannot be found
    strays = [c for proc in procs for c in _descendants(proc.pid) if _pgid(c.pid) != proc.pid]
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    for child in strays:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        # the leader may be gone while children of the group still run
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    _, alive = psutil.wait_procs(strays, timeout=max(0.0, deadline - time.monotonic()))
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(alive, timeout=10)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:  # already gone
        return []


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


@dataclass
class Supervisor:
    """Start several long-running commands, each in its own process group with its own log file.

    ``wait()`` returns when any of them exits (or on Ctrl-C, via KeyboardInterrupt in the caller);
    ``stop()`` ends all of them: the ones started after the first (workers) together, then the first (the
    server), so workers go down before the server.
    """

    log_dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def start(self, name: str, cmd: Sequence[str], env: dict[str, str] | None = None,
              cwd: str | Path | None = None, echo: bool = False) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        with open(log, "ab") as fh:
            proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=None if echo else fh,
                                    stderr=None if echo else subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        self.logs[name] = log
        return proc

    def wait(self, poll: float = 0.5) -> tuple[str, int]:
        """Block until one process exits; returns (name, exit code)."""
        while True:
            for name, proc in self.procs.items():
                code = proc.poll()
                if code is not None:
                    return name, code
            time.sleep(poll)

    def stop(self, timeout: float = 10) -> None:
        """Stop everything started after the first process (the workers) together, then the first (the
        server): at most ~2 x ``timeout`` whatever the number of workers."""
        procs = list(self.procs.values())
        stop_processes(procs[:0:-1], timeout)
        stop_processes(procs[:1], timeout)


def probe_storage(url: str) -> dict[str, Any]:
    """Write, read back and delete a small object under ``url``; raise a clear error if any step fails.

    Catches missing credentials, read-only mounts and wrong endpoints before a long job finds out at its
    last shard. Returns timings in milliseconds.
    """
    key = io.join(url, f".distilflow-probe-{uuid.uuid4().hex}")
    payload = os.urandom(64)
    t0 = time.perf_counter()
    try:
        io.write_bytes(key, payload)
    except io.InputError as e:  # bucket missing / access denied: name the URL the user gave
        raise io.InputError(str(e).replace(key, url)) from e
    except PermissionError as e:
        raise io.InputError(f"{url}: cannot write (permission denied: {e}); check credentials/ACLs") from e
    except FileNotFoundError as e:
        raise io.InputError(f"{url}: cannot write ({e}); does the bucket/folder exist?") from e
    except OSError as e:  # read-only mount, a file where a folder should be, endpoint unreachable ...
        raise io.InputError(f"{url}: cannot write ({e})") from e
    t1 = time.perf_counter()
    back = io.read_bytes(key)
    t2 = time.perf_counter()
    io.remove(key)
    if back != payload:
        raise io.InputError(f"{url}: read back different bytes than written; storage is not consistent")
    return {"url": url, "write_ms": 1000 * (t1 - t0), "read_ms": 1000 * (t2 - t1)}


def environment_report() -> dict[str, Any]:
    """Versions and devices of this worker, for the doctor artifact and for bug reports."""
    import torch

    from distilflow.tasks.core.remote import cache_root

    cache = cache_root()
    probe = next((p for p in (cache, *cache.parents) if p.exists()), Path("/"))
    report: dict[str, Any] = {
        "host": platform.node(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpus": os.cpu_count() or 1,
        "cuda": torch.cuda.is_available(),
        # where s3:// models are cached and remote outputs are staged ($DISTILFLOW_CACHE), and its free space
        "cache": str(cache),
        "cache_free_gib": round(shutil.disk_usage(probe).free / 2**30, 1),
        "gpus": [],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            report["gpus"].append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1)})
    return report
