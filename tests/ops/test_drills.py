"""Reliability drills against a real server and process workers.

* A worker (and the flow-run process it started) is SIGKILLed in the middle of a prepare run, as if its
  machine died; the orphan run is marked Crashed (what the zombie automation of infra/create_pools.py does
  when heartbeats stop), a rerun of the same deployment finishes, and the output is byte-identical to an
  uninterrupted run: nothing lost, nothing written twice.
* A run given a missing input path fails within seconds, naming the path.
* The server is stopped and restarted on the same port and database during a run; the run still
  ends Completed.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.ops.test_deploy import PREFECT_YAML, REPO
from tests.prefect_server import flow_run_logs, prefect_server, run_deployment, wait_flow_run

pytestmark = pytest.mark.integration

BOOKS = ["pg11.txt", "pg1342.txt", "pg16.txt", "pg1661.txt", "pg174.txt", "pg236.txt"]
FAST = {"max_seq_len": 64, "dupe_factor": 2, "workers": 1}


def tree(root: Path) -> dict[str, bytes]:
    """Visible files under root (temp files of a killed writer are hidden `.name.tmp-PID` files)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def make_landing(data: Path, books: list[str], tokenizer: Path) -> None:
    """``data/landing``: the first 150 kB (whole lines) of each book; ``data/tokenizer`` -> the tokenizer."""
    from tests.conftest import GUTENBERG

    (data / "landing").mkdir(parents=True)
    for name in books:
        text = (GUTENBERG / name).read_bytes()[:150_000]
        (data / "landing" / name).write_bytes(text[: text.rfind(b"\n") + 1])
    (data / "tokenizer").symlink_to(tokenizer, target_is_directory=True)


def deploy_nightly_prepare(server, data: Path) -> None:
    """Pools + limits via infra/create-pools.sh, then the nightly-prepare deployment over ``data``."""
    import subprocess

    out = subprocess.run(["bash", str(REPO / "infra" / "create-pools.sh")],
                         env=dict(server.env, GPU_POOL_TYPE="process", PYTHON=sys.executable),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    server.env["DISTILFLOW_DATA"] = str(data)
    server.prefect("deploy", "--name", "nightly-prepare", "--prefect-file", str(PREFECT_YAML), cwd=REPO,
                   timeout=180)


@pytest.fixture(scope="module")
def drill(tmp_path_factory, bert_tokenizer_path):
    tmp = tmp_path_factory.mktemp("drill")
    data = tmp / "data"
    make_landing(data, BOOKS, bert_tokenizer_path)  # six files = six shard units, so a kill lands between units
    with prefect_server(tmp) as server:
        deploy_nightly_prepare(server, data)
        yield server, data


def _kill_tree(proc) -> None:
    """SIGKILL a worker and everything it started (the flow-run process): a machine dying, no cleanup."""
    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in reversed(family):
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_killed_worker_then_rerun_loses_nothing_and_duplicates_nothing(drill):
    server, data = drill
    ref_out, out = data / "reference", data / "drill"
    with server.worker("cpu", name="ref"):
        ref = run_deployment(server, "prepare/nightly-prepare", {**FAST, "output": str(ref_out)}, timeout=240)
    assert ref.state.is_completed(), flow_run_logs(server, ref.id)

    # run again into a new folder and kill the worker once the first units are done, before the end
    worker = server.start_worker("cpu", name="doomed")
    with server.client() as client:
        dep = client.read_deployment_by_name("prepare/nightly-prepare")
        run = client.create_flow_run_from_deployment(dep.id, parameters={**FAST, "output": str(out)})
    deadline = time.monotonic() + 180
    while not list((out / "corpus" / ".distilflow" / "done").glob("*.json")):
        assert time.monotonic() < deadline, server.worker_log("doomed")
        time.sleep(0.05)
    _kill_tree(worker)
    assert not (out / "masked" / ".distilflow" / "manifest.json").exists(), "the run finished before the kill; drill proves nothing"
    from prefect.states import Crashed

    with server.client() as client:
        assert not client.read_flow_run(run.id).state.is_final()  # nobody reported: the worker is gone
        # what the distilflow-crash-zombie-runs automation (infra/create_pools.py) does once heartbeats stop,
        # or an operator in the UI: without it the dead run would hold the deployment's concurrency slot
        result = client.set_flow_run_state(run.id, Crashed(message="worker killed (drill)"))
        assert result.status.value == "ACCEPT", result

    with server.worker("cpu", name="rescue"):
        rerun = run_deployment(server, "prepare/nightly-prepare", {**FAST, "output": str(out)}, timeout=240)
    assert rerun.state.is_completed(), flow_run_logs(server, rerun.id)
    got, want = tree(out), tree(ref_out)
    assert sorted(got) == sorted(want), f"files differ: {set(got) ^ set(want)}"
    for name in want:
        assert got[name] == want[name], f"{name} differs from the uninterrupted run"


def test_missing_input_fails_fast_with_the_path(drill):
    server, data = drill
    missing = data / "no-such-landing"
    with server.worker("cpu", name="missing"):
        run = run_deployment(server, "prepare/nightly-prepare",
                             {**FAST, "inputs": [str(missing)], "output": str(data / "never")}, timeout=120)
    assert run.state.is_failed(), run.state
    message = f"{run.state.message}\n{flow_run_logs(server, run.id)}"
    assert str(missing) in message and "no such file" in message.lower(), message
    assert wait_flow_run(server, run.id).state.is_failed()
    assert not (data / "never" / "corpus").exists(), "a shard was attempted"


def test_server_restart_during_a_run(drill):
    """The Prefect server goes down and comes back (same port and database) while a run is in flight:
    the flow-run process rides it out (its client retries) and the run ends Completed, its output whole.
    (Last in this module: it restarts the module's server.)"""
    server, data = drill
    out_dir = data / "prepared" / "restart"
    with server.worker("cpu", name="steady"):
        with server.client() as client:
            dep = client.read_deployment_by_name("prepare/nightly-prepare")
            run = client.create_flow_run_from_deployment(dep.id, parameters={**FAST, "output": str(out_dir)})
        deadline = time.monotonic() + 180
        while not list((out_dir / "corpus" / ".distilflow" / "done").glob("*.json")):
            assert time.monotonic() < deadline, server.worker_log("steady")
            time.sleep(0.05)
        assert not (out_dir / "masked" / ".distilflow" / "manifest.json").exists(), "run ended before the restart; proves nothing"
        server.restart(down_seconds=2)
        final = wait_flow_run(server, run.id, timeout=240)
        assert final.state.is_completed(), f"{final.state}\n{flow_run_logs(server, run.id)}"
        assert (out_dir / "masked" / ".distilflow" / "manifest.json").exists()
