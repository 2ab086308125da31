"""flows/common.py: the progress artifact that updates from a thread of its own."""

from __future__ import annotations

import threading
import time


def test_progress_artifact_sends_the_latest_value_without_blocking_the_caller(prefect_test_harness_session,
                                                                              monkeypatch):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

    from distilflow.flows import common

    release = threading.Event()
    real_update = common.update_progress_artifact

    def slow_update(artifact_id, progress):  # a busy API server: each round trip waits
        release.wait(timeout=30)
        return real_update(artifact_id, progress=progress)

    monkeypatch.setattr(common, "update_progress_artifact", slow_update)

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
