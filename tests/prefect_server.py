"""Start a real Prefect server (and workers) for integration tests; always torn down afterwards.

Each server gets its own ``PREFECT_HOME`` (profiles, SQLite database, UI build) under the test's tmp dir,
binds 127.0.0.1 on a free port, and is stopped (whole process group) when the context exits, so a failing
test never leaves a server behind.

    with prefect_server(tmp_path) as server:
        subprocess.run(["prefect", "deploy", "--all"], env=server.env, check=True)
        with server.worker("cpu"):
            ...
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from distilflow.tasks.ops.supervisor import free_port, stop_process, tail, wait_http_ok

__all__ = ["PREFECT_BIN", "PrefectServer", "flow_run_logs", "free_port", "prefect_server", "run_deployment",
           "run_artifacts", "start_prefect_server", "stop_process", "wait_flow_run",
           "wait_http_ok", "have"]

PREFECT_BIN = str(Path(sys.executable).with_name("prefect"))


def prefect_env(home: Path, api_url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for prefect CLIs/workers talking to one test server (no inherited PREFECT_* settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_PROFILES_PATH=str(home / "profiles.toml"),
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_LOGGING_LEVEL="INFO",
        # flow-run subprocesses of a worker must not wait for a slow interactive terminal
        PYTHONUNBUFFERED="1",
        DISTILFLOW_PROGRESS="0",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra or {})
    return env


@dataclass
class PrefectServer:
    home: Path
    port: int
    proc: subprocess.Popen
    log: Path
    env: dict[str, str]
    children: list[subprocess.Popen] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)  # how the server was started (for restart())
    server_env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def prefect(self, *args: str, cwd: Path | None = None, timeout: float = 120,
                check: bool = True) -> subprocess.CompletedProcess:
        """Run ``prefect --no-prompt ARGS`` against this server; on failure the output is in the error."""
        out = subprocess.run([PREFECT_BIN, "--no-prompt", *args], env=self.env, cwd=cwd, capture_output=True,
                             text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"prefect {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out

    def start_worker(self, pool: str, name: str = "test-worker", cwd: Path | None = None,
                     extra_env: dict[str, str] | None = None, limit: int | None = None) -> subprocess.Popen:
        """A process worker polling ``pool`` every second (stopped with the server, or by stop_process)."""
        log = self.home / f"worker-{name}.log"
        cmd = [PREFECT_BIN, "worker", "start", "--pool", pool, "--name", name, "--type", "process"]
        if limit:
            cmd += ["--limit", str(limit)]
        env = dict(self.env, PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="5",
                   **(extra_env or {}))
        with open(log, "ab") as fh:
            proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.children.append(proc)
        return proc

    def worker_log(self, name: str = "test-worker") -> str:
        return tail(self.home / f"worker-{name}.log", 20000)

    @contextlib.contextmanager
    def worker(self, pool: str, **kwargs) -> Iterator[subprocess.Popen]:
        proc = self.start_worker(pool, **kwargs)
        try:
            yield proc
        finally:
            stop_process(proc)

    def client(self):
        """A sync Prefect client for this server (use as a context manager)."""
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url)

    def restart(self, down_seconds: float = 0.0, timeout: float = 120) -> None:
        """Stop the server process only (workers and flow runs keep going), then start it again on the
        same port, home and database."""
        import time

        stop_process(self.proc)
        time.sleep(down_seconds)
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(self.cmd, env={**self.env, **self.server_env}, stdout=fh,
                                         stderr=subprocess.STDOUT, start_new_session=True, cwd=self.home)
        wait_http_ok(f"{self.api_url}/health", timeout, self.proc, self.log)

    def stop(self) -> None:
        for child in reversed(self.children):
            stop_process(child)
        stop_process(self.proc)


def start_prefect_server(tmp: Path, database_url: str | None = None, ui: bool = False, timeout: float = 120,
                         extra_env: dict[str, str] | None = None) -> PrefectServer:
    """Start ``prefect server start`` on 127.0.0.1:<free port> with its own PREFECT_HOME under ``tmp``."""
    home = Path(tmp) / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    server_env = {
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": api_url,
        "PREFECT_SERVER_UI_ENABLED": "true" if ui else "false",
        # the scheduler is not needed to run deployments by hand; fewer loops = faster on 2 cores
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
        **(extra_env or {}),
    }
    if database_url:
        server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    env = prefect_env(home, api_url)
    log = home / "server.log"
    cmd = [PREFECT_BIN, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    cmd.append("--ui" if ui else "--no-ui")
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, env={**env, **server_env}, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=home)
    server = PrefectServer(home=home, port=port, proc=proc, log=log, env=env, cmd=cmd, server_env=server_env)
    try:
        wait_http_ok(f"{api_url}/health", timeout, proc, log)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def prefect_server(tmp: Path, **kwargs) -> Iterator[PrefectServer]:
    server = start_prefect_server(tmp, **kwargs)
    try:
        yield server
    finally:
        server.stop()


def have(binary: str) -> bool:
    return shutil.which(binary) is not None


def wait_flow_run(server: PrefectServer, flow_run_id, timeout: float = 120, poll: float = 0.5):
    """Poll a flow run until it is final; returns the FlowRun. On timeout the worker log is in the error."""
    import time

    deadline = time.monotonic() + timeout
    with server.client() as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"flow run {flow_run_id} still {run.state_name} after {timeout:.0f}s\n"
                                   f"worker logs:\n{_worker_logs(server)}")
            time.sleep(poll)


def _worker_logs(server: PrefectServer) -> str:
    return "\n".join(f"--- {p.name}\n{tail(p, 6000)}" for p in sorted(server.home.glob("worker-*.log")))


def run_deployment(server: PrefectServer, name: str, parameters: dict | None = None, timeout: float = 120):
    """Create a run of deployment ``flow/deployment`` (parameters merged over the deployment's) and wait."""
    with server.client() as client:
        dep = client.read_deployment_by_name(name)
        run = client.create_flow_run_from_deployment(dep.id, parameters=parameters or {})
    return wait_flow_run(server, run.id, timeout)


def flow_run_logs(server: PrefectServer, flow_run_id) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with server.client() as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def run_artifacts(server: PrefectServer, flow_run_id) -> list:
    """Artifacts of a flow run and of all its sub-flow runs (flows that call flows nest their reports)."""
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    with server.client() as client:
        ids, frontier = {flow_run_id}, [flow_run_id]
        while frontier:
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)))
            frontier = [c.id for c in children if c.id not in ids]
            ids.update(frontier)
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=list(ids))))
