"""Object storage for real: moto's S3 server on 127.0.0.1 (free port), prepare -> fill-mask with every
input, the tokenizer and every output on s3:// URLs. Credentials and the endpoint come only from the
environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL), as on a real worker.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from distilflow.tasks.core.io import InputError, read_json, read_parquet
from distilflow.tasks.ops.supervisor import free_port, stop_process, tail, wait_http_ok

pytestmark = pytest.mark.integration

MOTO = Path(os.environ.get("VIRTUAL_ENV", "")) / "bin" / "moto_server"


def _moto(tmp: Path, auth: bool) -> Iterator[str]:
    import shutil

    exe = str(MOTO) if MOTO.exists() else shutil.which("moto_server")
    if exe is None:
        pytest.fail("moto_server not found: `pip install moto[server]` (a dev dependency)")
    port = free_port()
    env = dict(os.environ)
    if auth:  # enforce IAM: unknown keys get 403 like a real bucket policy would
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    log = tmp / f"moto-{port}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/moto-api/", 60, proc, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)
        assert proc.poll() is not None, tail(log)


def _use_endpoint(monkeypatch, endpoint: str, key: str, secret: str) -> None:
    """Point s3fs at ``endpoint`` with credentials from the environment only (no cached clients)."""
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_env(tmp_path, monkeypatch):
    """A fresh S3 endpoint; credentials only in the environment; no cached s3fs clients from other tests."""
    import s3fs

    for endpoint in _moto(tmp_path, auth=False):
        _use_endpoint(monkeypatch, endpoint, "distilflow-test", "distilflow-test-secret")
        fs = s3fs.S3FileSystem()
        fs.mkdir("distilflow")
        yield fs
        s3fs.S3FileSystem.clear_instance_cache()


def _landing_text(n: int = 40_000) -> bytes:
    from tests.conftest import GUTENBERG

    text = (GUTENBERG / "pg1342.txt").read_bytes()[:n]
    return text[: text.rfind(b"\n") + 1]


def test_prepare_then_fill_mask_fully_on_s3(s3_env, prefect_test_harness_session, tmp_path,
                                            bert_tokenizer_path):
    from distilflow.flows.inference import fill_mask_flow
    from distilflow.flows.prepare import prepare_flow
    from tests.infer.test_fill_mask import save_tiny_mlm

    fs = s3_env
    fs.pipe("distilflow/landing/book.txt", _landing_text())
    fs.put(str(bert_tokenizer_path) + "/", "distilflow/tokenizer/", recursive=True)
    params = {"max_seq_len": 64, "dupe_factor": 2, "workers": 1}
    result = prepare_flow(inputs=["s3://distilflow/landing"], output="s3://distilflow/prepared",
                          tokenizer="s3://distilflow/tokenizer", **params)
    assert result["masked"] > 0

    # the same job on local disk gives the same data: storage does not change results (only the
    # provenance columns differ, they hold the input URL)
    (tmp_path / "landing").mkdir()
    (tmp_path / "landing" / "book.txt").write_bytes(_landing_text())
    prepare_flow(inputs=[str(tmp_path / "landing")], output=str(tmp_path / "prepared"),
                 tokenizer=str(bert_tokenizer_path), **params)
    for stage in ("corpus", "pairs", "masked"):
        remote = sorted(p for p in fs.ls(f"distilflow/prepared/{stage}") if p.endswith(".parquet"))
        local = sorted((tmp_path / "prepared" / stage).glob("*.parquet"))
        assert [Path(p).name for p in remote] == [p.name for p in local], stage
        for r, p in zip(remote, local, strict=True):
            got, want = read_parquet("s3://" + r), read_parquet(str(p))
            keep = [c for c in want.column_names if c not in ("source", "doc_id")]
            assert got.num_rows == want.num_rows > 0
            assert got.select(keep).equals(want.select(keep)), f"{r} differs from the local run"
        assert read_json(f"s3://distilflow/prepared/{stage}/.distilflow/manifest.json")["rows"] == \
            read_json(str(tmp_path / "prepared" / stage / ".distilflow" / "manifest.json"))["rows"]

    # fill-mask over masked sentences taken from the prepared corpus on S3, results written to S3
    corpus = read_parquet(sorted("s3://" + p for p in fs.ls("distilflow/prepared/corpus")
                                 if p.endswith(".parquet"))[0])
    sentences = [s for doc in corpus.column("sentences").to_pylist() for s in doc if 5 <= len(s.split()) <= 30]
    rng = random.Random(0)
    rows = []
    for s in sentences[:24]:
        words = s.split()
        words[rng.randrange(len(words))] = "[MASK]"
        rows.append({"id": len(rows), "text": " ".join(words)})
    fs.pipe("distilflow/inbox/batch-0001.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    model = save_tiny_mlm(tmp_path / "model", "distilbert", bert_tokenizer_path)
    manifest = fill_mask_flow(input="s3://distilflow/inbox/batch-0001.jsonl", output="s3://distilflow/predictions",
                              model=model, top_k=3, keep_columns=["id"])
    assert manifest["rows"] == 3 * len(rows), manifest  # top_k=3 predictions per input row, one row each
    outputs = [p for p in fs.find("distilflow/predictions") if p.endswith(".parquet")]
    assert outputs, fs.find("distilflow/predictions")
    with fs.open(outputs[0], "rb") as f:
        table = pq.read_table(f)
    assert table.num_rows == manifest["rows"]
    assert sorted({int(i) for i in table.column("id").to_pylist()}) == list(range(len(rows))), "a row was lost"


def test_unauthorised_bucket_fails_fast_naming_the_url(tmp_path, monkeypatch, prefect_test_harness_session,
                                                       bert_tokenizer_path):
    import s3fs

    from distilflow.flows.prepare import prepare_flow

    for endpoint in _moto(tmp_path, auth=True):
        _use_endpoint(monkeypatch, endpoint, "not-a-known-key", "wrong")
        with pytest.raises(InputError) as err:
            prepare_flow(inputs=["s3://locked-bucket/landing"], output=str(tmp_path / "out"),
                         tokenizer=str(bert_tokenizer_path), max_seq_len=64, workers=1)
        assert "s3://locked-bucket/landing" in str(err.value) and "permission denied" in str(err.value).lower()
        assert not (tmp_path / "out" / "corpus").exists()
        s3fs.S3FileSystem.clear_instance_cache()


# ------------------------------------------------------------------ storage foundations (issue 15)


def _error_line(stderr: str, command: str) -> str:
    """The CLI's error: exactly one line (Prefect's own log lines may precede it)."""
    lines = [line for line in stderr.splitlines() if line.startswith(f"distilflow {command}:")]
    assert len(lines) == 1, stderr
    assert stderr.rstrip().splitlines()[-1:] == lines, "nothing (no traceback) after the error line"
    return lines[0]


def _pending_uploads(fs, bucket: str) -> list[dict]:
    return fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])


def test_remote_writes_stream_in_parts_and_abort_on_failure(s3_env, monkeypatch):
    from distilflow.tasks.core import io

    fs = s3_env
    monkeypatch.setattr(io, "UPLOAD_BLOCK", 5 << 20)  # S3's smallest part
    chunk = os.urandom(1 << 20)
    url = "s3://distilflow/stream/big.bin"
    with io.atomic_open(url, "wb") as f:
        for _ in range(12):
            f.write(chunk)
        # parts are already uploaded while writing (bounded memory), but nothing is visible yet
        assert len(_pending_uploads(fs, "distilflow")) == 1 and len(f.parts) >= 1
        assert len(f.buffer.getbuffer()) < 6 << 20, "the writer holds about one part, not the object"
        assert not fs.exists("distilflow/stream/big.bin")
    fs.invalidate_cache()
    assert fs.size("distilflow/stream/big.bin") == 12 << 20
    assert fs.cat_file("distilflow/stream/big.bin", start=0, end=1 << 20) == chunk
    assert _pending_uploads(fs, "distilflow") == []

    with pytest.raises(RuntimeError, match="killed"), io.atomic_open("s3://distilflow/stream/half.bin", "wb") as f:
        for _ in range(7):
            f.write(chunk)
        raise RuntimeError("killed mid-upload")
    fs.invalidate_cache()
    assert not fs.exists("distilflow/stream/half.bin")
    assert _pending_uploads(fs, "distilflow") == [], "the multipart upload must be aborted"


def test_missing_bucket_is_one_line_naming_the_url(s3_env, tmp_path, capsys):
    from distilflow.cli import main
    from distilflow.tasks.core import io, remote

    url = "s3://no-such-bucket/run"
    with pytest.raises(InputError, match=r"^s3://no-such-bucket/run/x.json: the bucket does not exist"):
        io.write_json(url + "/x.json", {})
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(InputError, match=r"^s3://no-such-bucket/run/config.json: the bucket does not exist"):
        remote.upload_folder(tmp_path / "model", url)
    with pytest.raises(InputError, match=r"^s3://no-such-bucket/run: no such file or folder"):
        remote.local_copy(url)
    assert main(["doctor", "--storage", url]) == 2
    err = _error_line(capsys.readouterr().err, "doctor")
    assert err == ("distilflow doctor: error: s3://no-such-bucket/run: the bucket does not exist; create "
                           "it or fix the URL"), err


def test_denied_bucket_is_one_line_naming_the_url(tmp_path, monkeypatch, capsys):
    import s3fs

    from distilflow.cli import main

    for endpoint in _moto(tmp_path, auth=True):
        _use_endpoint(monkeypatch, endpoint, "not-a-known-key", "wrong")
        assert main(["doctor", "--storage", "s3://locked-bucket/data"]) == 2
        err = _error_line(capsys.readouterr().err, "doctor")
        assert err.startswith("distilflow doctor: error: s3://locked-bucket/data: "), err
        assert "access denied" in err or "does not exist" in err, err
        s3fs.S3FileSystem.clear_instance_cache()


def test_model_folder_through_the_bucket(s3_env, tmp_path, monkeypatch, bert_tokenizer_path):
    """A model saved locally, uploaded, then loaded on a 'clean machine' (empty cache) from s3:// -- the
    path every job that reads a model takes (local_copy) -- gives the same weights."""
    import torch
    from transformers import AutoModelForMaskedLM

    from distilflow.tasks.core import remote
    from distilflow.tasks.core.hf import load_pretrained, local_model
    from tests.infer.test_fill_mask import save_tiny_mlm

    model_dir = Path(save_tiny_mlm(tmp_path / "model", "distilbert", bert_tokenizer_path))
    manifest = remote.upload_folder(model_dir, "s3://distilflow/models/student")
    assert "model.safetensors" in manifest
    assert not list(s3_env.find("distilflow/models/student", withdirs=False, prefix=".tmp"))

    monkeypatch.setenv("DISTILFLOW_CACHE", str(tmp_path / "clean-cache"))
    local = remote.local_copy("s3://distilflow/models/student")
    assert local.startswith(str(tmp_path / "clean-cache"))
    want = AutoModelForMaskedLM.from_pretrained(model_dir)
    # the jobs' loader takes the URL itself (through the same cache)
    for got in (AutoModelForMaskedLM.from_pretrained(local),
                load_pretrained(AutoModelForMaskedLM, "s3://distilflow/models/student")):
        for (n, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items(), strict=True):
            assert torch.equal(a, b), n
    assert local_model("s3://distilflow/models/student") == local


_PUSHER = """
import os, sys, time
from pathlib import Path
from distilflow.tasks.core import remote
url, work = sys.argv[1], Path(sys.argv[2])
with remote.staged_output(url, work_dir=work) as stage:
    for step in range(1, 1000):
        ckpt = stage.local / "checkpoints" / f"step-{step:04d}"
        ckpt.mkdir(parents=True)
        (ckpt / "model.safetensors").write_bytes(os.urandom(3 << 20))
        (ckpt / "optimizer.pt").write_bytes(os.urandom(1 << 20))
        for old in sorted((stage.local / "checkpoints").iterdir())[:-2]:  # keep_checkpoints=2
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        stage.push("checkpoints")
        print(step, flush=True)
