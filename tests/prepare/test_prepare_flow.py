"""The prepare job end to end: flows, manifests, bad input, determinism, resume after a kill."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distilflow.tasks.prepare.mask import MASKED_SCHEMA
from distilflow.tasks.prepare.pairs import PAIRS_SCHEMA
from distilflow.tasks.prepare.shard import CORPUS_SCHEMA
from tests.conftest import BERT_TOKENIZER, GUTENBERG

# a temporary Prefect server, CLI subprocesses and worker pools: not the fast lane (tests/prepare/test_layout.py
# runs the same stages without Prefect there)
pytestmark = pytest.mark.integration


def _tree(root: Path) -> dict[str, bytes]:
    """All files under root (relative path -> bytes), for byte-identity checks."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """Real text in several formats plus every kind of bad input the issue names."""
    d = tmp_path_factory.mktemp("corpus")
    alice = (GUTENBERG / "pg11.txt").read_text(encoding="utf-8")
    (d / "a_alice.txt").write_text(alice[:40000], encoding="utf-8")
    (d / "b_peter.txt.gz").write_bytes(gzip.compress((GUTENBERG / "pg16.txt").read_bytes()[:30000]))
    paras = [p for p in alice[40000:80000].split("\r\n\r\n") if p.strip()]
    (d / "c_docs.jsonl").write_text("\n".join([json.dumps({"text": p}) for p in paras[:40]] + ["{broken", '{"body": 1}'])
                                    + "\n" + "\n".join(json.dumps({"text": p}) for p in paras[40:]))
    pq.write_table(pa.table({"text": paras[:30] + [None]}), d / "d_docs.parquet")
    (d / "e_latin1.txt").write_bytes("caf\xe9 au lait.\n\nSecond doc here.\n".encode("latin-1"))
    (d / "f_binary.txt").write_bytes(b"\x00\x01\x02binary\x00" * 100)
    (d / "g_empty.txt").write_bytes(b"")
    (d / "h_longline.txt").write_bytes(b"Short doc.\n\n" + b"z" * (10 * 1024 * 1024) + b"\n\nAfter the long line.\n")
    return d


def _prepare(inputs, out, **kw):
    from distilflow.flows.prepare import prepare_flow

    return prepare_flow(inputs=[str(i) for i in inputs], output=str(out), tokenizer=str(BERT_TOKENIZER), **kw)


def test_prepare_end_to_end_with_bad_input(prefect_test_harness_session, corpus_dir, tmp_path):
    out = tmp_path / "prep"
    r = _prepare([corpus_dir], out, max_seq_len=64, dupe_factor=2)
    corpus = json.loads((out / "corpus/.distilflow/manifest.json").read_text())
    # every bad input is counted by reason, and the good files were still processed
    assert corpus["skipped"] == {"binary_file": 1, "empty_file": 1, "invalid_utf8": 1, "line_too_long": 1,
                                 "malformed_json": 1, "missing_field": 1, "null_text": 1}
    errors = [json.loads(line) for f in sorted((out / "corpus/.distilflow/errors").glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert len(errors) == 7
    longline = next(e for e in errors if e["reason"] == "line_too_long")
    assert longline["file"].endswith("h_longline.txt") and longline["line"] == 3 and "fix:" in longline["message"]
    assert corpus["counts"]["input_files"] == 8
    sources = set()
    for f in corpus["files"]:
        t = pq.read_table(out / "corpus" / f["file"])
        assert t.schema == CORPUS_SCHEMA
        sources.update(t.column("source").to_pylist())
    assert {Path(s).name for s in sources} == {"a_alice.txt", "b_peter.txt.gz", "c_docs.jsonl", "d_docs.parquet",
                                               "e_latin1.txt", "h_longline.txt"}
    # schemas, lengths and manifest totals of pairs and masked
    pairs = json.loads((out / "pairs/.distilflow/manifest.json").read_text())
    masked = json.loads((out / "masked/.distilflow/manifest.json").read_text())
    n_pairs = sum(pq.read_metadata(out / "pairs" / f["file"]).num_rows for f in pairs["files"])
    assert n_pairs == pairs["rows"] > 100 and masked["rows"] == 2 * n_pairs  # dupe_factor copies
    for f in masked["files"]:
        t = pq.read_table(out / "masked" / f["file"])
        assert t.schema == MASKED_SCHEMA
        assert max(len(x) for x in t.column("input_ids").to_pylist()) <= 64
    assert pq.read_schema(out / "pairs" / pairs["files"][0]["file"]) == PAIRS_SCHEMA
    assert (out / "tokenizer/tokenizer.json").exists() and (out / "token_counts/token_counts.parquet").exists()
    assert r["pairs"] == n_pairs

    # rerun: nothing is redone (markers untouched), outputs unchanged
    before = _tree(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob(".distilflow/done/*.json")}
    _prepare([corpus_dir], out, max_seq_len=64, dupe_factor=2)
    assert {p: p.stat().st_mtime_ns for p in out.rglob(".distilflow/done/*.json")} == mtimes
    assert _tree(out) == before


def test_same_output_with_processes_and_dask(prefect_test_harness_session, tmp_path):
    inputs = [GUTENBERG / "pg11.txt", GUTENBERG / "pg5200.txt", GUTENBERG / "pg16.txt"]
    inputs = [p for p in inputs if p.exists()]
    _prepare(inputs, tmp_path / "w1", max_seq_len=128, workers=1)
    _prepare(inputs, tmp_path / "w2", max_seq_len=128, workers=2)
    _prepare(inputs, tmp_path / "dask", max_seq_len=128, dask_workers=2)
    ref = _tree(tmp_path / "w1")
    assert len([k for k in ref if k.endswith(".parquet")]) >= 3 * len(inputs)
    assert _tree(tmp_path / "w2") == ref
    assert _tree(tmp_path / "dask") == ref


def test_other_fsspec_filesystems(prefect_test_harness_session):
    """memory:// stands in for any non-local fsspec URL (s3:// is exercised against a real S3 server in
    the integration tests): inputs, outputs and the saved tokenizer all go through fsspec."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/in/book.txt", (GUTENBERG / "pg11.txt").read_bytes()[:20000])
    fs.pipe("/in/more.jsonl.gz", gzip.compress(b'{"text": "One sentence here. And another one."}\n'))
    _prepare(["memory://in"], "memory://out", max_seq_len=64)
    manifest = json.loads(fs.cat("/out/masked/.distilflow/manifest.json"))
    assert manifest["rows"] > 10
    assert fs.exists("/out/tokenizer/tokenizer.json")
    assert not [p for p in fs.find("/out") if ".tmp" in p]


