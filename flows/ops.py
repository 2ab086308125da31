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

from typing import Any

from prefect import get_run_logger

from distilflow.flows.common import config_flow, publish
from distilflow.tasks.core.errors import UserError
from distilflow.tasks.core.markdown import markdown_table
from distilflow.tasks.ops.config import DoctorConfig, ServerConfig
from distilflow.tasks.ops.server import serve
from distilflow.tasks.ops.supervisor import environment_report, probe_storage


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


def ensure_pools(api_url: str, gpu_slots: int) -> list[str]:
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


def run_server(cfg: ServerConfig) -> int:
    """``distilflow server``: the supervisor (tasks/ops/server.py) with this module's pool setup."""
    return serve(cfg, ensure_pools)


def run_doctor(cfg: DoctorConfig) -> int:
    result = doctor_flow(**cfg.to_dict())
    env = result["environment"]
    print(f"{env['host']}: python {env['python']}, torch {env['torch']}, {env['cpus']} CPUs, "
          f"{len(env['gpus'])} GPU(s); cache {env['cache']} ({env['cache_free_gib']} GiB free)")
    for p in result["storage"]:
        print(f"  {p['url']}: write {p['write_ms']:.0f} ms, read {p['read_ms']:.0f} ms")
    return 0
