"""Every job on object storage (issue 15 item 3), against moto's S3 server (tests/ops/test_s3.py): training
killed mid-run and resumed on a clean disk from the bucket, models read from s3:// folders, the pipeline
to its report in the bucket, and one error line for a bucket that does not exist, per code path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distilflow.tasks.core import remote
from distilflow.tasks.core.errors import InputError
from tests.ops import test_s3
from tests.ops.test_s3 import _error_line

s3_env = test_s3.s3_env  # the moto S3 server fixture (a fresh endpoint and bucket per test)

pytestmark = pytest.mark.integration

MISSING = "s3://no-such-bucket/run"


def _losses(lines: str) -> list[float]:
    return [r["loss"] for r in map(json.loads, lines.splitlines()) if "loss" in r]


def _upload(fs, local: Path, key: str) -> str:
    fs.put(str(local) + "/", f"distilflow/{key}/", recursive=True)
    return f"s3://distilflow/{key}"


def _train_args(data: str, output: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "distilflow.tasks.train", "pretrain", "--data", data, "--output", output,
            "--config", "tiny", "--batch-size", "8", "--max-steps", "40", "--save-every", "4", "--log-every", "1",
            "--threads", "1", "--warmup-steps", "2", "--lr", "3e-3", *extra]


def _wait_for_checkpoint(fs, url: str, proc: subprocess.Popen, log: Path) -> str:
    """The first checkpoint's name once the bucket's manifest lists it (the run is still going)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        fs.invalidate_cache()
        steps = sorted({rel.split("/")[1] for rel in (remote.read_manifest(url) or {})
                        if rel.startswith("checkpoints/step-")})
        if steps:
            return steps[0]
        time.sleep(0.05)
    raise AssertionError("no checkpoint reached the bucket: " + log.read_text()[-3000:])


def test_pretrain_killed_resumes_from_the_bucket_on_a_clean_disk(s3_env, tmp_path, monkeypatch,
                                                                  bert_tokenizer_path):
    """Data, tokenizer and output in the bucket. SIGKILL after the first checkpoint is pushed; without
    --resume the bucket's checkpoints are refused; --resume on another "machine" (empty cache, no work
    folder) continues from the bucket and ends with the losses and weights of an uninterrupted run. A
    student distilled from the bucket's teacher into the bucket loads back with load_pretrained(s3://)."""
    from transformers import AutoModelForMaskedLM

    from distilflow.tasks.core.hf import load_pretrained
    from distilflow.tasks.core.stage import ResumeError
    from distilflow.tasks.train.loop import TrainConfig, train
    from tests.train.test_train import build_prepared

    fs = s3_env
    prepared = build_prepared(tmp_path / "prep", bert_tokenizer_path)
    data, url = _upload(fs, prepared, "prepared"), "s3://distilflow/runs/teacher"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "DISTILFLOW_PROGRESS": "0"}
    log = tmp_path / "machine-1.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(_train_args(data, url), stdout=fh, stderr=subprocess.STDOUT,
                                env={**env, "DISTILFLOW_CACHE": str(tmp_path / "machine-1")})
    try:
        first = _wait_for_checkpoint(fs, url, proc, log)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    fs.invalidate_cache()
    assert not fs.exists("distilflow/runs/teacher/summary.json"), "killed too late: the run had finished"
    assert first == "step-00000004"

    monkeypatch.setenv("DISTILFLOW_CACHE", str(tmp_path / "machine-2"))  # a clean disk from here on
    cfg = TrainConfig(mode="pretrain", data=data, output=url, model="tiny", batch_size=8, max_steps=40,
                      save_every=4, log_every=1, threads=1, warmup_steps=2, lr=3e-3)
    with pytest.raises(ResumeError, match=r"^s3://distilflow/runs/teacher already has checkpoints; pass --resume"):
        train(cfg)
    r = subprocess.run(_train_args(data, url, "--resume"), env={**env, "DISTILFLOW_CACHE": str(tmp_path / "m2")},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    fs.invalidate_cache()
    summary = json.loads(fs.cat_file("distilflow/runs/teacher/summary.json"))
    assert summary["steps"] == 40 and summary["resumed_from"] >= 4, summary

    full = tmp_path / "uninterrupted"
    train(cfg.replace(data=str(prepared), output=str(full)))
    got = _losses(fs.cat_file("distilflow/runs/teacher/metrics.jsonl").decode())
    want = _losses((full / "metrics.jsonl").read_text())
    assert len(want) == 40 and got == want  # every step's loss, bit-identical, the resumed part included
    bucket = remote.local_copy(url)  # verified against the manifest
    a, b = load_file(os.path.join(bucket, "model.safetensors")), load_file(str(full / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {"README.md", "curves.png", "config.json", "tokenizer.json", "train_config.json"} <= set(os.listdir(bucket))
    assert json.loads(Path(bucket, "train_config.json").read_text())["output"] == url  # the URL, not a local path
    assert sorted(os.listdir(os.path.join(bucket, "checkpoints"))) == ["step-00000036", "step-00000040"]

    student = "s3://distilflow/runs/student"
    train(TrainConfig(mode="distill", data=data, teacher=url, output=student, batch_size=8, max_steps=3,
                      log_every=1, threads=1, warmup_steps=1))
    monkeypatch.setenv("DISTILFLOW_CACHE", str(tmp_path / "machine-3"))
    model = load_pretrained(AutoModelForMaskedLM, student)
    assert model.config.model_type == "distilbert" and model.config.n_layers == 1
    fs.invalidate_cache()
    assert fs.exists("distilflow/runs/student/README.md") and fs.exists("distilflow/runs/student/summary.json")


def test_pretrain_into_a_missing_bucket_is_one_line(s3_env, tmp_path, bert_tokenizer_path, capsys,
                                                    prefect_test_harness_session):
    from distilflow.cli import main
    from tests.train.test_train import build_prepared

    prepared = build_prepared(tmp_path / "prep", bert_tokenizer_path, n_pairs=16)
    t0 = time.monotonic()
    assert main(["pretrain", "--data", str(prepared), "--output", MISSING, "--config", "tiny", "--max-steps", "2",
                 "--threads", "1"]) == 2
    assert time.monotonic() - t0 < 120
    assert _error_line(capsys.readouterr().err, "pretrain") == (
        f"distilflow pretrain: error: {MISSING}: the bucket does not exist; create it or fix the URL")
    with pytest.raises(InputError, match=f"^{MISSING}/teacher: no such file or folder"):
        from distilflow.tasks.train.objectives import load_teacher

        load_teacher(MISSING + "/teacher", torch.device("cpu"))
