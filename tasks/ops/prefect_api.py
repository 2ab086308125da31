"""The Prefect API a command talks to: the configured server, or a temporary one started *first*.

Without ``PREFECT_API_URL`` Prefect 3.8 starts a temporary server (SQLite, no UI) the moment the first flow
run is created: a ``python -m uvicorn prefect.server.api.server:create_app`` subprocess, then it waits for
``/api/health``. That subprocess spends ~3-5 s importing the server and starting its services, and the
command waits for it *after* it has imported torch, transformers and Prefect itself -- the two costs add up.
Prefect 3.8.8 has no in-process API setting (``PREFECT_SERVER_EPHEMERAL_ENABLED`` only allows that
subprocess; every client, the events worker and the log worker look it up through
``SubprocessASGIServer``), so the command line starts the *same* server itself, before its own imports,
and points the process at it with ``PREFECT_API_URL``: the server boots on one core while the command
imports on the other, and the command waits only for what is left (:func:`wait_ready`).

Left alone: a configured API (``PREFECT_API_URL`` in the environment, a Prefect profile, ``prefect.toml``
-- then nothing is started), ``PREFECT_SERVER_EPHEMERAL_ENABLED=false`` (Prefect's own error), and
``DISTILFLOW_TEMP_SERVER=0`` (Prefect's own temporary server, as before). The server is stopped when the
command exits, and dies with it if the command is killed (Linux ``PR_SET_PDEATHSIG``).

No Prefect import here: the point is to start before it.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from distilflow.tasks.core.errors import UserError

_SERVER: TemporaryServer | None = None


class TemporaryServer:
    """Prefect's temporary API server (what ``SubprocessASGIServer`` runs), started without importing Prefect."""

    def __init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> None:
        self.port = _free_port()
        spec = importlib.util.find_spec("prefect")  # the package's folder, without importing it
        app_dir = str(Path(spec.origin).parent.parent) if spec and spec.origin else "."
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1"}
        env.pop("PREFECT_API_URL", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--factory", "prefect.server.api.server:create_app",
             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            process_group=0)  # its own group: Ctrl-C reaches the command, which stops the server when done
        from distilflow.tasks.core.procs import stop_last

        stop_last(self.process.pid)  # on SIGTERM/SIGINT the job still reports its final state to it
        self.started = time.perf_counter()

    def wait_ready(self, timeout: float) -> float:
        """Block until ``/api/health`` answers; returns the seconds waited. A port taken in the meantime
        (uvicorn exits 3) means a restart on another port."""
        t0 = time.perf_counter()
        while True:
            assert self.process is not None
            code = self.process.poll()
            if code == 3:
                self.start()
                _point_prefect_at(self.api_url)
            elif code is not None:
                raise UserError(f"the temporary Prefect server exited with code {code} (its error is above); start "
                                "one with `prefect server start` and set PREFECT_API_URL")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                pass
            if time.perf_counter() - self.started > timeout:
                self.stop()
                raise UserError(f"the temporary Prefect server did not answer within {timeout:.0f} s (busy "
                                "machine?); raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or start one "
                                "with `prefect server start` and set PREFECT_API_URL")
            time.sleep(0.05)

    def stop(self) -> None:
        p, self.process = self.process, None
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def start_temporary_server() -> TemporaryServer | None:
    """Start Prefect's temporary server now, unless an API is configured (see the module docstring)."""
    global _SERVER
    if _SERVER is not None or os.environ.get("PREFECT_API_URL") or os.environ.get("DISTILFLOW_TEMP_SERVER") == "0":
        return _SERVER
    if "prefect" in sys.modules and _configured_elsewhere(started=False):  # in-process callers: Prefect knows
        return None
    _SERVER = TemporaryServer()
    _SERVER.start()
    atexit.register(_SERVER.stop)
    _point_prefect_at(_SERVER.api_url)
    return _SERVER


def wait_ready() -> None:
    """Wait for the server :func:`start_temporary_server` started (no-op when none), then check that no
    profile or ``prefect.toml`` configures another API (then that one is used and ours is stopped)."""
    global _SERVER
    if _SERVER is None:
        return
    if _configured_elsewhere(started=True):
        _SERVER.stop()
        _SERVER = None
        return
    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or 60)
    _SERVER.wait_ready(timeout)


def run_settings() -> contextlib.AbstractContextManager[object]:
    """Settings for this command's flow runs. Heartbeats let a server tell a crashed run from a live one; at
    the end of every flow run Prefect's sync engine joins the heartbeat thread, which sleeps in 1 s steps
    (0-1 s per flow run: ~1.3 s of a prepare command, whose flow has a sub-flow). Under our temporary server,
    which dies with the command: no heartbeats. With a configured server they stay on, but the flow run ends
    without waiting for that thread: stopped, the daemon thread ends by itself within a second, which is how
    Prefect's async engine leaves it (``join_on_exit=False``)."""
    if _SERVER is None:
        return _heartbeats_not_joined()
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


@contextlib.contextmanager
def _heartbeats_not_joined() -> Iterator[None]:
    import functools
    import inspect

    from prefect import flow_engine

    send = getattr(flow_engine, "_send_heartbeats", None)
    if send is None or "join_on_exit" not in inspect.signature(send).parameters:  # another Prefect: as it is
        yield None
        return
    flow_engine._send_heartbeats = functools.partial(send, join_on_exit=False)
    try:
        yield None
    finally:
        flow_engine._send_heartbeats = send


def _configured_elsewhere(started: bool) -> bool:
    """A Prefect API URL from anywhere but us (profile, prefect.toml, .env, a settings context), or ephemeral
    mode disabled. ``started``: our URL is in the environment -- look past it, and take it out if so."""
    from prefect.settings import Settings, get_current_settings

    ours = os.environ.pop("PREFECT_API_URL", None) if started else None
    try:
        s = Settings() if started else get_current_settings()  # env + profile + toml, as Prefect reads them
    finally:
        if ours is not None:
            os.environ["PREFECT_API_URL"] = ours
    configured = bool(s.api.url) or not s.server.ephemeral.enabled
    if configured and started:
        os.environ.pop("PREFECT_API_URL", None)
        os.environ.pop("PREFECT_UI_URL", None)
        _refresh_prefect()
    return configured


def _point_prefect_at(url: str) -> None:
    os.environ["PREFECT_API_URL"] = url
    os.environ["PREFECT_UI_URL"] = ""  # no UI on a temporary server: no "View at ..." links to nowhere
    _refresh_prefect()


def _refresh_prefect() -> None:
    if "prefect.context" in sys.modules:  # settings were read at import: read the environment again
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the command's process dies, even by SIGKILL."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
