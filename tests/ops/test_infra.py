"""Static checks of the operations files: prefect.yaml, the k8s GPU job template, compose, Dockerfiles.

No servers here (see test_deploy.py for `prefect deploy --all` against a real one); these fail fast when
a deployment points at a flow that moved, a parameter was renamed, or a template variable is misspelt.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

PREFECT_YAML = REPO / "prefect.yaml"
JOB_TEMPLATE = REPO / "infra" / "k8s" / "gpu-job-template.json"
DOCKER_TEMPLATE = REPO / "infra" / "docker" / "gpu-job-template.json"
COMPOSE = REPO / "infra" / "compose.yaml"
DOCKERFILES = [REPO / "infra" / "Dockerfile.cpu", REPO / "infra" / "Dockerfile.cuda"]
JOBS = {"nightly-prepare", "pretrain", "distill", "evaluate", "fill-mask", "qa", "embed", "pipeline"}
FAKE_DATA = "/srv/distilflow-data"


def _deployments() -> list[dict]:
    return yaml.safe_load(PREFECT_YAML.read_text())["deployments"]


def _resolve_env(obj, env: dict[str, str]):
    """Fill ``{{ $VAR }}`` the way `prefect deploy` does, leaving other placeholders alone."""
    from prefect.utilities.templating import apply_values

    old = dict(os.environ)
    os.environ.update(env)
    try:
        return apply_values(obj, os.environ, remove_notset=False)
    finally:
        os.environ.clear()
        os.environ.update(old)


# ------------------------------------------------------------------------------------------ prefect.yaml


def test_prefect_yaml_has_one_deployment_per_job_on_known_pools():
    doc = yaml.safe_load(PREFECT_YAML.read_text())
    deps = doc["deployments"]
    names = [d["name"] for d in deps]
    assert len(names) == len(set(names)), f"duplicate deployment names: {names}"
    assert set(names) >= JOBS, f"missing deployments: {JOBS - set(names)}"
    for d in deps:
        assert d["work_pool"]["name"] in {"cpu", "gpu"}, d["name"]
        assert d.get("description"), f"{d['name']}: a description shows in the UI; add one"
    # code ships in the package / image: no pull steps, so no dependency on the worker's cwd
    assert doc["pull"] == []
    gpu_jobs = {d["name"] for d in deps if d["work_pool"]["name"] == "gpu"}
    assert {"pretrain", "distill"} <= gpu_jobs


def test_prefect_yaml_schedule_and_file_trigger():
    from prefect.client.schemas.schedules import CronSchedule

    deps = {d["name"]: d for d in _deployments()}
    crons = [s for d in deps.values() for s in d.get("schedules") or [] if "cron" in s]
    assert crons, "expected at least one cron schedule (nightly prepare)"
    for s in crons:
        CronSchedule(cron=s["cron"], timezone=s.get("timezone"))  # raises on a bad expression
    assert deps["nightly-prepare"]["schedules"][0]["cron"] == "0 2 * * *"

    (trig,) = deps["fill-mask"]["triggers"]
    assert trig["type"] == "event" and trig["expect"] == ["distilflow.file.ready"]
    assert trig["match"]["prefect.resource.id"] == "distilflow.file.*"
    assert trig["parameters"]["input"] == "{{ event.payload.path }}"
    # the trigger spec must be accepted by Prefect's own model
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    DeploymentEventTrigger(**{k: v for k, v in trig.items() if k != "type"})


def test_prefect_yaml_holds_no_credentials():
    text = PREFECT_YAML.read_text()
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())  # comments may name the variables
    for bad in ("AWS_SECRET_ACCESS_KEY", "aws_secret", "password", "PREFECT_API_KEY", "token:"):
        assert bad.lower() not in body.lower(), f"prefect.yaml must not carry credentials ({bad})"
    # every environment placeholder is one of ours (a typo would deploy a literal "{{ $DISTILFOW_DATA }}")
    for var in re.findall(r"\{\{\s*\$(\w+)\s*\}\}", text):
        assert var == "DISTILFLOW_DATA", var


@pytest.mark.parametrize("name", sorted(JOBS | {"doctor"}))
def test_entrypoint_is_a_flow_and_parameters_match(name):
    from prefect import Flow
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import validate

    d = {d["name"]: d for d in _deployments()}[name]
    flow = load_flow_from_entrypoint(d["entrypoint"], use_placeholder_flow=False)
    assert isinstance(flow, Flow)
    sig = inspect.signature(flow.fn)
    params = _resolve_env(dict(d.get("parameters") or {}), {"DISTILFLOW_DATA": FAKE_DATA})
    unknown = set(params) - set(sig.parameters)
    assert not unknown, f"{name}: parameters {unknown} are not arguments of {d['entrypoint']}{sig}"
    for trig in d.get("triggers") or []:
        t_params = set(trig.get("parameters") or {})
        assert t_params <= set(sig.parameters), f"{name}: trigger parameters {t_params - set(sig.parameters)}"
        params.update({k: "s3://bucket/some/file.txt" for k in t_params - set(params)})
    required = {p.name for p in sig.parameters.values() if p.default is inspect.Parameter.empty}
    assert required <= set(params), f"{name}: required flow arguments {required - set(params)} not set"
    # values type-check against the schema Prefect stores for the deployment
    validate(params, parameter_schema(flow).model_dump_for_openapi(), raise_on_error=True,
             ignore_required=True)


# ------------------------------------------------------------------------------------- k8s job template


def _placeholders(obj) -> set[str]:
    return set(re.findall(r"\{\{\s*([\w.]+)\s*\}\}", json.dumps(obj)))


def test_gpu_job_template_is_valid_and_requests_gpus():
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.templating import apply_values

    template = json.loads(JOB_TEMPLATE.read_text())
    props = template["variables"]["properties"]
    used = _placeholders(template["job_configuration"])
    assert used <= set(props), f"job_configuration uses undeclared variables {used - set(props)}"
    assert {"gpu_count", "node_selector", "tolerations", "image"} <= used
    # Prefect's server-side validation of a pool's base job template
    WorkPoolCreate(name="gpu", type="kubernetes", base_job_template=template)

    # render with the defaults, as the worker does for a run without overrides
    defaults = {k: v["default"] for k, v in props.items() if "default" in v}
    job = apply_values(template["job_configuration"], defaults)["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert isinstance(pod["nodeSelector"], dict) and pod["nodeSelector"]
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert {"mountPath": "/dev/shm", "name": "dshm"} in container["volumeMounts"]
    assert pod["restartPolicy"] == "Never"
    # a run can ask for more GPUs / another node pool through job variables
    job2 = apply_values(template["job_configuration"],
                        {**defaults, "gpu_count": 4, "node_selector": {"pool": "a100"}})["job_manifest"]
    pod2 = job2["spec"]["template"]["spec"]
    assert pod2["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert pod2["nodeSelector"] == {"pool": "a100"}


# ---------------------------------------------------------------------------------- docker job template


def test_docker_gpu_job_template_is_valid_and_references_gpu_count():
    from prefect.server.schemas.actions import WorkPoolCreate

    template = json.loads(DOCKER_TEMPLATE.read_text())
    props = template["variables"]["properties"]
    config = template["job_configuration"]
    used = _placeholders(config)
    assert used <= set(props), f"job_configuration uses undeclared variables {used - set(props)}"
    (request,) = config["container_create_kwargs"]["device_requests"]
    assert request == {"Driver": "nvidia", "Count": "{{ gpu_count }}", "Capabilities": [["gpu"]]}
    assert props["gpu_count"]["default"] == -1 and props["gpu_count"]["type"] == "integer"
    assert props["image"]["default"] == "distilflow:cuda"  # the tag infra/Dockerfile.cuda documents
    assert "distilflow:cuda" in DOCKERFILES[1].read_text()
    # every field of the Docker worker's configuration is still wired to a variable (the template is
    # Prefect's default plus ours, not a hand-written subset)
    from prefect_docker.worker import DockerWorkerJobConfiguration

    assert set(DockerWorkerJobConfiguration.model_fields) <= set(config)
    WorkPoolCreate(name="gpu", type="docker", base_job_template=template)


@pytest.mark.usefixtures("prefect_test_harness_session")
def test_docker_gpu_job_template_renders_device_requests_for_docker_create():
    """The worker's own path: template + job variables -> job configuration -> `docker create` arguments."""
    import asyncio

    from docker.models.containers import _create_container_args
    from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration

    template = json.loads(DOCKER_TEMPLATE.read_text())
    # a remote API URL, so the worker does not ask a (non-existent) Docker engine for host.docker.internal
    values = {"gpu_count": 1, "shm_size": "2g", "env": {"PREFECT_API_URL": "http://prefect:4200/api"}}
    cfg = asyncio.run(DockerWorkerJobConfiguration.from_template_and_values(template, values))
    assert cfg.image == "distilflow:cuda"
    settings = DockerWorker(work_pool_name="gpu")._build_container_settings(None, cfg)
    assert settings["device_requests"] == [{"Driver": "nvidia", "Count": 1, "Capabilities": [["gpu"]]}]
    assert settings["image"] == "distilflow:cuda" and settings["shm_size"] == "2g"
    # docker-py turns the kwargs of containers.create() into the API's HostConfig (no engine involved)
    host = _create_container_args({**settings, "version": "1.43"})["host_config"]
    (req,) = host["DeviceRequests"]
    assert req["Driver"] == "nvidia" and req["Count"] == 1 and req["Capabilities"] == [["gpu"]]
    assert host["ShmSize"] == 2 * 1024**3
    # without job variables: all GPUs of the host (docker run --gpus all) and 8g of /dev/shm
    cfg_all = asyncio.run(DockerWorkerJobConfiguration.from_template_and_values(template, {}))
    assert cfg_all.container_create_kwargs["device_requests"][0]["Count"] == -1
    assert cfg_all.container_create_kwargs["shm_size"] == "8g"


