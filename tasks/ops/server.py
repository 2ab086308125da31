"""``distilflow server`` without Prefect imports: check the port, start ``prefect server start`` and the
process workers under one :class:`~distilflow.tasks.ops.supervisor.Supervisor`, stop them together.

Creating the work pools needs the Prefect client, so the flow module passes it in (``ensure_pools``);
everything else -- commands, environments, signals, the banner -- is here and unit-tested directly.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distilflow.tasks.core.errors import ConfigError, InputError
from distilflow.tasks.ops.config import ServerConfig
from distilflow.tasks.ops.supervisor import Supervisor, tail, wait_http_ok

LOOPBACK = ("127.0.0.1", "localhost", "::1")
EnsurePools = Callable[[str, int], list[str]]


def prefect_bin() -> str:
    """The prefect CLI of this environment (a venv's ``bin/`` need not be on PATH)."""
    venv = Path(sys.executable).with_name("prefect")
    return str(venv) if venv.exists() else (shutil.which("prefect") or "prefect")


def default_log_dir() -> Path:
    return Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")) / "distilflow-logs"


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def api_url(host: str, port: int) -> str:
    """The URL clients use: a wildcard or ``localhost`` bind is reached on 127.0.0.1."""
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', 'localhost') else host}:{port}/api"


def cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken CUDA install must not stop the CPU workers
        return 0


def environments(cfg: ServerConfig, base: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(server env, client env): the server binds ``host:port``; workers and ``prefect deploy`` talk to it
    and see ``DISTILFLOW_DATA`` (``--data``, else inherited from ``base``) for prefect.yaml's parameters."""
    url = api_url(cfg.host, cfg.port)
    common = dict(base, PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", TOKENIZERS_PARALLELISM="false")
    server_env = dict(common, PREFECT_UI_API_URL=url, PREFECT_SERVER_API_HOST=cfg.host,
                      PREFECT_SERVER_API_PORT=str(cfg.port))
    if cfg.database_url:
        server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = cfg.database_url
    client_env = dict(common, PREFECT_API_URL=url)
    if cfg.data:
        client_env["DISTILFLOW_DATA"] = cfg.data
    return server_env, client_env


def server_cmd(prefect: str, cfg: ServerConfig) -> list[str]:
    return [prefect, "server", "start", "--host", cfg.host, "--port", str(cfg.port), "--ui" if cfg.ui else "--no-ui"]


def worker_cmd(prefect: str, pool: str, name: str, limit: int | None) -> list[str]:
    cmd = [prefect, "worker", "start", "--pool", pool, "--type", "process", "--name", name]
    if limit:  # None or 0: unlimited
        cmd += ["--limit", str(limit)]
    return cmd


def deploy_cmd(prefect: str, prefect_file: Path) -> list[str]:
    return [prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file.resolve())]


def check_startable(cfg: ServerConfig) -> None:
    """What the user can fix before anything starts: a busy port, a missing ``--deploy`` file."""
    if not port_free(cfg.host, cfg.port):
        raise ConfigError(f"{cfg.host}:{cfg.port} is in use (another Prefect server?); pick another --port")
    if cfg.deploy is not None and not Path(cfg.deploy).is_file():
        raise InputError(f"--deploy {cfg.deploy}: no such file (the repo's prefect.yaml)")


def serve(cfg: ServerConfig, ensure_pools: EnsurePools, prefect: str | None = None) -> int:
    """Run the server and its workers until Ctrl-C/SIGTERM (exit 0) or until one of them dies (exit 1,
    with its log tail). Raises a UserError before starting anything when the port or file is wrong."""
    check_startable(cfg)
    if cfg.host not in LOOPBACK:
        print(f"distilflow server: WARNING: binding {cfg.host}; the Prefect API has no authentication. Put it "
              "behind an authenticating proxy.", file=sys.stderr)
    prefect = prefect or prefect_bin()
    url = api_url(cfg.host, cfg.port)
    gpu_workers = cuda_devices() if cfg.gpu_workers < 0 else cfg.gpu_workers
    log_dir = Path(cfg.log_dir) if cfg.log_dir else default_log_dir()
    server_env, client_env = environments(cfg, dict(os.environ))

    sup = Supervisor(log_dir)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    # Ctrl-C must stop everything even when started from a non-interactive shell's background job, which
    # inherits SIGINT as ignored (Python then installs no KeyboardInterrupt handler).
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        server = sup.start("server", server_cmd(prefect, cfg), env=server_env)
        print(f"starting Prefect server on {cfg.host}:{cfg.port} (log: {sup.logs['server']}) ...", flush=True)
        wait_http_ok(f"{url}/health", cfg.startup_timeout, server, sup.logs["server"])
        for line in ensure_pools(url, max(1, gpu_workers)):
            print(line)
        if cfg.deploy is not None and not _deploy(prefect, Path(cfg.deploy), client_env):
            return 1
        for i in range(cfg.workers):
            sup.start(f"cpu-worker-{i}", worker_cmd(prefect, "cpu", f"cpu-worker-{i}", cfg.worker_limit),
                      env=client_env, cwd=cfg.workdir)
        for i in range(gpu_workers):
            # one worker per device: each flow run it starts sees exactly one GPU
            sup.start(f"gpu-worker-{i}", worker_cmd(prefect, "gpu", f"gpu-worker-{i}", 1),
                      env=dict(client_env, CUDA_VISIBLE_DEVICES=str(i)), cwd=cfg.workdir)
        print(banner(cfg, url, gpu_workers, log_dir), flush=True)
        name, code = sup.wait()
        print(f"distilflow server: {name} exited with code {code}; stopping the others.\n{tail(sup.logs[name])}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping workers and server ...", file=sys.stderr, flush=True)
        return 0
    except (RuntimeError, TimeoutError) as e:  # the server did not come up: its log tail says why
        print(f"distilflow server: {e}", file=sys.stderr)
        return 1
    finally:
        sup.stop()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def _deploy(prefect: str, prefect_file: Path, env: dict[str, str]) -> bool:
    print(f"registering deployments from {prefect_file} ...", flush=True)
    out = subprocess.run(deploy_cmd(prefect, prefect_file), cwd=prefect_file.resolve().parent, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stdout[-4000:], out.stderr[-4000:], sep="\n", file=sys.stderr)
        print("distilflow server: `prefect deploy --all` failed (see above)", file=sys.stderr)
    return out.returncode == 0


def banner(cfg: ServerConfig, url: str, gpu_workers: int, log_dir: Path) -> str:
    ui = f"http://127.0.0.1:{cfg.port}" if cfg.ui else "(UI disabled)"
    return (f"\nPrefect UI: {ui}\nAPI:        {url}\n"
            f"workers:    {cfg.workers} x cpu, {gpu_workers} x gpu (logs in {log_dir})\n"
            f"use it:     export PREFECT_API_URL={url}\n"
            "Ctrl-C stops the server and all workers.")


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
