"""Operating distilflow: ``distilflow server`` (Prefect server + workers in one command) and ``doctor``.

``distilflow server`` is the one-command local setup: it starts ``prefect server start`` on 127.0.0.1,
makes sure the ``cpu`` and ``gpu`` work pools and the ``gpu`` global concurrency limit exist, optionally
registers every deployment of ``prefect.yaml`` (``--deploy``), then starts process workers: ``--workers``
for the ``cpu`` pool and one per visible CUDA device for the ``gpu`` pool. Ctrl-C (or SIGTERM) stops all of
them; if any of them dies, the others are stopped too and the command exits non-zero with its log tail.

``doctor_flow`` is a small deployment-able flow that checks what a worker can reach (storage read/write,
torch, CUDA) before real jobs are sent to a new pool.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import get_run_logger

from distilflow.flows.common import config_flow, markdown_table, publish
from distilflow.tasks.core.errors import UserError
from distilflow.tasks.ops.config import DoctorConfig
from distilflow.tasks.ops.supervisor import Supervisor, environment_report, probe_storage, tail, wait_http_ok

# the prefect CLI of this environment (a venv's bin/ need not be on PATH)
_VENV_PREFECT = Path(sys.executable).with_name("prefect")
PREFECT_BIN = str(_VENV_PREFECT) if _VENV_PREFECT.exists() else (shutil.which("prefect") or "prefect")
DEFAULT_LOG_DIR = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")) / "distilflow-logs"


@config_flow(DoctorConfig, name="doctor", log_prints=True)
def doctor_flow(cfg: DoctorConfig) -> dict[str, Any]:
    """Check this worker: write/read/delete a probe object under each ``storage`` URL, report versions/GPUs.

    Fails with a message naming the URL when storage is unreachable or read-only (credentials, bucket,
    mount), and when ``require_gpu`` is set on a machine without CUDA.
    """
    logger = get_run_logger()
    report = environment_report()
    probes = [probe_storage(url) for url in cfg.storage]
    if cfg.require_gpu and not report["cuda"]:
        raise UserError(f"{report['host']}: no CUDA device visible (require_gpu=True); check the GPU pool's "
                           "node selector / device plugin, or CUDA_VISIBLE_DEVICES")
    md = "# distilflow doctor\n\n" + markdown_table([{k: v for k, v in report.items() if k != "gpus"}])
    if report["gpus"]:
        md += "\n## GPUs\n\n" + markdown_table(report["gpus"])
    if probes:
        md += "\n## Storage (write / read a 64-byte probe)\n\n" + markdown_table(probes)
    publish(md, key="doctor", description="worker environment and storage check")
    logger.info("doctor: %s, %d storage location(s) OK", report["host"], len(probes))
    return {"environment": report, "storage": probes}


# --------------------------------------------------------------------------------------------- server


def _ensure_pools(api_url: str, gpu_slots: int) -> list[str]:
    """Create the ``cpu``/``gpu`` process pools and the ``gpu`` concurrency limits if missing.

    Existing pools are left alone (a ``gpu`` pool of type kubernetes made by infra/create-pools.sh stays).
    """
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    done = []
    with SyncPrefectClient(api_url) as client:
        for name in ("cpu", "gpu"):
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=name, type="process"))
                done.append(f"created work pool {name} (process)")
        try:
            client.read_global_concurrency_limit_by_name("gpu")
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="gpu", limit=gpu_slots))
            done.append(f"created global concurrency limit gpu ({gpu_slots} slot(s))")
        try:  # tasks tagged "gpu" (evaluate/train on CUDA) queue on this one
            client.read_concurrency_limit_by_tag("gpu")
        except ObjectNotFound:
            client.create_concurrency_limit(tag="gpu", concurrency_limit=gpu_slots)
            done.append(f"created task tag concurrency limit gpu ({gpu_slots} slot(s))")
    return done


def _cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken CUDA install must not stop the CPU workers
        return 0


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def run_server(args: argparse.Namespace) -> int:
    host, port = args.host, args.port
    if not _port_free(host, port):
        print(f"distilflow server: {host}:{port} is in use (another Prefect server?); pick --port", file=sys.stderr)
        return 2
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"distilflow server: WARNING: binding {host}; the Prefect API has no authentication. Put it "
              "behind an authenticating proxy.", file=sys.stderr)
    api_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', 'localhost') else host}:{port}/api"
    gpu_workers = _cuda_devices() if args.gpu_workers < 0 else args.gpu_workers

    base_env = dict(os.environ)
    base_env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", TOKENIZERS_PARALLELISM="false")
    server_env = dict(base_env, PREFECT_UI_API_URL=api_url, PREFECT_SERVER_API_HOST=host,
                      PREFECT_SERVER_API_PORT=str(port))
    if args.database_url:
        server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = args.database_url
    client_env = dict(base_env, PREFECT_API_URL=api_url)
    if args.data:
        client_env["DISTILFLOW_DATA"] = args.data

    sup = Supervisor(Path(args.log_dir))
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    # Ctrl-C must stop everything even when started from a non-interactive shell's background job, which
    # inherits SIGINT as ignored (Python then installs no KeyboardInterrupt handler).
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        cmd = [PREFECT_BIN, "server", "start", "--host", host, "--port", str(port)]
        cmd.append("--ui" if args.ui else "--no-ui")
        server = sup.start("server", cmd, env=server_env)
        print(f"starting Prefect server on {host}:{port} (log: {sup.logs['server']}) ...", flush=True)
        wait_http_ok(f"{api_url}/health", args.startup_timeout, server, sup.logs["server"])
        for line in _ensure_pools(api_url, max(1, gpu_workers)):
            print(line)
        if args.deploy:
            prefect_file = Path(args.deploy)
            if not prefect_file.is_file():
                raise FileNotFoundError(f"--deploy {prefect_file}: no such file (the repo's prefect.yaml)")
            print(f"registering deployments from {prefect_file} ...", flush=True)
            out = subprocess.run([PREFECT_BIN, "--no-prompt", "deploy", "--all", "--prefect-file",
                                  str(prefect_file.resolve())], cwd=prefect_file.resolve().parent,
                                 env=client_env, capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stdout[-4000:], out.stderr[-4000:], sep="\n", file=sys.stderr)
                print("distilflow server: `prefect deploy --all` failed (see above)", file=sys.stderr)
                return 1
        for i in range(args.workers):
            sup.start(f"cpu-worker-{i}", _worker_cmd("cpu", f"cpu-worker-{i}", args.worker_limit), env=client_env,
                      cwd=args.workdir)
        for i in range(gpu_workers):
            # one worker per device: each flow run it starts sees exactly one GPU
            sup.start(f"gpu-worker-{i}", _worker_cmd("gpu", f"gpu-worker-{i}", 1),
                      env=dict(client_env, CUDA_VISIBLE_DEVICES=str(i)), cwd=args.workdir)
        ui = f"http://127.0.0.1:{port}" if args.ui else "(UI disabled)"
        print(f"\nPrefect UI: {ui}\nAPI:        {api_url}\n"
              f"workers:    {args.workers} x cpu, {gpu_workers} x gpu (logs in {args.log_dir})\n"
              f"use it:     export PREFECT_API_URL={api_url}\n"
              "Ctrl-C stops the server and all workers.", flush=True)
        name, code = sup.wait()
        print(f"distilflow server: {name} exited with code {code}; stopping the others.\n{tail(sup.logs[name])}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping workers and server ...", file=sys.stderr, flush=True)
        return 0
    except (RuntimeError, TimeoutError, FileNotFoundError) as e:
        print(f"distilflow server: {e}", file=sys.stderr)
        return 1
    finally:
        sup.stop()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def _worker_cmd(pool: str, name: str, limit: int | None) -> list[str]:
    cmd = [PREFECT_BIN, "worker", "start", "--pool", pool, "--type", "process", "--name", name]
    if limit:
        cmd += ["--limit", str(limit)]
    return cmd


def run_doctor(cfg: DoctorConfig) -> int:
    result = doctor_flow(**cfg.to_dict())
    env = result["environment"]
    print(f"{env['host']}: python {env['python']}, torch {env['torch']}, {env['cpus']} CPUs, "
          f"{len(env['gpus'])} GPU(s)")
    for p in result["storage"]:
        print(f"  {p['url']}: write {p['write_ms']:.0f} ms, read {p['read_ms']:.0f} ms")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "server",
        help="start a local Prefect server + process workers for the cpu/gpu pools in one command",
        description="Start `prefect server start` (127.0.0.1), create the cpu/gpu work pools and the gpu "
        "concurrency limit if missing, optionally deploy prefect.yaml, and start process workers. Ctrl-C stops "
        "everything. Point clients at it with `export PREFECT_API_URL=http://127.0.0.1:PORT/api`.",
    )
    p.add_argument("--host", default="127.0.0.1",
                   help="address the server binds; the API has no auth, so keep 127.0.0.1 unless behind a proxy (default: %(default)s)")
    p.add_argument("--port", type=int, default=4200, help="server port for UI and API (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="process workers for the cpu pool (default: %(default)s)")
    p.add_argument("--worker-limit", type=int, default=None,
                   help="max concurrent flow runs per cpu worker (default: unlimited)")
    p.add_argument("--gpu-workers", type=int, default=-1,
                   help="process workers for the gpu pool, one per device (-1: one per visible CUDA device, "
                   "0 on a CPU-only machine; default: %(default)s)")
    p.add_argument("--database-url", default=None,
                   help="server database, e.g. postgresql+asyncpg://user:pass@127.0.0.1:5432/prefect "
                   "(default: SQLite under PREFECT_HOME)")
    p.add_argument("--deploy", nargs="?", const="prefect.yaml", default=None, metavar="PREFECT_YAML",
                   help="after start, run `prefect deploy --all` for this file (flag alone: ./prefect.yaml)")
    p.add_argument("--data", default=os.environ.get("DISTILFLOW_DATA"),
                   help="data root (local folder or s3://bucket/prefix) used by prefect.yaml's parameters as "
                   "$DISTILFLOW_DATA (default: the DISTILFLOW_DATA environment variable)")
    p.add_argument("--workdir", default=None,
                   help="working directory of the workers (relative paths in run parameters resolve here; "
                   "default: the current directory)")
    p.add_argument("--ui", action=argparse.BooleanOptionalAction, default=True, help="serve the Prefect UI (default: on)")
    p.add_argument("--log-dir", default=str(DEFAULT_LOG_DIR), help="folder for server and worker log files (default: %(default)s)")
    p.add_argument("--startup-timeout", type=float, default=120, help="seconds to wait for the server to answer (default: %(default)s)")
    p.set_defaults(func=run_server)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