def test_create_pools_makes_a_docker_gpu_pool(prefect_test_harness_session, monkeypatch):
    import importlib.util

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    spec = importlib.util.spec_from_file_location("create_pools", REPO / "infra" / "create_pools.py")
    create_pools = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(create_pools)
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())

    def _exists(read, *args) -> bool:
        try:
            read(*args)
            return True
        except ObjectNotFound:
            return False

    with get_client(sync_client=True) as client:
        # the session server is shared: remove afterwards only what this test created
        before = {"cpu": _exists(client.read_work_pool, "cpu"), "gpu": _exists(client.read_work_pool, "gpu"),
                  "gcl": _exists(client.read_global_concurrency_limit_by_name, "gpu"),
                  "tag": _exists(client.read_concurrency_limit_by_tag, "gpu")}
        try:
            assert create_pools.main(["--gpu-pool-type", "docker", "--zombie-after", "0"]) == 0
            pool = client.read_work_pool("gpu")
            assert pool.type == "docker"
            assert pool.base_job_template == json.loads(DOCKER_TEMPLATE.read_text())
            assert client.read_work_pool("cpu").type == "process"
        finally:
            for name in ("cpu", "gpu"):
                if not before[name] and _exists(client.read_work_pool, name):
                    client.delete_work_pool(name)
            if not before["gcl"]:
                client.delete_global_concurrency_limit_by_name("gpu")
            if not before["tag"]:
                client.delete_concurrency_limit_by_tag("gpu")


