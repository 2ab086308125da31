"""Training loops end to end on a tiny prepared folder: pretrain, distil, resume, DDP, fill-mask.

The prepared folder is built here in the data-contract format (CONTRIBUTING.md) from a slice of a
real Gutenberg book and the real bert-base-uncased tokenizer; models are tiny configs trained for a
few dozen steps on CPU.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoTokenizer, pipeline

from distilflow.tasks.core.io import write_json, write_parquet
from distilflow.tasks.core.rng import derive_rng
from distilflow.tasks.core.stage import ResumeError, manifest_url, token_counts_url
from distilflow.tasks.prepare.masking import MaskConfig, Vocab, mask_flat
from distilflow.tasks.train.data import StepBatches, load_examples
from distilflow.tasks.train.loop import TrainConfig, train

PAIRS_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("token_type_ids", pa.list_(pa.int8())),
                          ("next_sentence_label", pa.int8()), ("doc_id", pa.string())])
MASKED_SCHEMA = PAIRS_SCHEMA.append(pa.field("labels", pa.list_(pa.int32())))


def build_prepared(root: Path, tokenizer_path: Path, book: str = "pg11.txt", n_pairs: int = 96,
                   start: int = 200, max_len: int = 48) -> Path:
    """A prepared folder: tokenizer/, pairs/ (+ token_counts), masked/, manifests."""
    tok = AutoTokenizer.from_pretrained(str(tokenizer_path))
    tok.save_pretrained(root / "tokenizer")
    gutenberg = Path(tokenizer_path).parents[1] / "corpus" / "gutenberg"  # the shared data folder
    text = (gutenberg / book).read_text(encoding="utf-8", errors="replace")
    sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if len(s.split()) >= 4]
    sents = sents[start: start + n_pairs + 1]
    enc = [tok(s, add_special_tokens=False)["input_ids"][: (max_len - 3) // 2] for s in sents]
    rng = np.random.default_rng(0)
    rows = {"input_ids": [], "token_type_ids": [], "next_sentence_label": [], "doc_id": []}
    for i in range(n_pairs):
        nsp = int(i % 2)
        b = enc[i + 1] if nsp == 0 else enc[int(rng.integers(len(enc)))]
        ids = [tok.cls_token_id, *enc[i], tok.sep_token_id, *b, tok.sep_token_id]
        rows["input_ids"].append(ids)
        rows["token_type_ids"].append([0] * (len(enc[i]) + 2) + [1] * (len(b) + 1))
        rows["next_sentence_label"].append(nsp)
        rows["doc_id"].append(book)
    pairs = pa.Table.from_pydict(rows, schema=PAIRS_SCHEMA)
    write_parquet(pairs, str(root / "pairs" / "part-00000-0000.parquet"))
    flat = np.concatenate([np.asarray(r, dtype=np.int32) for r in rows["input_ids"]])
    ids, counts = np.unique(flat, return_counts=True)
    write_parquet(pa.table({"token_id": pa.array(ids, pa.int32()), "count": pa.array(counts, pa.int64())}),
                  token_counts_url(str(root)))
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows["input_ids"]])])
    masked, labels = mask_flat(flat, offsets, Vocab.from_tokenizer(tok), MaskConfig(), derive_rng(0, "m"))
    split = lambda a: [a[offsets[i]: offsets[i + 1]].tolist() for i in range(n_pairs)]  # noqa: E731
    mtable = pa.Table.from_pydict({**rows, "input_ids": split(masked), "labels": split(labels)},
                                  schema=MASKED_SCHEMA)
    write_parquet(mtable, str(root / "masked" / "part-00000-0000.parquet"))
    for stage, n in (("pairs", n_pairs), ("masked", n_pairs)):
        write_json(manifest_url(str(root / stage)),
                   {"stage": stage, "files": [{"file": "part-00000-0000.parquet", "rows": n, "tokens": len(flat)}],
                    "rows": n, "tokens": int(len(flat)), "config": {}, "counts": {}, "skipped": {}})
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, bert_tokenizer_path) -> Path:
    return build_prepared(tmp_path_factory.mktemp("prep"), bert_tokenizer_path)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory, bert_tokenizer_path) -> Path:
    return build_prepared(tmp_path_factory.mktemp("held"), bert_tokenizer_path, start=600, n_pairs=32)


def _cfg(**kw) -> TrainConfig:
    base = {"batch_size": 8, "log_every": 1, "threads": 1, "warmup_steps": 2, "seed": 0}
    return TrainConfig(**{**base, **kw})


def _losses(out: Path, key: str = "loss") -> list[float]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in recs if key in r]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, prepared, heldout) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    train(_cfg(mode="pretrain", data=str(prepared), output=str(out), model="tiny", lr=3e-3, max_steps=40,
               eval_data=str(heldout)))
    return out


def test_pretrain_loss_decreases_and_model_loads(teacher):
    mlm = _losses(teacher, "loss_mlm")
    assert len(mlm) == 40
    assert np.mean(mlm[-5:]) < np.mean(mlm[:5]) - 1.0, mlm  # memorising 96 pairs: a clear drop
    summary = json.loads((teacher / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["eval"]["masked_tokens"] > 50
    cfg = json.loads((teacher / "train_config.json").read_text())
    assert TrainConfig.from_dict(cfg).model == "tiny"
    assert (teacher / "checkpoints" / "step-00000040" / "model.safetensors").exists()
    fill = pipeline("fill-mask", model=str(teacher))  # no project code involved
    assert len(fill("the queen said [MASK] to alice.")) == 5
    card = ModelCard.load(teacher / "README.md")  # the model card: Hub metadata and held-out result
    assert card.data.eval_results[0].metric_value == round(summary["eval"]["accuracy"], 4)
    assert card.data.base_model is None and "pretraining" in card.data.tags
    assert '"model": "tiny"' in card.text  # the config of record
    assert "![training curves](curves.png)" in card.text
    assert (teacher / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_distill_loss_decreases_and_student_loads(tmp_path, prepared, heldout, teacher):
    out = tmp_path / "student"
    summary = train(_cfg(mode="distill", data=str(prepared), output=str(out), teacher=str(teacher),
                         lr=2e-3, max_steps=36, eval_data=str(heldout), mask_source="static"))
    total = _losses(out)
    assert np.mean(total[-5:]) < np.mean(total[:5]), total
    for k in ("loss_ce", "loss_mlm", "loss_cos", "lr", "tokens_per_s"):
        assert k in json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert summary["teacher_eval"]["masked_tokens"] == summary["eval"]["masked_tokens"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "distilbert" and cfg["n_layers"] == 1  # every other layer of a 2-layer teacher
    fill = pipeline("fill-mask", model=str(out))
    preds = fill("it was the best of [MASK].")
    assert len(preds) == 5 and all(p["token_str"] for p in preds)
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == str(teacher) and "distillation" in card.data.tags
    assert card.data.eval_results[0].metric_value == round(summary["eval"]["accuracy"], 4)
    assert "| teacher |" in card.text  # the student beside its teacher


def test_student_starts_from_teacher_layers(tmp_path, prepared, teacher):
    out = tmp_path / "s"
    train(_cfg(mode="distill", data=str(prepared), output=str(out), teacher=str(teacher), max_steps=1,
               student_layers=(1,), lr=1e-12, warmup_steps=0))
    s = load_file(str(out / "model.safetensors"))
    t = load_file(str(teacher / "model.safetensors"))
    torch.testing.assert_close(s["distilbert.transformer.layer.0.ffn.lin1.weight"],
                               t["bert.encoder.layer.1.intermediate.dense.weight"], atol=1e-6, rtol=0)


def test_resume_reproduces_uninterrupted_run(tmp_path, prepared, teacher):
    common = {"mode": "distill", "data": str(prepared), "teacher": str(teacher), "max_steps": 12,
              "save_every": 4, "lr": 1e-3, "mask_source": "dynamic", "mlm_smoothing": 0.7}
    full = tmp_path / "full"
    train(_cfg(output=str(full), **common))
    part = tmp_path / "part"
    train(_cfg(output=str(part), **common), stop_after=6)  # "killed" after step 6 (checkpoint at 4)
    assert [p.name for p in sorted((part / "checkpoints").iterdir())] == ["step-00000004"]
    with pytest.raises(ResumeError, match="--resume"):
        train(_cfg(output=str(part), **common))
    train(_cfg(output=str(part), resume=True, **common))
    assert _losses(part) == _losses(full)  # bit-identical, dropout and dynamic masks included
    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ResumeError, match="another config"):
        train(_cfg(output=str(part), resume=True, **{**common, "lr": 2e-3, "max_steps": 14}))


def test_static_masks_and_position_is_function_of_step(prepared, bert_tokenizer):
    ex = load_examples(str(prepared), "masked")
    assert ex.labels is not None and len(ex) == 96
    from distilflow.tasks.train.data import Collator

    col = Collator(ex, bert_tokenizer.pad_token_id, None, None)
    sb = StepBatches(ex, col, batch_size=8, seed=1, world=1, rank=0, accum=2)
    assert sb.steps_per_epoch == 6
    a = sb(7)  # epoch 1
    sb2 = StepBatches(ex, col, batch_size=8, seed=1, world=1, rank=0, accum=2)
    b = sb2(7)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
    # two ranks with accum 1 read exactly the micro-batches of one rank with accum 2
    r0 = StepBatches(ex, col, 8, 1, world=2, rank=0, accum=1)(7)[0]
    r1 = StepBatches(ex, col, 8, 1, world=2, rank=1, accum=1)(7)[0]
    assert torch.equal(r0["input_ids"], a[0]["input_ids"]) and torch.equal(r1["input_ids"], a[1]["input_ids"])
    # each batch: padded to a multiple of 8, labels only where tokens are real
    for x in a:
        assert x["input_ids"].shape[1] % 8 == 0
        assert ((x["labels"] != -100) <= x["attention_mask"].bool()).all()


@pytest.mark.integration  # a torchrun process fleet / a real Prefect server
def test_ddp_two_processes_match_one_process_with_accumulation(tmp_path, prepared):
    """torchrun, 2 CPU processes (gloo), batch 4 each == 1 process, batch 4, 2 accumulation steps."""
    common = ["pretrain", "--data", str(prepared), "--config", "tiny", "--batch-size", "4", "--max-steps", "4",
              "--dropout", "0", "--lr", "1e-3", "--log-every", "1", "--threads", "1", "--warmup-steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    ddp_out, one_out = tmp_path / "ddp", tmp_path / "one"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "distilflow.tasks.train", *common, "--output", str(ddp_out)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    train(_cfg(mode="pretrain", data=str(prepared), output=str(one_out), model="tiny", batch_size=4,
               grad_accum=2, max_steps=4, dropout=0.0, lr=1e-3, warmup_steps=1))
    assert json.loads((ddp_out / "summary.json").read_text())["world_size"] == 2
    np.testing.assert_allclose(_losses(ddp_out), _losses(one_out), rtol=1e-4)
    a, b = load_file(str(ddp_out / "model.safetensors")), load_file(str(one_out / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)
    assert _losses(one_out)[-1] < _losses(one_out)[0]  # it trained: the comparison is not vacuous


def test_config_errors_name_the_field(tmp_path):
    from distilflow.tasks.core.config import ConfigError

    with pytest.raises(ConfigError, match="teacher"):
        TrainConfig(mode="distill", data="x", output=str(tmp_path))
    with pytest.raises(ConfigError, match="model"):
        TrainConfig(mode="pretrain", data="x", output=str(tmp_path), model="gigantic")
    assert TrainConfig(data="x", output="s3://bucket/out").output == "s3://bucket/out"  # buckets: staged


@pytest.mark.integration  # a torchrun process fleet / a real Prefect server
def test_cli_flows_inprocess_and_torchrun(tmp_path, prepared, teacher, prefect_test_harness_session):
    """`distilflow pretrain` (in-process) and `distilflow distill` (torchrun subprocess, logs streamed),
    each publishing the loss-curve artifact."""
    from prefect.client.orchestration import get_client

    from distilflow.cli import main

    common = ["--data", str(prepared), "--batch-size", "8", "--max-steps", "3", "--log-every", "1",
              "--threads", "1"]
    assert main(["pretrain", *common, "--output", str(tmp_path / "t"), "--config", "tiny"]) == 0
    assert (tmp_path / "t" / "model.safetensors").exists()
    assert main(["distill", *common, "--output", str(tmp_path / "s"), "--teacher", str(teacher),
                 "--launcher", "torchrun", "--nproc-per-node", "1"]) == 0
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["mode"] == "distill"
    saved = TrainConfig.from_dict(json.loads((tmp_path / "s" / "train_config.json").read_text()))
    assert saved.lr == 5e-4 and saved.mlm_smoothing == 0.7  # DistilBERT defaults on the CLI
    with get_client(sync_client=True) as client:
        arts = {a.key: a for a in client.read_artifacts()}
    assert {"pretrain-loss-curves", "distill-loss-curves"} <= set(arts)
    assert "](data:image/png;base64," in arts["distill-loss-curves"].data  # the curves, shown in the UI
    # bad input: one clear line, exit code 2
    assert main(["distill", *common, "--output", str(tmp_path / "x"), "--teacher", str(tmp_path / "nope")]) == 2


def test_launch_command_and_curve_table():
    from distilflow.tasks.train.launch import launch_command
    from distilflow.tasks.train.report import loss_curve_markdown

    cmd = launch_command("/o/launch_config.json", 4)
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4"]
    assert cmd[-3:] == ["distilflow.tasks.train", "run", "/o/launch_config.json"]
    assert launch_command("c.json", 1, torchrun=False)[1:] == ["-m", "distilflow.tasks.train", "run", "c.json"]
    recs = [{"step": i, "loss": 10.0 - i / 10, "loss_ce": 1.0, "loss_mlm": 2.0, "loss_cos": 0.1, "lr": 1e-4,
             "tokens_per_s": 100.0} for i in range(1, 101)]
    md = loss_curve_markdown(TrainConfig(mode="distill", data="d", output="/tmp/o", teacher="t"), recs, {})
    lines = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| step")]
    assert len(lines) == 20 and lines[0].startswith("| 1 |") and lines[-1].startswith("| 100 |")


@pytest.mark.gpu
def test_gpu_bf16_distill_smoke(tmp_path, prepared, teacher):
    """On a CUDA host: bf16 autocast, fused AdamW, MFU reported; the saved student still loads."""
    out = tmp_path / "gpu"
    train(_cfg(mode="distill", data=str(prepared), output=str(out), teacher=str(teacher), max_steps=4))
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert np.isfinite(rec["loss"]) and ("mfu" in rec or "H100" not in torch.cuda.get_device_name())
    assert len(pipeline("fill-mask", model=str(out), device=0)("the [MASK] of it.")) == 5


def test_cpu_bf16_distill_where_native_else_refused(tmp_path, prepared, teacher, monkeypatch):
    """--precision bf16 on a CPU: autocast (the encoders' and the fused head's matrix products in bf16) where
    the CPU computes bf16 natively; refused, naming the field, where torch would emulate it."""
    from distilflow.tasks.core import hf
    from distilflow.tasks.core.errors import ConfigError

    cfg = _cfg(mode="distill", data=str(prepared), output=str(tmp_path / "bf16"), teacher=str(teacher),
               max_steps=3, precision="bf16")
    if torch.cuda.is_available():
        pytest.skip("a CUDA host trains on the GPU")
    monkeypatch.setattr(hf, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(ConfigError, match="TrainConfig.precision: bf16 on this CPU would be emulated"):
        train(cfg)
    monkeypatch.undo()
    if not hf.cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16 (avx512_bf16 / amx_bf16)")
    seen: list[torch.dtype] = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: seen.append(a[0].dtype) or real_mm(*a, **k))
    train(cfg)
    assert torch.bfloat16 in seen  # the fused head's chunks ran their matrix products in bf16
    losses = _losses(tmp_path / "bf16")
    assert len(losses) == 3 and all(np.isfinite(losses))
    train(_cfg(mode="distill", data=str(prepared), output=str(tmp_path / "fp32"), teacher=str(teacher), max_steps=3))
    fp32 = _losses(tmp_path / "fp32")
    assert losses != fp32 and abs(losses[0] - fp32[0]) < 0.05 * abs(fp32[0])  # close, not identical


def test_data_errors_are_clear(tmp_path, prepared):
    import shutil

    from distilflow.tasks.train.data import DataError

    bad = tmp_path / "bad"
    shutil.copytree(prepared, bad)
    Path(manifest_url(str(bad / "pairs"))).unlink()
    with pytest.raises(DataError, match="distilflow prepare"):
        load_examples(str(bad), "pairs")
    # a malformed row (token_type_ids shorter than input_ids) is dropped and counted, the rest kept
    t = pa.Table.from_pydict({"input_ids": [[101, 7, 8, 102], [101, 9, 102]], "token_type_ids": [[0, 0, 0, 0], [0]],
                              "next_sentence_label": [0, 1], "doc_id": ["a", "b"]}, schema=PAIRS_SCHEMA)
    write_parquet(t, str(bad / "pairs" / "part-00009-0000.parquet"))
    write_json(manifest_url(str(bad / "pairs")), {"files": [], "rows": 0})
    with pytest.warns(UserWarning, match="part-00009-0000.parquet: skipped 1 malformed row"):
        ex = load_examples(str(bad), "pairs")
    assert ex.skipped == 1 and len(ex) == 97
    assert ex.ids[ex.offsets[-2]: ex.offsets[-1]].tolist() == [101, 7, 8, 102]
