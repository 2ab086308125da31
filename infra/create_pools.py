"""Create (or update) the distilflow work pools and `gpu` concurrency limits on a Prefect server.

    PREFECT_API_URL=http://127.0.0.1:4200/api python infra/create_pools.py [--gpu-pool-type process|docker]

Idempotent: rerun it after editing infra/{k8s,docker}/gpu-job-template.json or to change the number of GPU
slots.
Needs only `prefect` (no distilflow), so it runs from an operator's laptop as well as from the images.

* ``cpu``: a process pool (prepare, fill-mask, doctor).
* ``gpu``: a Kubernetes pool whose base job template asks for ``nvidia.com/gpu`` on tainted GPU nodes, or
  a process pool (``--gpu-pool-type process``) for one GPU machine running ``prefect worker start --pool gpu``,
  or a Docker pool (``--gpu-pool-type docker``, infra/docker/gpu-job-template.json): each run is a container
  of the CUDA image with NVIDIA device requests (``docker run --gpus``); the worker needs ``prefect-docker``.
* ``gpu`` global concurrency limit (code taking ``concurrency("gpu")``) and ``gpu`` task tag limit (tasks
  tagged ``gpu``), both with ``--gpu-slots`` slots, so two jobs never share one device.
* automation ``distilflow-crash-zombie-runs``: a run whose heartbeats stop for ``--zombie-after`` seconds
  (its worker or machine died) is marked Crashed, which frees its deployment concurrency slot so the next
  scheduled run (e.g. the nightly prepare, limit 1) is not blocked forever. Flow runs send a heartbeat every
  PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (set it on the workers; keep it well below --zombie-after).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

TEMPLATES = {kind: Path(__file__).resolve().parent / kind.replace("kubernetes", "k8s") / "gpu-job-template.json"
             for kind in ("kubernetes", "docker")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu-pool-type", choices=["kubernetes", "process", "docker"],
                   default=os.environ.get("GPU_POOL_TYPE", "kubernetes"),
                   help="type of the gpu pool (default: $GPU_POOL_TYPE or kubernetes)")
    p.add_argument("--gpu-template", default=None,
                   help="base job template of a kubernetes or docker gpu pool (default: "
                   "infra/k8s/gpu-job-template.json or infra/docker/gpu-job-template.json)")
    p.add_argument("--gpu-slots", type=int, default=int(os.environ.get("GPU_SLOTS", "1")),
                   help="GPU jobs that may run at once (default: $GPU_SLOTS or 1)")
    p.add_argument("--cpu-limit", type=int, default=int(os.environ["CPU_POOL_LIMIT"])
                   if os.environ.get("CPU_POOL_LIMIT") else None,
                   help="concurrent flow runs in the cpu pool (default: $CPU_POOL_LIMIT or unlimited)")
    p.add_argument("--zombie-after", type=int, default=int(os.environ.get("ZOMBIE_AFTER_SECONDS", "600")),
                   help="mark a run Crashed after this many seconds without a heartbeat; 0 = no automation "
                   "(default: $ZOMBIE_AFTER_SECONDS or 600)")
    args = p.parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        print("create_pools: PREFECT_API_URL is not set (e.g. http://127.0.0.1:4200/api)", file=sys.stderr)
        return 2
    if args.gpu_slots < 1:
        print("create_pools: --gpu-slots must be >= 1", file=sys.stderr)
        return 2

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
        WorkPoolCreate,
        WorkPoolUpdate,
    )
    from prefect.exceptions import ObjectNotFound

    template = None
    if args.gpu_pool_type in TEMPLATES:
        template = json.loads(Path(args.gpu_template or TEMPLATES[args.gpu_pool_type]).read_text())
    with get_client(sync_client=True) as client:
        for name, kind, tmpl, limit in [("cpu", "process", None, args.cpu_limit),
                                        ("gpu", args.gpu_pool_type, template, None)]:
            try:
                pool = client.read_work_pool(name)
            except ObjectNotFound:
                pool = None
            if pool is not None and pool.type != kind:
                client.delete_work_pool(name)  # a pool's type cannot change in place
                pool = None
            if pool is None:
                extra = {"base_job_template": tmpl} if tmpl else {}
                client.create_work_pool(WorkPoolCreate(name=name, type=kind, concurrency_limit=limit, **extra))
            else:
                update = {"concurrency_limit": limit}
                if tmpl:
                    update["base_job_template"] = tmpl
                client.update_work_pool(name, WorkPoolUpdate(**update))
            print(f"work pool {name} ({kind}) ready")

        try:
            client.read_global_concurrency_limit_by_name("gpu")
            client.update_global_concurrency_limit("gpu", GlobalConcurrencyLimitUpdate(limit=args.gpu_slots,
                                                                                         active=True))
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="gpu", limit=args.gpu_slots))
        # create_concurrency_limit is an upsert for tag limits
        client.create_concurrency_limit(tag="gpu", concurrency_limit=args.gpu_slots)
        print(f"concurrency limits gpu (global and task tag) = {args.gpu_slots} slot(s)")

        if args.zombie_after > 0:
            _zombie_automation(client, args.zombie_after)
            print(f"automation {ZOMBIE_AUTOMATION}: runs silent for {args.zombie_after}s are marked Crashed")
    return 0


ZOMBIE_AUTOMATION = "distilflow-crash-zombie-runs"


def _zombie_automation(client, seconds: int) -> None:
    """Prefect's documented zombie-run recipe: heartbeat seen, then neither heartbeat nor end -> Crashed."""
    from datetime import timedelta

    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    for old in client.read_automations_by_name(ZOMBIE_AUTOMATION):
        client.delete_automation(old.id)
    client.create_automation(AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description="Mark flow runs Crashed when their heartbeats stop (worker or machine died).",
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=seconds),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {seconds}s: its worker or machine died; "
                                    "rerun it (finished shards are skipped)")],
    ))


if __name__ == "__main__":
    sys.exit(main())
