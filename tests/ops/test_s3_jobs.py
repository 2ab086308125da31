"""Every job on object storage (issue 15 item 3), against moto's S3 server (tests/ops/test_s3.py): training
killed mid-run and resumed on a clean disk from the bucket, models read from s3:// folders, the pipeline
to its report in the bucket, and one error line for a bucket that does not exist, per code path."""

from __future__ import annotations

import json
import os
import re
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
from tests.evaluate import test_evaluate
from tests.ops import test_s3
from tests.ops.test_s3 import _error_line

s3_env = test_s3.s3_env  # the moto S3 server fixture (a fresh endpoint and bucket per test)
heldout_dir = test_evaluate.heldout_dir  # a tiny prepared held-out folder (module fixture)

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
    assert main(["pretrain", "--data", str(prepared), "--output", MISSING, "--config", "tiny", "--max-steps", "2",
                 "--threads", "1"]) == 2
    line = _error_line(capsys.readouterr().err, "pretrain")  # the URL, or a file under it, is named
    assert re.fullmatch(rf"distilflow pretrain: error: {MISSING}(/\S+)?: the bucket does not exist; create it or "
                        "fix the URL", line), line
    with pytest.raises(InputError, match=f"^{MISSING}/teacher: no such file or folder"):
        from distilflow.tasks.train.objectives import load_teacher

        load_teacher(MISSING + "/teacher", torch.device("cpu"))


def test_fill_mask_qa_embed_read_their_model_from_the_bucket(s3_env, tmp_path, monkeypatch, bert_tokenizer_path,
                                                             prefect_test_harness_session):
    """--model s3://... (a clean cache) and --output s3://...: the same rows as the local model and output;
    an output in a bucket that does not exist is one line naming it, before any model is loaded."""
    from distilflow.flows.inference import embed_flow, fill_mask_flow, qa_flow
    from distilflow.tasks.core.io import read_parquet
    from tests.infer.test_fill_mask import save_tiny_mlm
    from tests.infer.test_qa_embed import save_tiny_qa

    fs = s3_env
    mlm = save_tiny_mlm(tmp_path / "mlm", "distilbert", bert_tokenizer_path)
    qa = save_tiny_qa(tmp_path / "qa", "bert", bert_tokenizer_path)
    models = {"mlm": (mlm, remote.upload_folder(mlm, "s3://distilflow/models/mlm") and "s3://distilflow/models/mlm"),
              "qa": (qa, remote.upload_folder(qa, "s3://distilflow/models/qa") and "s3://distilflow/models/qa")}
    rows = [{"id": i, "text": f"the {w} of the [MASK] was very {w}.", "question": f"what was {w}?",
             "context": f"the house was {w} and the garden was green."} for i, w in enumerate(["old", "cold", "big"])]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("DISTILFLOW_CACHE", str(tmp_path / "clean-cache"))
    jobs = [(fill_mask_flow, "mlm", {"top_k": 2}), (embed_flow, "mlm", {}), (qa_flow, "qa", {})]
    for flow, kind, params in jobs:
        name = flow.name
        local_model, url_model = models[kind]
        want = flow(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out" / name), model=local_model,
                    keep_columns=["id"], **params)
        got = flow(input=str(tmp_path / "in.jsonl"), output=f"s3://distilflow/out/{name}", model=url_model,
                   keep_columns=["id"], **params)
        assert got["rows"] == want["rows"] > 0, (name, got, want)
        fs.invalidate_cache()
        [remote_file] = [p for p in fs.find(f"distilflow/out/{name}") if p.endswith(".parquet")]
        assert read_parquet("s3://" + remote_file).equals(read_parquet(str(tmp_path / "out" / name / "in.parquet")))
    assert (tmp_path / "clean-cache" / "remote").is_dir()  # the models came through the cache

    with pytest.raises(InputError, match=f"^{MISSING}.*: the bucket does not exist"):
        fill_mask_flow(input=str(tmp_path / "in.jsonl"), output=MISSING, model=mlm)