def _cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "distilflow.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300, **kw)


def test_cli_errors_are_one_clear_line(tmp_path):
    r = _cli("prepare", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"),
             "--tokenizer", str(BERT_TOKENIZER))
    assert r.returncode == 2 and "no such file or directory" in r.stderr and str(tmp_path / "nope") in r.stderr
    assert "Traceback" not in r.stderr
    (tmp_path / "in.txt").write_text("Hello there. General Kenobi.\n")
    r = _cli("prepare", "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "o"),
             "--tokenizer", str(BERT_TOKENIZER), "--max-seq-len", "4")
    assert r.returncode == 2 and "max_seq_len" in r.stderr, r.stderr


def test_resume_refuses_a_changed_config(prefect_test_harness_session, tmp_path):
    from distilflow.tasks.core.stage import ResumeError

    src = tmp_path / "in.txt"
    src.write_text("Hello there. General Kenobi.\n\nAnother document. With two sentences.\n")
    _prepare([src], tmp_path / "o", max_seq_len=32)
    with pytest.raises(ResumeError, match="max_seq_len"):
        _prepare([src], tmp_path / "o", max_seq_len=64)
    _prepare([src], tmp_path / "o", max_seq_len=64, overwrite=True)


def test_kill_mid_run_then_rerun_loses_and_duplicates_nothing(tmp_path):
    """SIGKILL the CLI (and its worker processes) while it is sharding, rerun with another worker count:
    finished units are skipped, the result equals a clean run (units are keyed by input, not by worker)."""
    text = (GUTENBERG / "pg1342.txt").read_text(encoding="utf-8")
    inputs = tmp_path / "in"
    inputs.mkdir()
    n_files = 40
    step = len(text) // n_files
    for i in range(n_files):
        (inputs / f"part{i:02d}.txt").write_text(text[i * step:(i + 1) * step], encoding="utf-8")
    args = ["prepare", "--input", str(inputs), "--tokenizer", str(BERT_TOKENIZER), "--max-seq-len", "128"]
    env = {"DISTILFLOW_PROGRESS": "0"}

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "distilflow.cli", *args, "--workers", "2", "--output", str(killed)],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    done_dir = killed / "corpus" / ".distilflow" / "done"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(done_dir.glob("*.json"))) < 3:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_done = len(list(done_dir.glob("*.json")))
    assert 3 <= n_done < n_files, f"kill landed at {n_done} finished units; the test needs a mid-run kill"
    survivors = {p.name: p.stat().st_mtime_ns for p in done_dir.glob("*.json")}

    assert _cli(*args, "--workers", "1", "--output", str(killed), env=env).returncode == 0
    after = {p.name: p.stat().st_mtime_ns for p in done_dir.glob("*.json")}
    assert all(after[k] == v for k, v in survivors.items())  # finished units were not redone
    clean = tmp_path / "clean"
    assert _cli(*args, "--workers", "2", "--output", str(clean), env=env).returncode == 0
    assert _tree(killed) == _tree(clean)  # nothing lost, nothing duplicated, no temp files left


def test_tokenizer_warm_up_fills_the_cache_and_leaves_errors_to_the_stage(tmp_path):
    """``distilflow prepare`` loads the tokenizer in a thread while its flow runs start (the command line's
    preload); the pairs stage then finds it in the cache, and a broken folder still fails there, not earlier."""
    from distilflow.tasks.prepare import job
    from distilflow.tasks.prepare.pairs import load_tokenizer

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    load_tokenizer.cache_clear()
    job.warm_tokenizer(str(broken))  # no error here ...
    with pytest.raises(ValueError):  # ... but where the stage loads it, as without the warm-up
        job.save_tokenizer(str(broken), str(tmp_path / "out-broken"))
    job.warm_tokenizer(str(BERT_TOKENIZER))
    job.save_tokenizer(str(BERT_TOKENIZER), str(tmp_path / "out"))  # waits for the warm-up, then loads from the cache
    info = load_tokenizer.cache_info()
    assert info.misses == 3 and info.hits >= 1  # broken twice (a failure is not cached), BERT once: by the warm-up
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").exists()
