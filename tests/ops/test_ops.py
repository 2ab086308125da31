"""Unit tests of the operations helpers (tasks/ops/supervisor.py) and the doctor flow; the server's
options and supervisor wiring are in test_ops_options.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from distilflow.tasks.core.errors import UserError
from distilflow.tasks.core.io import InputError
from distilflow.tasks.ops.supervisor import Supervisor, free_port, probe_storage, stop_process, wait_http_ok


def test_probe_storage_round_trip_leaves_nothing(tmp_path):
    out = probe_storage(str(tmp_path))
    assert out["url"] == str(tmp_path) and out["write_ms"] >= 0 and out["read_ms"] >= 0
    assert list(tmp_path.iterdir()) == []  # the probe object was deleted


def test_probe_storage_memory_filesystem():
    assert probe_storage("memory://distilflow-probe-test/x")["url"] == "memory://distilflow-probe-test/x"


def test_probe_storage_unwritable_names_the_url(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(InputError, match="a-file/sub: cannot write"):
        probe_storage(str(blocker / "sub"))


def test_supervisor_reports_the_first_exit_and_stops_the_rest(tmp_path):
    sup = Supervisor(tmp_path / "logs")
    sleeper = sup.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
    sup.start("failing", [sys.executable, "-c", "import sys, time; time.sleep(0.5); print('boom'); sys.exit(3)"])
    name, code = sup.wait(poll=0.05)
    assert (name, code) == ("failing", 3)
    assert "boom" in (tmp_path / "logs" / "failing.log").read_text()
    sup.stop()
    assert sleeper.poll() is not None


def start_parent_with_child(parent_setup: str = "", child_popen_kwargs: str = "") -> tuple[subprocess.Popen, int]:
    """A sleeping parent in a session of its own with one sleeping child; returns (parent, child pid)."""
    code = (f"import signal, subprocess, sys, time; {parent_setup}"
            f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']{child_popen_kwargs}); "
            "print(p.pid, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    return proc, int(proc.stdout.readline())


def test_stop_process_kills_the_whole_group(tmp_path):
    # a parent that ignores SIGTERM and has a child: both must be gone afterwards
    proc, child = start_parent_with_child(parent_setup="signal.signal(signal.SIGTERM, signal.SIG_IGN); ")
    stop_process(proc, timeout=1)
    assert proc.poll() is not None
    with pytest.raises(ProcessLookupError):
        for _ in range(50):
            os.kill(child, 0)
            time.sleep(0.1)


def test_stop_process_stops_descendants_in_their_own_session(tmp_path):
    # Prefect's process worker starts each flow run with start_new_session=True: a group-wide signal misses it
    proc, child = start_parent_with_child(child_popen_kwargs=", start_new_session=True")
    assert os.getpgid(child) != proc.pid  # really outside the group
    stop_process(proc, timeout=5)
    assert proc.poll() is not None
    deadline = time.monotonic() + 5
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(child), f"process {child} (own session) left running"


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_wait_http_ok_fails_early_when_the_process_dies(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("address already in use\n")
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(1)"])
    proc.wait()
    with pytest.raises(RuntimeError, match="address already in use"):
        wait_http_ok(f"http://127.0.0.1:{free_port()}/api/health", 30, proc, log)


def test_wait_http_ok_times_out():
    with pytest.raises(TimeoutError):
        wait_http_ok(f"http://127.0.0.1:{free_port()}/api/health", 0.5)


def test_doctor_flow_reports_storage_and_refuses_missing_gpu(prefect_test_harness_session, tmp_path):
    import torch

    from distilflow.flows.ops import doctor_flow

    result = doctor_flow(storage=[str(tmp_path)])
    assert result["environment"]["torch"] == torch.__version__
    assert result["environment"]["cache_free_gib"] > 0 and result["environment"]["cache"]
    assert [p["url"] for p in result["storage"]] == [str(tmp_path)]
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            doctor_flow(storage=[], require_gpu=True)


def test_create_pools_script_needs_an_api_url():
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(["bash", str(repo / "infra" / "create-pools.sh")], env=dict(env, PYTHON=sys.executable),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "PREFECT_API_URL is not set" in out.stderr
