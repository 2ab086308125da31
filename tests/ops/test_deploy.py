"""`prefect deploy --all` against a real Prefect server, runs through a real process worker, the file
trigger, and `distilflow server` as one command. Everything binds 127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from distilflow.tasks.core.io import read_json
from tests.conftest import REPO
from tests.prefect_server import (
    PrefectServer,
    flow_run_logs,
    free_port,
    prefect_server,
    run_artifacts,
    run_deployment,
    stop_process,
    wait_flow_run,
    wait_http_ok,
)

pytestmark = pytest.mark.integration


PREFECT_YAML = REPO / "prefect.yaml"
JOBS = {"nightly-prepare", "pretrain", "distill", "evaluate", "fill-mask", "qa", "embed", "pipeline", "doctor"}


def make_data_root(root: Path, tokenizer: Path, corpus: Path, nbytes: int = 40_000) -> Path:
    """A DISTILFLOW_DATA layout with a small landing file (a slice of a real book) and the tokenizer."""
    (root / "landing").mkdir(parents=True)
    text = corpus.read_bytes()[:nbytes]
    (root / "landing" / "book.txt").write_bytes(text[: text.rfind(b"\n") + 1])
    (root / "tokenizer").symlink_to(tokenizer, target_is_directory=True)
    return root


def deploy_all(server: PrefectServer, data: Path, gpu_pool_type: str = "kubernetes") -> None:
    env = dict(server.env, DISTILFLOW_DATA=str(data), GPU_POOL_TYPE=gpu_pool_type, PYTHON=sys.executable)
    out = subprocess.run(["bash", str(REPO / "infra" / "create-pools.sh")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    server.env["DISTILFLOW_DATA"] = str(data)
    server.prefect("deploy", "--all", "--prefect-file", str(PREFECT_YAML), cwd=REPO, timeout=240)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, bert_tokenizer_path):
    from tests.conftest import GUTENBERG

    tmp = tmp_path_factory.mktemp("deploy")
    data = make_data_root(tmp / "data", bert_tokenizer_path, GUTENBERG / "pg11.txt")
    with prefect_server(tmp) as server:
        deploy_all(server, data)
        yield server, data


def test_pools_limits_and_deployments_exist(deployed):
    server, data = deployed
    with server.client() as client:
        pools = {p.name: p for p in client.read_work_pools()}
        assert pools["cpu"].type == "process"
        assert pools["gpu"].type == "kubernetes"
        # the base job template is the one from infra/ (GPU variable present), not Prefect's default
        assert "gpu_count" in pools["gpu"].base_job_template["variables"]["properties"]
        assert client.read_global_concurrency_limit_by_name("gpu").limit == 1
        assert client.read_concurrency_limit_by_tag("gpu").concurrency_limit == 1
        deps = {d.name: d for d in client.read_deployments()}
        assert set(deps) == JOBS
        for d in deps.values():
            assert d.work_pool_name in {"cpu", "gpu"}
            # env placeholders were filled in at deploy time
            assert "{{" not in json.dumps(d.parameters), (d.name, d.parameters)
        nightly = deps["nightly-prepare"]
        assert nightly.parameters["inputs"] == [str(data / "landing")]
        (sched,) = nightly.schedules
        assert sched.schedule.cron == "0 2 * * *" and sched.active
        assert nightly.global_concurrency_limit.limit == 1
        assert nightly.concurrency_options.collision_strategy == "ENQUEUE"
        # the file trigger became an automation that runs the fill-mask deployment
        automations = [a for a in client.read_automations() if "distilflow.file.ready" in a.trigger.expect]
        assert len(automations) == 1
        (action,) = automations[0].actions
        assert action.deployment_id == deps["fill-mask"].id
        assert action.parameters["input"] == "{{ event.payload.path }}"
        (zombie,) = client.read_automations_by_name("distilflow-crash-zombie-runs")
        assert zombie.trigger.after == {"prefect.flow-run.heartbeat"} and zombie.actions[0].state.value == "CRASHED"
    # idempotent: the script and the deploy can be rerun (an operator's second `make deploy`)
    out = subprocess.run(["bash", str(REPO / "infra" / "create-pools.sh")], env=dict(server.env, GPU_SLOTS="2", PYTHON=sys.executable),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    with server.client() as client:
        assert client.read_global_concurrency_limit_by_name("gpu").limit == 2


def test_prepare_deployment_runs_through_a_process_worker(deployed):
    server, data = deployed
    with server.worker("cpu", name="cpu-prepare"):
        run = run_deployment(server, "prepare/nightly-prepare",
                             {"max_seq_len": 64, "dupe_factor": 1, "workers": 1}, timeout=180)
    assert run.state.is_completed(), f"{run.state}\n{flow_run_logs(server, run.id)}\n{server.worker_log('cpu-prepare')}"
    manifest = read_json(str(data / "prepared" / "nightly" / "masked" / ".distilflow" / "manifest.json"))
    assert manifest["rows"] > 0
    # the run's parameters were the deployment's, with our overrides on top
    assert run.parameters["output"] == str(data / "prepared" / "nightly") and run.parameters["max_seq_len"] == 64
    # the summary and per-stage reports are artifacts of this run or of its sub-flow runs
    keys = {a.key for a in run_artifacts(server, run.id)}
    assert {"distilflow-prepare", "distilflow-shard", "distilflow-pairs", "distilflow-mask"} <= keys, keys


def test_file_event_starts_a_fill_mask_run(deployed):
    server, data = deployed
    path = str(data / "inbox" / "fill-mask" / "part-0001.txt")
    event = subprocess.run(
        [str(Path(sys.executable).with_name("prefect")), "--no-prompt", "event", "emit", "distilflow.file.ready",
         "--resource-id", f"distilflow.file.{path}", "--payload", json.dumps({"path": path, "size": 123})],
        env=server.env, capture_output=True, text=True, timeout=60)
    assert event.returncode == 0, event.stderr
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    deadline = time.monotonic() + 60
    runs = []
    with server.client() as client:
        while time.monotonic() < deadline and not runs:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["fill-mask"])))
            time.sleep(0.5)
    assert len(runs) == 1, "the distilflow.file.ready event did not start exactly one fill-mask run"
    assert runs[0].parameters["input"] == path
    assert runs[0].parameters["output"] == str(data / "predictions" / "fill-mask")


def test_distilflow_server_one_command(tmp_path):
    """`distilflow server --deploy` = server + pools + deployments + a worker; Ctrl-C stops every process."""
    import yaml

    data = tmp_path / "data"
    data.mkdir()
    # `deploy --all` of the full prefect.yaml is covered above; the doctor deployment alone keeps this quick
    doc = yaml.safe_load(PREFECT_YAML.read_text())
    doc["deployments"] = [d for d in doc["deployments"] if d["name"] == "doctor"]
    small_yaml = tmp_path / "prefect.yaml"
    small_yaml.write_text(yaml.safe_dump(doc))
    home = tmp_path / "home"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="1")
    log = tmp_path / "server.out"
    cmd = [str(Path(sys.executable).with_name("distilflow")), "server", "--port", str(port), "--workers", "1",
           "--gpu-workers", "0", "--no-ui", "--deploy", str(small_yaml), "--data", str(data),
           "--log-dir", str(tmp_path / "logs")]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = PrefectServer(home=home, port=port, proc=proc, log=log,
                           env=dict(env, PREFECT_API_URL=f"http://127.0.0.1:{port}/api"))
    try:
        wait_http_ok(f"{server.api_url}/health", 120, proc, log)
        # wait for the banner: deployments registered and the worker started
        deadline = time.monotonic() + 180
        while b"Ctrl-C stops" not in log.read_bytes():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        with server.client() as client:
            dep = client.read_deployment_by_name("doctor/doctor")
            run = client.create_flow_run_from_deployment(dep.id)
        run = wait_flow_run(server, run.id, timeout=120)
        assert run.state.is_completed(), f"{run.state}\n{log.read_text()}\n{flow_run_logs(server, run.id)}"
        family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert len(family) >= 3, "expected distilflow + server + worker processes"
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        assert proc.wait(timeout=90) == 0, log.read_text()  # stop(): <= 2 x (10 s + 10 s) if all hang
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                                  for p in family):
            time.sleep(0.2)
        alive = [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
        assert not alive, f"processes left running after Ctrl-C: {alive}"
    finally:
        stop_process(proc)