"""


def test_killed_job_resumes_from_the_bucket_on_a_clean_disk(s3_env, tmp_path):
    """A job pushing checkpoints is SIGKILLed mid-upload; on a machine without its disk, the checkpoints
    pulled from the bucket are complete and verified (sha256), whatever moment the kill hit."""
    import signal
    import sys

    from distilflow.tasks.core import remote

    url = "s3://distilflow/runs/kill"
    proc = subprocess.Popen([sys.executable, "-c", _PUSHER, url, str(tmp_path / "machine-1")],
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        steps = [int(proc.stdout.readline()) for _ in range(3)]
        time.sleep(0.3)  # somewhere inside the next push
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert steps == [1, 2, 3]
    s3_env.invalidate_cache()
    manifest = remote.read_manifest(url)
    listed = sorted({rel.split("/")[1] for rel in manifest})
    assert len(listed) == 2 and listed[-1] >= "step-0003", listed

    clean = remote.Staged(url, tmp_path / "machine-2")
    assert clean.pull("checkpoints")
    latest = sorted((clean.local / "checkpoints").iterdir())[-1]
    assert latest.name >= listed[-1]
    for rel, entry in manifest.items():
        assert remote.sha256_file(clean.local / rel) == entry["sha256"], rel
    assert not [p for p in (clean.local).rglob("*") if ".part-" in p.name or ".tmp-" in p.name]
