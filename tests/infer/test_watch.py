"""The folder watcher (unit) and the whole file trigger against a real ``prefect server start`` (integration)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import fsspec
import pyarrow.parquet as pq
import pytest

from distilflow.tasks.infer.watch import EVENT_NAME, FolderWatcher, event_for
from tests.prefect_server import prefect_server, stop_process, tail


class Recorder:
    def __init__(self):
        self.events: list[dict] = []

    def __call__(self, **kw):
        self.events.append(kw)

    @property
    def paths(self) -> list[str]:
        return [e["payload"]["path"] for e in self.events]


def test_event_contract():
    e = event_for("s3://b/in/x.txt", 12)
    assert e == {"event": "distilflow.file.ready", "resource": {"prefect.resource.id": "distilflow.file.s3://b/in/x.txt"},
                 "payload": {"path": "s3://b/in/x.txt", "size": 12}}
    assert EVENT_NAME == "distilflow.file.ready"


def test_waits_for_stable_size_ignores_temp_and_hidden(tmp_path):
    d = tmp_path / "drop"
    d.mkdir()
    rec = Recorder()
    w = FolderWatcher(str(d), rec, str(tmp_path / "state.json"), stable_polls=3)
    f = d / "a.txt"
    f.write_text("part one\n")
    (d / ".hidden.txt").write_text("x")
    (d / "b.txt.part").write_text("x")
    (d / ".b.txt.tmp-123-abc").write_text("x")
    (d / "empty.txt").write_text("")
    assert w.poll() == [] and w.poll() == []
    with f.open("a") as fh:  # still being written: the size changes between polls
        fh.write("part two\n")
    assert w.poll() == [] and w.poll() == []
    assert w.poll() == [str(f)]  # unchanged over 3 polls
    assert w.poll() == [] and rec.paths == [str(f)]
    assert rec.events[0]["payload"]["size"] == len("part one\npart two\n")
    (d / "b.txt.part").rename(d / "b.txt")  # upload-then-rename writers are picked up after the rename
    for _ in range(3):
        w.poll()
    assert rec.paths == [str(f), str(d / "b.txt")]
    state = json.loads((tmp_path / "state.json").read_text())
    assert sorted(state["emitted"]) == sorted(rec.paths)


def test_restarted_watcher_emits_each_file_once(tmp_path):
    d = tmp_path / "drop"
    d.mkdir()
    (d / "a.txt").write_text("hello\n")
    rec = Recorder()
    for _ in range(3):  # three watcher processes over the same state file
        w = FolderWatcher(str(d), rec, str(tmp_path / "state.json"), stable_polls=2)
        w.run(interval=0, max_polls=4)
    assert rec.paths == [str(d / "a.txt")]
    # changed content: emitted again only with reprocess_changed
    (d / "a.txt").write_text("hello again, longer\n")
    FolderWatcher(str(d), rec, str(tmp_path / "state.json"), stable_polls=2).run(interval=0, max_polls=3)
    assert len(rec.events) == 1
    FolderWatcher(str(d), rec, str(tmp_path / "state.json"), stable_polls=2,
                  reprocess_changed=True).run(interval=0, max_polls=3)
    assert len(rec.events) == 2


def test_fsspec_url_folder(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe("/watchme/x.jsonl", b'{"text": "a [MASK]"}\n')
    rec = Recorder()
    w = FolderWatcher("memory://watchme", rec, str(tmp_path / "s.json"), stable_polls=2, include=("*.jsonl",))
    fs.pipe("/watchme/skip.csv", b"text\nx\n")
    w.run(interval=0, max_polls=3)
    assert rec.paths == [fs.unstrip_protocol("/watchme/x.jsonl")]  # memory:///watchme/x.jsonl


# -- integration: watcher -> Prefect event -> deployment trigger -> fill-mask flow run ---------------------
def _flow_runs(server, deployment_id):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with server.client() as c:
        return c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def _wait(cond, timeout: float, what: str, logs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n" + "\n".join(tail(p, 3000) for p in logs))


@pytest.mark.integration
def test_file_drop_triggers_exactly_one_flow_run(tmp_path, bert_tokenizer_path):
    from tests.infer.test_fill_mask import gutenberg_texts, save_tiny_mlm

    model = save_tiny_mlm(tmp_path / "model", "distilbert", bert_tokenizer_path)
    drop, out = tmp_path / "drop", tmp_path / "out"
    drop.mkdir()
    with prefect_server(tmp_path) as server:
        env = dict(server.env, PREFECT_RUNNER_POLL_FREQUENCY="1", PREFECT_LOGGING_LEVEL="INFO")
        serve_log = server.home / "serve.log"
        code = ("import sys; from distilflow.flows.inference import serve_fill_mask; "
                "serve_fill_mask(sys.argv[1], sys.argv[2], threads=1)")
        with open(serve_log, "ab") as fh:
            serve = subprocess.Popen([sys.executable, "-c", code, str(out), model], env=env, stdout=fh,
                                     stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
        server.children.append(serve)

        def deployment_and_trigger():
            with server.client() as c:
                try:
                    dep = c.read_deployment_by_name("fill-mask/fill-mask-on-file")
                except Exception:
                    return None
                autos = c.read_automations_by_name("on-file-ready")
            return dep if autos else None

        dep = _wait(deployment_and_trigger, 120, "the served deployment and its trigger", [serve_log])

        watch_log = server.home / "watch.log"

        def start_watcher():
            with open(watch_log, "ab") as fh:
                p = subprocess.Popen([sys.executable, "-m", "distilflow.cli", "watch", str(drop), "--state",
                                      str(tmp_path / "watch-state.json"), "--interval", "0.5", "--stable-polls", "3"],
                                     env=server.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
            server.children.append(p)
            return p

        watcher = start_watcher()
        # a half-written file: appended to for ~4 s (longer than 3 polls), then closed
        texts = gutenberg_texts(12, seed=11)
        target = drop / "batch-01.txt"
        with target.open("w") as fh:
            for t in texts:
                fh.write(t + "\n")
                fh.flush()
                time.sleep(0.35)
                assert not _flow_runs(server, dep.id), "a flow run started while the file was still being written"
        assert not (tmp_path / "watch-state.json").exists() or "batch-01" not in (tmp_path / "watch-state.json").read_text()

        def completed():
            for proc, log in ((watcher, watch_log), (serve, serve_log)):
                assert proc.poll() is None, f"process exited early:\n{tail(log, 4000)}"
            runs = _flow_runs(server, dep.id)
            return runs if runs and all(r.state and r.state.is_final() for r in runs) else None

        runs = _wait(completed, 180, "the triggered flow run", [serve_log, watch_log])
        assert len(runs) == 1 and runs[0].state.is_completed(), runs[0].state
        assert runs[0].parameters["input"] == str(target)
        table = pq.read_table(out / "batch-01.parquet")
        assert sorted(set(table.column("row_id").to_pylist())) == list(range(len(texts)))  # the whole file
        manifest = json.loads((out / ".distilflow" / "manifest.json").read_text())
        assert manifest["counts"]["input_rows"] == len(texts)

        # the same file again: a restarted watcher does not emit it twice -> still exactly one run
        stop_process(watcher)
        watcher = start_watcher()
        _wait(lambda: tail(watch_log, 100000).count("watching ") == 2, 60, "the restarted watcher", [watch_log])
        time.sleep(3)  # 6 polls of the new watcher (3 are enough to emit a stable file)
        assert len(_flow_runs(server, dep.id)) == 1
        stop_process(watcher)
        stop_process(serve)
