"""The command line's temporary Prefect API (tasks/ops/prefect_api.py): started only when no API is configured,
used by the whole process, gone when the command ends -- even when it is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distilflow.tasks.ops import prefect_api
from tests.prefect_server import prefect_server


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    home = tmp_path / "prefect-home"
    return {**env, "PREFECT_HOME": str(home), "PREFECT_PROFILES_PATH": str(home / "profiles.toml"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DISTILFLOW_PROGRESS": "0",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180", **extra}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purpose
        return f.read().split(")")[-1].split()[0] != "Z"


def test_nothing_is_started_when_an_api_is_configured(monkeypatch):
    monkeypatch.setattr(prefect_api, "_SERVER", None)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert prefect_api.start_temporary_server() is None
    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.setenv("DISTILFLOW_TEMP_SERVER", "0")
    assert prefect_api.start_temporary_server() is None
    prefect_api.wait_ready()  # no server: nothing to wait for


def test_in_process_callers_keep_their_settings_context(monkeypatch):
    """A caller that already configured Prefect in-process (the test harness) gets no server of ours."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setattr(prefect_api, "_SERVER", None)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("DISTILFLOW_TEMP_SERVER", raising=False)
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert prefect_api.start_temporary_server() is None


def test_flow_runs_under_our_temporary_server_send_no_heartbeats(monkeypatch):
    """Heartbeats tell a server that a run is alive; ours dies with the command, and Prefect waits up to 1 s
    for the heartbeat thread at the end of every flow run. A configured server keeps them."""
    from prefect.settings import get_current_settings

    default = get_current_settings().flows.heartbeat_frequency
    assert default is not None
    monkeypatch.setattr(prefect_api, "_SERVER", None)  # a configured API (or Prefect's own server)
    with prefect_api.run_settings():
        assert get_current_settings().flows.heartbeat_frequency == default
    monkeypatch.setattr(prefect_api, "_SERVER", prefect_api.TemporaryServer())  # ours
    with prefect_api.run_settings():
        assert get_current_settings().flows.heartbeat_frequency is None
    assert get_current_settings().flows.heartbeat_frequency == default


def test_with_a_configured_server_heartbeats_go_out_and_a_run_does_not_wait_for_their_thread(
        prefect_test_harness_session, monkeypatch):
    """The heartbeat thread sleeps in 1 s steps; Prefect's sync engine joined it (up to 2 s) at the end of every
    flow run. Made to sleep 10 s per step here: the run must end at once, and the heartbeat must have gone out."""
    import threading
    import types

    from prefect import flow, flow_engine

    monkeypatch.setattr(prefect_api, "_SERVER", None)  # a configured API
    slept = threading.Event()

    def sleep(seconds: float) -> None:
        if threading.current_thread() is not threading.main_thread():  # the heartbeat thread, after a beat
            slept.set()
            seconds *= 10
        time.sleep(seconds)

    shim = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    shim.sleep = sleep
    monkeypatch.setattr(flow_engine, "time", shim)

    @flow
    def quick() -> float:
        slept.wait(timeout=30)  # the heartbeat went out and its thread is asleep: what the end of a run joined
        return time.perf_counter()

    with prefect_api.run_settings():
        body_end = quick()
        waited = time.perf_counter() - body_end
    assert slept.is_set(), "no heartbeat thread ran: heartbeats are off"
    assert waited < 1.5, f"the flow run waited {waited:.2f} s after its body"


@pytest.mark.integration
def test_command_uses_an_early_server_and_stops_it(tmp_path, bert_tokenizer_path):
    from tests.infer.test_fill_mask import save_tiny_mlm

    model = save_tiny_mlm(tmp_path / "m", "distilbert", bert_tokenizer_path)
    (tmp_path / "q.txt").write_text("Paris is the [MASK] of France.\n")
    code = ("import sys, subprocess; from distilflow.cli import main; rc = main(sys.argv[1:]); "
            "from distilflow.tasks.ops import prefect_api as p; "
            "print('SERVER', p._SERVER.process.pid if p._SERVER and p._SERVER.process else None, flush=True); "
            "sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, "fill-mask", "--input", str(tmp_path / "q.txt"), "--output",
                          str(tmp_path / "out"), "--model", model], env=_env(tmp_path), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "1 input rows: 1 ok" in out.stdout and "View at" not in out.stdout + out.stderr
    pid = int(out.stdout.split("SERVER ")[1].split()[0])
    time.sleep(0.5)
    assert not _alive(pid), "the temporary server outlived the command"


@pytest.mark.integration
def test_server_dies_with_a_killed_command(tmp_path):
    code = ("from distilflow.tasks.ops import prefect_api as p; s = p.start_temporary_server(); "
            "print(s.process.pid, flush=True); import time; time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], env=_env(tmp_path), stdout=subprocess.PIPE, text=True)
    server_pid = int(proc.stdout.readline())
    assert _alive(server_pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for _ in range(100):
        if not _alive(server_pid):
            break
        time.sleep(0.1)
    assert not _alive(server_pid), "PR_SET_PDEATHSIG should have stopped the server"


@pytest.mark.integration
@pytest.mark.slow  # CI: the unit test above (nothing started) + test_ui (a command recorded on a real server)
def test_a_real_server_is_used_when_configured(tmp_path, bert_tokenizer_path):
    """PREFECT_API_URL set: no temporary server; the run is recorded on the real one."""
    from tests.infer.test_fill_mask import save_tiny_mlm

    model = save_tiny_mlm(tmp_path / "m", "distilbert", bert_tokenizer_path)
    (tmp_path / "q.jsonl").write_text(json.dumps({"text": "A [MASK] day."}) + "\n")
    with prefect_server(tmp_path / "srv") as server:
        code = ("import sys; from distilflow.cli import main; rc = main(sys.argv[1:]); "
                "from distilflow.tasks.ops import prefect_api as p; print('SERVER', p._SERVER, flush=True); sys.exit(rc)")
        out = subprocess.run([sys.executable, "-c", code, "fill-mask", "--input", str(tmp_path / "q.jsonl"),
                              "--output", str(tmp_path / "out"), "--model", model], env=server.env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "SERVER None" in out.stdout
        import httpx

        runs = httpx.post(f"{server.env['PREFECT_API_URL']}/flow_runs/filter", json={}).json()
        assert [r["name"] for r in runs] and any(r["state_type"] == "COMPLETED" for r in runs)
