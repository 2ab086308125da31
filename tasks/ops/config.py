"""Options of the operations commands (``distilflow server``, ``distilflow doctor``): one declaration each."""

from __future__ import annotations

from dataclasses import dataclass

from distilflow.tasks.core.config import CommandSpec, Config, option


@dataclass(frozen=True, kw_only=True)
class DoctorConfig(Config):
    storage: tuple[str, ...] = option((), "URLs to probe (write, read back, delete a 64-byte object); "
                                      "credentials come from the environment", nargs="*", metavar="URL")
    require_gpu: bool = option(False, "fail when no CUDA device is visible")


DOCTOR = CommandSpec(
    DoctorConfig, run="distilflow.flows.ops:run_doctor",
    description="Run the doctor flow: writes, reads back and deletes a small probe object under each --storage "
    "URL (local folder, s3://...), and reports versions and GPUs as a Prefect artifact.")


@dataclass(frozen=True, kw_only=True)
class ServerConfig(Config):
    """``distilflow server``: a run-time command (no outputs, no fingerprint), so every field is a knob."""

    host: str = option("127.0.0.1", "address the server binds; the API has no auth, so keep 127.0.0.1 unless "
                       "behind a proxy")
    port: int = option(4200, "server port for UI and API", ge=1, le=65535)
    workers: int = option(1, "process workers for the cpu pool", ge=0)
    worker_limit: int | None = option(None, "max concurrent flow runs per cpu worker (default: unlimited; 0 "
                                      "also means unlimited)", ge=0)
    gpu_workers: int = option(-1, "process workers for the gpu pool, one per device (-1: one per visible CUDA "
                              "device, 0 on a CPU-only machine)", ge=-1)
    database_url: str | None = option(None, "server database, e.g. postgresql+asyncpg://user:pass@127.0.0.1:5432/"
                                      "prefect (default: SQLite under PREFECT_HOME)")
    deploy: str | None = option(None, "after start, run `prefect deploy --all` for this file (flag alone: "
                                "./prefect.yaml)", const="prefect.yaml", metavar="PREFECT_YAML")
    data: str | None = option(None, "data root (local folder or s3://bucket/prefix) used by prefect.yaml's "
                              "parameters as $DISTILFLOW_DATA (default: the DISTILFLOW_DATA environment variable)")
    workdir: str | None = option(None, "working directory of the workers (relative paths in run parameters "
                                 "resolve here; default: the current directory)")
    ui: bool = option(True, "serve the Prefect UI (default: on)")
    log_dir: str | None = option(None, "folder for server and worker log files (default: "
                                 "$PREFECT_HOME/distilflow-logs, ~/.prefect/distilflow-logs without PREFECT_HOME)")
    startup_timeout: float = option(120.0, "seconds to wait for the server to answer", gt=0)


SERVER = CommandSpec(
    ServerConfig, run="distilflow.flows.ops:run_server",
    description="Start `prefect server start` (127.0.0.1), create the cpu/gpu work pools and the gpu concurrency "
    "limit if missing, optionally deploy prefect.yaml, and start process workers. Ctrl-C stops everything. Point "
    "clients at it with `export PREFECT_API_URL=http://127.0.0.1:PORT/api`.")