# ---------------------------------------------------------------------------------------------- compose


def test_compose_services_and_safety():
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    assert {"postgres", "server", "setup", "cpu-worker", "gpu-worker"} <= set(services)
    assert "asyncpg" in services["server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    for name, svc in services.items():
        for dep in svc.get("depends_on") or {}:
            assert dep in services, f"{name} depends on unknown service {dep}"
        for port in svc.get("ports") or []:
            assert str(port).startswith("127.0.0.1:"), f"{name}: publish on loopback only, not {port}"
        build = svc.get("build")
        if build:
            assert (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file(), name
    gpu = services["gpu-worker"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    # no literal secrets: the password is interpolated from the operator's shell
    text = COMPOSE.read_text()
    assert re.search(r"POSTGRES_PASSWORD: \$\{POSTGRES_PASSWORD:\?", text)
    assert not re.search(r"AWS_SECRET_ACCESS_KEY:[ \t]*\S", text)


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (Debian package) not installed")
def test_compose_config_validates_with_docker_compose():
    env = dict(os.environ, POSTGRES_PASSWORD="not-a-real-password")
    ok = subprocess.run(["docker-compose", "-f", str(COMPOSE), "--profile", "gpu", "config", "-q"], env=env,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    services = subprocess.run(["docker-compose", "-f", str(COMPOSE), "--profile", "gpu", "config", "--services"],
                              env=env, capture_output=True, text=True, check=True).stdout.split()
    assert set(services) == {"postgres", "server", "setup", "cpu-worker", "gpu-worker"}
    # refusing to start without a database password is the point of ${POSTGRES_PASSWORD:?...}
    env.pop("POSTGRES_PASSWORD")
    bad = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], env=env, capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "POSTGRES_PASSWORD" in bad.stderr


# ------------------------------------------------------------------------------------------- Dockerfiles


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_basics(dockerfile):
    ins = _instructions(dockerfile)
    known = {"FROM", "ENV", "RUN", "WORKDIR", "ARG", "COPY", "USER", "ENTRYPOINT", "CMD", "LABEL", "EXPOSE"}
    assert {op for op, _ in ins} <= known, f"unknown instruction in {dockerfile.name}"
    assert ins[0][0] == "FROM"
    base = ins[0][1]
    assert ":" in base and not base.endswith(":latest"), f"pin the base image tag: {base}"
    ops = [op for op, _ in ins]
    # dependencies (the lock) are installed before the source is copied, for layer caching
    lock_copy = next(i for i, (op, a) in enumerate(ins) if op == "COPY" and re.search(r"requirements[-\w]*\.lock", a))
    src_copy = next(i for i, (op, a) in enumerate(ins) if op == "COPY" and a.startswith("tasks"))
    assert lock_copy < src_copy
    # the runtime set only, hash-checked; never the dev lock (pytest, moto ...) nor an unpinned torch
    installs = [a for op, a in ins if op == "RUN" and "pip install" in a]
    assert any("--require-hashes" in a and re.search(r"-r requirements(-cuda)?\.lock", a) for a in installs), installs
    assert not any("requirements-dev" in a or "[dev]" in a or "pytest" in a for _, a in ins)
    for op, args in ins:
        if op == "COPY":
            for src in args.split()[:-1]:
                if not src.startswith("--"):
                    assert (REPO / src).exists(), f"{dockerfile.name}: COPY source {src} missing from the repo"
        if op == "RUN" and "pip install" in args:
            assert not re.search(r"\btorch\b(?![=.-])", args.replace("download.pytorch.org", "")), \
                "torch comes from the hashed lock, never a bare `pip install torch`"
        if op == "ENV":
            assert not re.search(r"(SECRET|PASSWORD|API_KEY)", args), f"no secrets in images: {args}"
    assert "USER" in ops and ops.index("USER") > max(i for i, op in enumerate(ops) if op == "RUN"), \
        "drop root after the last RUN"
    cmd = next(a for op, a in reversed(ins) if op == "CMD")
    assert json.loads(cmd)[0] == "prefect", "exec-form CMD starting a worker"


def test_shell_scripts_parse():
    for script in [REPO / "infra" / "create-pools.sh", REPO / "scripts" / "ci-system-deps.sh"]:
        subprocess.run(["bash", "-n", str(script)], check=True)
        if shutil.which("shellcheck"):
            subprocess.run(["shellcheck", "-S", "warning", str(script)], check=True)
