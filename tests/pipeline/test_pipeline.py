"""The one-command pipeline: embedded demo corpus, stage skipping, and (slow) the whole run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prefect import flow

from distilflow.tasks.pipeline.stages import run_stage
from distilflow.tasks.prepare.demo_corpus import demo_documents, write_demo_corpus


def test_demo_corpus_is_deterministic_and_split(tmp_path):
    assert demo_documents(seed=0) == demo_documents(seed=0)
    train, held = write_demo_corpus(str(tmp_path), seed=0)
    train_docs = set()
    for p in train:
        train_docs.update(d for d in Path(p).read_text(encoding="utf-8").split("\n\n") if d.strip())
    held_docs = [d for d in Path(held[0]).read_text(encoding="utf-8").split("\n\n") if d.strip()]
    assert len(held_docs) > 20 and len(train_docs) > 300
    assert "Paris is the capital of France." in " ".join(train_docs)


def test_run_stage_skips_a_finished_stage_and_reruns_a_changed_one(prefect_test_harness_session, tmp_path):
    calls = []

    def work(x):
        calls.append(x)
        return {"value": x * 2}

    @flow
    def parent(x: int) -> dict:
        return run_stage(str(tmp_path), "double", {"x": x}, work, x)

    assert parent(3)["value"] == 6 and calls == [3]
    again = parent(3)
    assert again["value"] == 6 and again["skipped"] is True and calls == [3]  # not run twice
    assert parent(4)["value"] == 8 and calls == [3, 4]  # config changed: runs again
    rec = json.loads((tmp_path / "_pipeline" / "double.json").read_text())
    assert rec["config"] == {"x": 4} and rec["result"] == {"value": 8}


def test_run_stage_reruns_downstream_of_a_changed_stage_and_clears_its_outputs(prefect_test_harness_session, tmp_path):
    calls = []
    out = tmp_path / "down"

    def up(x):
        calls.append(("up", x))
        return {"x": x}

    def down():
        # a stage's own resume logic refuses a folder left by another config: it must start empty
        assert not (out / "stale").exists()
        out.mkdir(exist_ok=True)
        (out / "stale").write_text("written by the previous config")
        calls.append(("down",))
        return {}

    @flow
    def parent(x: int) -> dict:
        a = run_stage(str(tmp_path), "up", {"x": x}, up, x)
        return run_stage(str(tmp_path), "down", {"same": "config"}, down, after=(a,), outputs=(str(out),))

    parent(1)
    assert parent(1)["skipped"] is True and calls == [("up", 1), ("down",)]
    # the upstream stage changed: the downstream one (same own config) runs again, on a cleared folder
    assert parent(2)["skipped"] is False and calls == [("up", 1), ("down",), ("up", 2), ("down",)]


@pytest.mark.slow
def test_pipeline_end_to_end_debug_preset(prefect_test_harness_session, tmp_path):
    """The README's first command (under a minute on 2 idle CPU cores)."""
    from distilflow.flows.pipeline import pipeline_flow

    r = pipeline_flow(output=str(tmp_path / "demo"))
    stages = r["stages"]
    assert set(stages) == {"vocab", "prepare", "prepare-heldout", "pretrain", "distill", "evaluate", "fill-mask"}
    assert stages["fill-mask"]["rows"] > 50
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "Held-out masked LM" in report and "Batch fill-mask" in report
    r2 = pipeline_flow(output=str(tmp_path / "demo"))  # rerun: every stage skipped
    assert all(s["skipped"] for s in r2["stages"].values())
