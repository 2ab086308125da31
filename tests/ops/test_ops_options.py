"""Every option of ``distilflow server`` and ``distilflow doctor`` reaches the job: the command line ->
the config (each field given a non-default value), the config -> the server's processes (commands and
environments) and the doctor flow's parameters, and prefect.yaml's ops deployments -> the flow signature."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import typing
from pathlib import Path
from typing import Any

import pytest

from distilflow.cli import build_parser, main
from distilflow.tasks.core.config import Config, flag_of
from distilflow.tasks.core.errors import ConfigError
from distilflow.tasks.ops.config import DOCTOR, SERVER, DoctorConfig, ServerConfig
from distilflow.tasks.ops.server import environments, server_cmd, worker_cmd
from distilflow.tasks.ops.supervisor import free_port

REPO = Path(__file__).resolve().parents[2]
COMMANDS = {"server": SERVER, "doctor": DOCTOR}


def _other_value(cls: type[Config], f: dataclasses.Field) -> tuple[list[str], Any]:
    """Command-line words giving field ``f`` a value different from its default, and that value."""
    tp = typing.get_type_hints(cls)[f.name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    flag = flag_of(f)
    base = [a for a in typing.get_args(tp) if a is not type(None)][0] if typing.get_args(tp) and \
        typing.get_origin(tp) is not tuple else tp
    if base is bool:
        return ([f"--no-{flag[2:]}"] if default else [flag]), not default
    if typing.get_origin(base) is tuple:
        return [flag, "s3://bucket/a", "/tmp/b"], ("s3://bucket/a", "/tmp/b")
    if base is int:
        value = (default if isinstance(default, int) else 0) + 3
        return [flag, str(value)], value
    if base is float:
        value = float(default) + 2.5
        return [flag, str(value)], value
    value = f"custom-{f.name}"
    return [flag, value], value


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_reaches_the_config(command):
    spec = COMMANDS[command]
    defaults = spec.config_from(build_parser([command]).parse_args([command]))
    assert defaults == spec.config(), "the command line's defaults are the config's defaults"
    fields = [f for f in dataclasses.fields(spec.config) if f.metadata.get("cli", True)]
    assert fields
    for f in fields:
        words, want = _other_value(spec.config, f)
        args = build_parser([command]).parse_args([command, *words])
        cfg = spec.config_from(args)
        assert getattr(cfg, f.name) == want != getattr(defaults, f.name), (command, f.name, words)
        # nothing else moved
        assert {k: v for k, v in cfg.to_dict().items() if k != f.name} == \
            {k: v for k, v in defaults.to_dict().items() if k != f.name}, f.name


def test_server_flags_users_scripts_call():
    parse = lambda *w: SERVER.config_from(build_parser(["server"]).parse_args(["server", *w]))  # noqa: E731
    assert parse("--deploy").deploy == "prefect.yaml"  # the flag alone: ./prefect.yaml
    assert parse("--deploy", "infra/p.yaml").deploy == "infra/p.yaml"
    assert parse().deploy is None
    assert parse("--no-ui").ui is False and parse("--ui").ui is True
    assert parse("--worker-limit", "2", "--gpu-workers", "0").worker_limit == 2
    cfg = parse()
    assert (cfg.host, cfg.port, cfg.workers, cfg.gpu_workers, cfg.startup_timeout) == ("127.0.0.1", 4200, 1, -1, 120.0)


@pytest.mark.parametrize("bad", [{"port": 0}, {"port": 70000}, {"workers": -1}, {"gpu_workers": -2},
                                 {"startup_timeout": 0}, {"worker_limit": -1}])
def test_server_config_bounds_name_the_field(bad):
    with pytest.raises(ConfigError, match=f"ServerConfig.{next(iter(bad))}"):
        ServerConfig(**bad)


def test_server_options_reach_the_processes(tmp_path):
    cfg = ServerConfig(host="127.0.0.2", port=4321, database_url="sqlite+aiosqlite:///x.db", data="s3://b/data",
                       ui=False, worker_limit=3)
    server_env, client_env = environments(cfg, {"PATH": "/bin", "DISTILFLOW_DATA": "/inherited"})
    assert server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] == "sqlite+aiosqlite:///x.db"
    assert (server_env["PREFECT_SERVER_API_HOST"], server_env["PREFECT_SERVER_API_PORT"]) == ("127.0.0.2", "4321")
    assert client_env["PREFECT_API_URL"] == "http://127.0.0.2:4321/api"
    assert client_env["DISTILFLOW_DATA"] == "s3://b/data"  # --data wins over the environment
    assert "PREFECT_SERVER_DATABASE_CONNECTION_URL" not in client_env
    assert server_cmd("prefect", cfg)[-5:] == ["--host", "127.0.0.2", "--port", "4321", "--no-ui"]
    assert worker_cmd("prefect", "cpu", "w", cfg.worker_limit)[-2:] == ["--limit", "3"]
    assert "--limit" not in worker_cmd("prefect", "cpu", "w", None)
    # without --data the workers inherit DISTILFLOW_DATA (the old default "from the environment")
    _, inherited = environments(ServerConfig(), {"DISTILFLOW_DATA": "/inherited"})
    assert inherited["DISTILFLOW_DATA"] == "/inherited"
    assert environments(ServerConfig(host="0.0.0.0"), {})[1]["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"


def test_server_busy_port_is_one_line_and_starts_nothing(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["server", "--port", str(port), "--log-dir", str(tmp_path / "logs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"distilflow server: error: 127.0.0.1:{port} is in use (another Prefect server?); pick another --port"
    assert not (tmp_path / "logs").exists(), "nothing may be started when the port is taken"


def test_server_missing_deploy_file_is_one_line(tmp_path, capsys):
    assert main(["server", "--port", str(free_port()), "--deploy", str(tmp_path / "nope.yaml"),
                 "--log-dir", str(tmp_path / "logs")]) == 2
    err = capsys.readouterr().err
    assert "nope.yaml: no such file" in err and err.count("\n") == 1
    assert not (tmp_path / "logs").exists()


def test_doctor_flow_parameters_are_the_config_fields():
    from distilflow.flows.ops import doctor_flow

    params = inspect.signature(doctor_flow.fn).parameters
    assert list(params) == [f.name for f in dataclasses.fields(DoctorConfig)]
    assert params["storage"].default == [] and params["require_gpu"].default is False
    schema = doctor_flow.parameters.model_dump()["properties"]
    assert set(schema) == {"storage", "require_gpu"}
    assert "64-byte" in schema["storage"]["description"]


def test_prefect_yaml_ops_deployments_match_their_flows():
    import importlib

    import yaml

    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    ops = [d for d in doc["deployments"] if d["entrypoint"].startswith("distilflow.flows.ops.")]
    assert ops, "prefect.yaml has no ops deployment"
    for dep in ops:
        module, _, name = dep["entrypoint"].rpartition(".")
        flow = getattr(importlib.import_module(module), name)
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(dep.get("parameters", {})) <= accepted, (dep["name"], set(dep["parameters"]) - accepted)
        # the values validate as the flow's config (templated strings stand in for a URL)
        DoctorConfig.from_dict(dep.get("parameters", {}))


_FAKE_PREFECT = '''#!{python}
"""Stands in for the prefect CLI: records how it was called, serves /api/health for `server start`."""
import http.server, json, os, sys, time
with open({record!r}, "a") as fh:
    fh.write(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": {{k: os.environ.get(k) for k in (
        "PREFECT_API_URL", "DISTILFLOW_DATA", "PREFECT_SERVER_DATABASE_CONNECTION_URL",
        "CUDA_VISIBLE_DEVICES")}}}}) + "\\n")
args = sys.argv[1:]
if args[:2] == ["server", "start"]:
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"true")
        def log_message(self, *a): pass
    http.server.HTTPServer(("127.0.0.1", int(args[args.index("--port") + 1])), H).serve_forever()
elif "deploy" in args:
    sys.exit(0)
else:
    time.sleep(600)
'''


@pytest.mark.integration
def test_server_command_runs_the_fleet_with_every_option(tmp_path):
    """The real supervisor with a stand-in prefect CLI: options given on the command line reach the server,
    the deploy step and each worker; SIGINT stops them all and exits 0."""
    record = tmp_path / "calls.jsonl"
    fake = tmp_path / "prefect"
    fake.write_text(_FAKE_PREFECT.format(python=sys.executable, record=str(record)))
    fake.chmod(0o755)
    (tmp_path / "p.yaml").write_text("deployments: []\n")
    work = tmp_path / "work"
    work.mkdir()
    port = free_port()
    argv = ["server", "--port", str(port), "--workers", "2", "--worker-limit", "4", "--gpu-workers", "1",
            "--no-ui", "--deploy", str(tmp_path / "p.yaml"), "--data", "s3://bucket/data", "--workdir", str(work),
            "--database-url", "sqlite+aiosqlite:///db.sqlite", "--log-dir", str(tmp_path / "logs"),
            "--startup-timeout", "60"]
    script = textwrap.dedent(f"""
        import sys
        from distilflow.cli import build_parser
        from distilflow.tasks.ops.server import serve
        args = build_parser({argv!r}).parse_args({argv!r})
        sys.exit(serve(args.spec.config_from(args), lambda url, slots: [f"pools at {{url}} ({{slots}} gpu slot)"],
                       prefect={str(fake)!r}))
    """)
    out_log = tmp_path / "out.log"
    with open(out_log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=fh, stderr=subprocess.STDOUT,
                                cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while b"Ctrl-C stops" not in out_log.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, out_log.read_text()
            time.sleep(0.2)
        while len(record.read_text().splitlines()) < 5 and time.monotonic() < deadline:  # server, deploy, 3 workers
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0, out_log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = out_log.read_text()
    assert f"pools at http://127.0.0.1:{port}/api (1 gpu slot)" in text and "(UI disabled)" in text
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    by_kind = {("server" if c["argv"][:2] == ["server", "start"] else "deploy" if "deploy" in c["argv"]
                else c["argv"][c["argv"].index("--name") + 1]): c for c in calls}
    assert set(by_kind) == {"server", "deploy", "cpu-worker-0", "cpu-worker-1", "gpu-worker-0"}, calls
    server = by_kind["server"]
    assert server["argv"][-1] == "--no-ui" and server["argv"][server["argv"].index("--port") + 1] == str(port)
    assert server["env"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"] == "sqlite+aiosqlite:///db.sqlite"
    assert by_kind["deploy"]["argv"][-1] == str(tmp_path / "p.yaml")
    for name in ("cpu-worker-0", "cpu-worker-1", "gpu-worker-0"):
        w = by_kind[name]
        assert w["cwd"] == str(work) and w["env"]["DISTILFLOW_DATA"] == "s3://bucket/data"
        assert w["env"]["PREFECT_API_URL"] == f"http://127.0.0.1:{port}/api"
        assert w["argv"][w["argv"].index("--limit") + 1] == ("1" if name.startswith("gpu") else "4")
    assert by_kind["gpu-worker-0"]["env"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert (tmp_path / "logs" / "server.log").exists()


def test_doctor_command_hands_every_option_to_the_flow(prefect_test_harness_session, tmp_path, capsys):
    import torch

    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["doctor", "--storage", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert f"  {a}: write" in out and f"  {b}: write" in out  # both URLs were probed by the flow
    if not torch.cuda.is_available():
        assert main(["doctor", "--require-gpu"]) == 2
        err = capsys.readouterr().err
        assert "distilflow doctor: error: " in err and "no CUDA device visible (require_gpu=True)" in err