def test_evaluate_reads_and_writes_the_bucket(s3_env, tmp_path, monkeypatch, bert_tokenizer, heldout_dir,
                                              prefect_test_harness_session):
    """Model, teacher and held-out data in the bucket, --output s3://...: the same scores as the local run;
    fine-tuned models (the teacher's read back from the bucket for task distillation) are uploaded with
    their cards and load with load_pretrained(s3://); a rerun with an empty cache does no work twice."""
    from transformers import AutoModelForSequenceClassification

    from distilflow.flows.evaluate import evaluate_flow
    from distilflow.tasks.core.hf import load_pretrained
    from tests.evaluate.test_evaluate import GLUE, _save_tiny

    fs = s3_env
    student = _save_tiny(tmp_path / "student", bert_tokenizer, "distilbert")
    teacher = _save_tiny(tmp_path / "teacher", bert_tokenizer, "bert")
    held = heldout_dir
    urls = {k: _upload(fs, Path(p), k) for k, p in (("student", student), ("teacher", teacher), ("held", held))}
    common = dict(tasks=["mlm", "bias", "sst2"], glue_dir=str(GLUE), max_train_examples=24, max_eval_examples=16,
                  seeds=1, device="cpu", batch_size=8, epochs=1.0, max_seq_len=64, bias_top_k=3, task_distill=True)
    want = evaluate_flow(model=student, teacher=teacher, data=held, output=str(tmp_path / "eval"), **common)
    monkeypatch.setenv("DISTILFLOW_CACHE", str(tmp_path / "cache-1"))
    url = "s3://distilflow/eval"
    got = evaluate_flow(model=urls["student"], teacher=urls["teacher"], data=urls["held"], output=url, **common)
    assert set(got["results"]) == {"mlm", "bias", "sst2", "sst2-teacher", "sst2-distilled"}
    for name, r in want["results"].items():
        assert r.get("status") != "failed", (name, r.get("error"))
        assert got["results"][name]["metrics"] == r["metrics"], name  # storage does not change results
    fs.invalidate_cache()
    assert fs.exists("distilflow/eval/results.md") and fs.exists("distilflow/eval/results.json")
    run = got["results"]["sst2"]["runs"][0]
    assert run["model_dir"] == f"{url}/sst2/seed-42/model"
    assert fs.cat_file("distilflow/eval/sst2/seed-42/model/README.md").startswith(b"---\n")  # its model card
    assert got["results"]["sst2-distilled"]["runs"][0]["teacher"] == f"{url}/sst2-teacher/seed-42/model"
    monkeypatch.setenv("DISTILFLOW_CACHE", str(tmp_path / "cache-2"))
    clf = load_pretrained(AutoModelForSequenceClassification, run["model_dir"])
    assert clf.config.num_labels == 2
    again = evaluate_flow(model=urls["student"], teacher=urls["teacher"], data=urls["held"], output=url, **common)
    first, second = got["results"]["sst2"]["runs"][0], again["results"]["sst2"]["runs"][0]
    assert second.items() >= first.items()  # the seed's record read back (train_seconds too): not trained again


def test_pipeline_to_its_report_in_the_bucket(s3_env, tmp_path, monkeypatch, prefect_test_harness_session):
    """`distilflow pipeline --output s3://...` (the debug preset at its smallest): every stage writes its
    folder in the bucket (prepare streams, training pushes checkpoints, evaluate uploads), the report is in
    the bucket, the student loads back from it, and a rerun on a clean disk finds every stage done there."""
    from transformers import AutoModelForMaskedLM

    from distilflow.flows.pipeline import pipeline_flow
    from distilflow.tasks.core.hf import load_pretrained
    from distilflow.tasks.pipeline import config as pipeline_config

    fs = s3_env
    small = {"pretrain_steps": 30, "distill_steps": 20, "eval_sequences": 200, "fill_mask_rows": 40}
    monkeypatch.setitem(pipeline_config.PRESETS, "debug", {**pipeline_config.PRESETS["debug"], **small})
    monkeypatch.setenv("DISTILFLOW_CACHE", str(tmp_path / "machine-1"))
    url = "s3://distilflow/run"
    r = pipeline_flow(output=url)
    assert r["report"] == f"{url}/report.md"
    assert set(r["stages"]) == {"vocab", "prepare", "prepare-heldout", "pretrain", "distill", "evaluate", "fill-mask"}
    assert r["stages"]["distill"]["steps"] == 20 and r["stages"]["fill-mask"]["rows"] > 0
    fs.invalidate_cache()
    report = fs.cat_file("distilflow/run/report.md").decode()
    assert "Held-out masked LM" in report and "Batch fill-mask" in report and f"`{url}/student`" in report
    for key in ("tokenizer/tokenizer.json", "demo-corpus/heldout.txt", "data/pairs/.distilflow/manifest.json",
                "teacher/model.safetensors", "teacher/checkpoints/step-00000030/optimizer.pt", "student/README.md",
                "eval/results.md", "eval/bias/result.json", "fill-mask/queries.jsonl", "_pipeline/fill-mask.json"):
        assert fs.exists(f"distilflow/run/{key}"), key

    monkeypatch.setenv("DISTILFLOW_CACHE", str(tmp_path / "machine-2"))  # another machine: nothing local
    student = load_pretrained(AutoModelForMaskedLM, f"{url}/student")
    assert student.config.model_type == "distilbert"
    again = pipeline_flow(output=url)
    assert all(s["skipped"] for s in again["stages"].values()), {k: s["skipped"] for k, s in again["stages"].items()}


