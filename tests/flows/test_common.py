"""flows/common.py: the progress artifact that updates from a thread of its own."""

from __future__ import annotations

import threading
import time

import pytest


def test_progress_artifact_sends_the_latest_value_without_blocking_the_caller(prefect_test_harness_session,
                                                                              monkeypatch):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

    from distilflow.flows import common

    release = threading.Event()
    real_update = common.update_progress

    def slow_update(client, artifact_id, progress):  # a busy API server: each round trip waits
        release.wait(timeout=30)
        return real_update(client, artifact_id, progress)

    monkeypatch.setattr(common, "update_progress", slow_update)

    @flow
    def stage() -> tuple[object, float, threading.Thread]:
        t0 = time.perf_counter()
        with common.ProgressArtifact("test progress") as progress:
            for v in (10.0, 50.0, 90.0, 100.0):
                progress.update(v)
        return progress.id, time.perf_counter() - t0, progress._thread

    artifact_id, seconds, thread = stage()
    assert seconds < 5  # the updates did not wait for the API
    release.set()
    thread.join(timeout=30)
    assert not thread.is_alive()
    with get_client(sync_client=True) as client:
        art = client.read_artifacts(artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[artifact_id])))
    assert [a.data for a in art] == [100.0]  # the last value arrived


@pytest.fixture
def sent(monkeypatch) -> list[float]:
    """The progress values that went out to the API, in order."""
    from distilflow.flows import common

    values: list[float] = []
    real_update = common.update_progress

    def recording_update(client, artifact_id, progress):
        real_update(client, artifact_id, progress)
        values.append(progress)

    monkeypatch.setattr(common, "update_progress", recording_update)
    return values


def test_progress_updates_share_one_client(prefect_test_harness_session, monkeypatch, sent):
    """Prefect's update_progress_artifact builds a new API client per call, and each client a TLS context
    (~50 ms of CPU: a quarter of prepare's command-line process on 66 MB). The sender makes one."""
    from prefect import flow
    from prefect.client import orchestration

    from distilflow.flows import common

    made = []
    real_init = orchestration.SyncPrefectClient.__init__

    def counting_init(self, *args, **kwargs):
        made.append(threading.current_thread().name)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(orchestration.SyncPrefectClient, "__init__", counting_init)
    monkeypatch.setattr(common.ProgressArtifact, "MIN_INTERVAL", 0.0)

    @flow
    def stage() -> threading.Thread:
        with common.ProgressArtifact("client test") as progress:
            for v in range(1, 6):
                progress.update(20.0 * v)
                deadline = time.monotonic() + 30
                while len(sent) < v and time.monotonic() < deadline:  # one update at a time goes out
                    time.sleep(0.01)
        return progress._thread

    stage().join(timeout=30)
    assert sent == [20.0, 40.0, 60.0, 80.0, 100.0]
    assert made.count("progress-artifact") == 1


def test_progress_values_closer_than_the_interval_are_coalesced(prefect_test_harness_session, monkeypatch, sent):
    """Each update is also an event the server persists; a stage whose units finish twice a second sends one
    every MIN_INTERVAL seconds, and the last value when it ends."""
    from prefect import flow

    from distilflow.flows import common

    monkeypatch.setattr(common.ProgressArtifact, "MIN_INTERVAL", 1.0)

    @flow
    def stage() -> threading.Thread:
        with common.ProgressArtifact("coalescing test") as progress:
            for v in range(1, 101):  # ~0.5 s of updates
                progress.update(float(v))
                time.sleep(0.005)
        return progress._thread

    stage().join(timeout=30)
    assert sent[-1] == 100.0
    assert 1 <= len(sent) <= 3, sent


def test_a_job_flow_ending_does_not_wait_for_an_artifact_still_in_use(prefect_test_harness_session):
    """join_all waits only for artifacts already left: another flow of the same process (a watcher's) may
    still be using one, and EXIT_WAIT seconds of waiting for it would be for nothing."""
    from prefect import flow

    from distilflow.flows import common

    @flow
    def stage() -> float:
        with common.ProgressArtifact("still in use") as progress:
            progress.update(50.0)
            t0 = time.perf_counter()
            common.ProgressArtifact.join_all()
            return time.perf_counter() - t0

    assert stage() < 1.0

SLOW_EXIT_SCRIPT = """
import atexit, sys, threading, time
from dataclasses import dataclass
from prefect import flow
from distilflow.flows import common
from distilflow.tasks.core.config import Config, option

real_update = common.update_progress

def slow_update(client, artifact_id, progress):  # the last value is still on its way when the job returns
    time.sleep(2)  # longer than Prefect's own exit handlers take (with 0.5 s the bug did not show)
    return real_update(client, artifact_id, progress)

common.update_progress = slow_update

@dataclass(frozen=True, kw_only=True)
class Options(Config):
    n: int = option(1, "unused")

def body(cfg=None):
    with common.ProgressArtifact("exit test") as progress:
        progress.update(100.0)
    return progress.id

stage = common.config_flow(Options, name="exit-test")(body) if sys.argv[1] == "job-flow" else flow(body)
print("ARTIFACT", stage(), flush=True)
threading._shutdown()  # then the interpreter's exit, as distilflow.cli.console runs it
atexit._run_exitfuncs()
"""


def test_the_last_progress_value_goes_out_before_the_interpreter_shuts_down(prefect_test_harness_session, tmp_path):
    """A job flow waits for its progress values before it returns. Left to the exit handlers, Prefect can no
    longer start the events worker an artifact update reports to: an ERROR with a traceback ("can't register
    atexit after shutdown") after every fill-mask result line (what a plain flow here still shows)."""
    import os
    import subprocess
    import sys
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId
    from prefect.settings import get_current_settings

    env = {**os.environ, "PREFECT_API_URL": str(get_current_settings().api.url)}
    proc = subprocess.run([sys.executable, "-c", SLOW_EXIT_SCRIPT, "job-flow"], env=env, capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "Error emitting event" not in out, out
    artifact_id = UUID(next(line for line in proc.stdout.splitlines() if line.startswith("ARTIFACT")).split()[1])
    with get_client(sync_client=True) as client:
        art = client.read_artifacts(artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[artifact_id])))
    assert [a.data for a in art] == [100.0]