def test_a_missing_bucket_is_one_line_for_every_kind_of_job(s3_env, tmp_path, bert_tokenizer_path,
                                                            prefect_test_harness_session):
    from distilflow.flows.evaluate import evaluate_flow
    from distilflow.flows.pipeline import pipeline_flow
    from distilflow.flows.prepare import prepare_flow

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("One sentence here. And another one there.\n")
    one_line = rf"^{MISSING}(/\S+)?: the bucket does not exist; create it or fix the URL$"
    jobs = {"prepare": lambda: prepare_flow(inputs=[str(tmp_path / "in")], output=MISSING,
                                            tokenizer=str(bert_tokenizer_path), workers=1),
            "evaluate": lambda: evaluate_flow(model=str(tmp_path / "nope"), tasks=["bias"], output=MISSING),
            "pipeline": lambda: pipeline_flow(output=MISSING),
            "model": lambda: remote.local_copy(MISSING + "/student")}
    for name, job in jobs.items():
        with pytest.raises(InputError) as err:
            job()
        assert re.match(one_line, str(err.value)) or str(err.value).startswith(f"{MISSING}/student: no such"), \
            (name, str(err.value))


def test_a_denied_bucket_is_one_line_for_training_evaluation_and_models(tmp_path, monkeypatch, bert_tokenizer_path,
                                                                        prefect_test_harness_session):
    """moto with IAM enforced and unknown keys: every code path (a staged training output, evaluate's direct
    writes, a model read through the cache) fails with one line naming the URL, before any work."""
    import s3fs

    from distilflow.flows.evaluate import evaluate_flow
    from distilflow.tasks.train.loop import TrainConfig, train
    from tests.train.test_train import build_prepared

    prepared = build_prepared(tmp_path / "prep", bert_tokenizer_path, n_pairs=16)
    url = "s3://locked-bucket/run"
    for endpoint in test_s3._moto(tmp_path, auth=True):
        test_s3._use_endpoint(monkeypatch, endpoint, "not-a-known-key", "wrong")
        jobs = {"train": lambda: train(TrainConfig(data=str(prepared), output=url, model="tiny", max_steps=2)),
                "evaluate": lambda: evaluate_flow(model=str(tmp_path / "nope"), tasks=["bias"], output=url),
                "model": lambda: remote.local_copy(url + "/student")}
        for name, job in jobs.items():
            with pytest.raises(InputError) as err:
                job()
            msg = str(err.value)
            assert msg.startswith(url) and "\n" not in msg, (name, msg)
            assert "access denied" in msg or "permission denied" in msg, (name, msg)
        assert not (tmp_path / "prep" / "checkpoints").exists()
        s3fs.S3FileSystem.clear_instance_cache()


def test_pretrain_flow_launched_as_a_process_into_the_bucket(s3_env, tmp_path, monkeypatch, bert_tokenizer_path,
                                                            prefect_test_harness_session):
    """The flow's launcher path (what torchrun runs on a GPU host: a separate training process): its config
    file beside the local working folder, the summary, metrics and curves read back from the bucket."""
    from distilflow.flows.train import pretrain_flow
    from tests.train.test_train import build_prepared

    prepared = build_prepared(tmp_path / "prep", bert_tokenizer_path, n_pairs=16)
    monkeypatch.setenv("DISTILFLOW_CACHE", str(tmp_path / "cache"))
    url = "s3://distilflow/runs/launched"
    summary = pretrain_flow(data=str(prepared), output=url, model="tiny", batch_size=8, max_steps=3, log_every=1,
                            threads=1, launcher="subprocess")
    assert summary["steps"] == 3 and summary["fingerprint"]
    s3_env.invalidate_cache()
    assert json.loads(s3_env.cat_file("distilflow/runs/launched/summary.json")) == summary
    assert s3_env.exists("distilflow/runs/launched/model.safetensors")
    assert not s3_env.exists("distilflow/runs/launched/launch_config.json")  # a local file, not an output
