"""End to end on CPU: ``evaluate_flow`` with tiny saved models on small slices of the shared data.

Checks the mechanics, not the values (the models are tiny and random): every benchmark runs, the
table has our numbers beside the references, seeds give medians, fine-tuned models load back through
``from_pretrained`` / the text-classification pipeline, a rerun does no work twice, and a failing
benchmark does not lose the others.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from distilflow.tasks.core.io import write_parquet
from distilflow.tasks.evaluate.finetune import (
    FinetuneConfig,
    answer_questions,
    finetune_glue,
    median_over_seeds,
)
from distilflow.tasks.evaluate.glue import read_glue_file
from distilflow.tasks.evaluate.mlm import MLMEvalConfig, evaluate_mlm
from distilflow.tasks.prepare.masking import MaskConfig, Vocab, mask_flat
from tests.conftest import GUTENBERG, SHARED

GLUE = SHARED / "glue"
SQUAD_DEV = SHARED / "squad" / "dev-v1.1.json"
TASKS = ["mlm", "sst2", "mrpc", "cola", "stsb", "rte", "squad", "bias"]


def _save_tiny(path, tokenizer, kind: str) -> str:
    from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

    torch.manual_seed(0 if kind == "distilbert" else 1)
    if kind == "distilbert":
        model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=2, n_heads=2,
                                                       hidden_dim=64, max_position_embeddings=256))
    else:
        model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, intermediate_size=64, max_position_embeddings=256))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory, bert_tokenizer):
    root = tmp_path_factory.mktemp("models")
    return {"student": _save_tiny(root / "student", bert_tokenizer, "distilbert"),
            "teacher": _save_tiny(root / "teacher", bert_tokenizer, "bert")}


@pytest.fixture(scope="module")
def heldout_dir(tmp_path_factory, bert_tokenizer):
    """A prepared folder in the CONTRIBUTING.md contract: tokenizer/ and masked/part-*.parquet (tiny)."""
    root = tmp_path_factory.mktemp("heldout")
    bert_tokenizer.save_pretrained(root / "tokenizer")
    book = sorted(p for p in GUTENBERG.glob("pg*.txt"))[0]
    paras = [" ".join(p.split()) for p in book.read_text(encoding="utf-8").split("\n\n")]  # CRLF -> \n on read
    paras = [p for p in paras if 80 < len(p) < 400][:48]
    ids, tts = [], []
    for a, b in zip(paras[0::2], paras[1::2], strict=False):
        enc = bert_tokenizer(a, b, truncation=True, max_length=64)
        ids.append(enc["input_ids"])
        tts.append(enc["token_type_ids"])
    flat = np.concatenate([np.asarray(x, dtype=np.int32) for x in ids])
    offsets = np.concatenate(([0], np.cumsum([len(x) for x in ids])))
    masked, labels = mask_flat(flat, offsets, Vocab.from_tokenizer(bert_tokenizer), MaskConfig(),
                               np.random.default_rng(0))
    rows = {"input_ids": [masked[s:e].tolist() for s, e in zip(offsets[:-1], offsets[1:], strict=True)],
            "token_type_ids": tts,
            "next_sentence_label": [0] * len(ids),
            "doc_id": ["d0"] * len(ids),
            "labels": [labels[s:e].tolist() for s, e in zip(offsets[:-1], offsets[1:], strict=True)]}
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("token_type_ids", pa.list_(pa.int8())),
                        ("next_sentence_label", pa.int8()), ("doc_id", pa.string()),
                        ("labels", pa.list_(pa.int32()))])
    write_parquet(pa.table(rows, schema=schema), str(root / "masked" / "part-00000-0000.parquet"))
    return str(root)


def test_mlm_eval_counts_and_ranges(models, heldout_dir):
    r = evaluate_mlm(models["student"], heldout_dir, MLMEvalConfig(batch_size=8, device="cpu"))
    labels = pa.concat_tables([pa.parquet.read_table(os.path.join(heldout_dir, "masked", "part-00000-0000.parquet"))])
    n_pred = sum(sum(x != -100 for x in row) for row in labels.column("labels").to_pylist())
    assert r["rows"] == labels.num_rows and r["predicted_tokens"] == n_pred
    assert 0 <= r["top1"] <= r["top5"] <= 100
    # a random tiny model is about as good as uniform over 30k tokens: perplexity in the thousands
    assert r["perplexity"] == pytest.approx(np.exp(r["loss"]))
    assert 1000 < r["perplexity"] < 1e6
    r2 = evaluate_mlm(models["student"], heldout_dir, MLMEvalConfig(batch_size=3, max_examples=5, device="cpu"))
    assert r2["rows"] == 5


def test_weights_replaced_in_place_are_evaluated_again(models, heldout_dir, tmp_path, bert_tokenizer):
    """Completion markers record the model folder's identity: same weights -> skipped (a card edited beside
    them does not count), new weights in the same folder -> scored again."""
    import shutil

    from distilflow.tasks.evaluate.config import EvaluateConfig
    from distilflow.tasks.evaluate.suite import run_mlm_task

    model = tmp_path / "model"
    shutil.copytree(models["student"], model)
    cfg = EvaluateConfig(model=str(model), tasks=("mlm",), output=str(tmp_path / "eval"), data=heldout_dir,
                         device="cpu", batch_size=8)
    marker = tmp_path / "eval" / "mlm" / ".distilflow" / "done" / "student.json"
    first = run_mlm_task(cfg, cfg.output)
    written = marker.stat().st_mtime_ns
    (model / "README.md").write_text("# a card edited after training\n")
    assert run_mlm_task(cfg, cfg.output)["score"] == first["score"] and marker.stat().st_mtime_ns == written
    torch.manual_seed(7)
    from transformers import DistilBertForMaskedLM

    other = DistilBertForMaskedLM.from_pretrained(model, use_safetensors=True)
    for p in other.parameters():
        p.data.normal_(0, 0.5)
    other.save_pretrained(model)
    again = run_mlm_task(cfg, cfg.output)
    assert marker.stat().st_mtime_ns != written and again["models"]["student"]["loss"] != first["models"]["student"]["loss"]


def test_median_over_seeds():
    runs = [{"f1": 70.0, "accuracy": 60.0}, {"f1": 80.0, "accuracy": 50.0}, {"f1": 75.0, "accuracy": 90.0}]
    assert median_over_seeds(runs, ("f1", "accuracy")) == {"f1": 75.0, "accuracy": 60.0}


def test_classifier_loads_in_pipeline(models, tmp_path):
    from transformers import pipeline

    t = read_glue_file(str(GLUE / "sst2" / "stsa.binary.train"), "sst2").examples[:32]
    d = read_glue_file(str(GLUE / "sst2" / "stsa.binary.dev"), "sst2").examples[:16]
    r = finetune_glue(models["student"], "sst2", t, d, FinetuneConfig(batch_size=8, epochs=1.0, device="cpu"),
                      seed=0, out_dir=str(tmp_path / "run"))
    assert r["steps"] == 4 and r["n_eval"] == 16
    assert os.path.exists(os.path.join(r["model_dir"], "model.safetensors"))
    clf = pipeline("text-classification", model=r["model_dir"], device="cpu")
    out = clf(["a wonderful film", "dull and boring"])
    assert [o["label"] in ("negative", "positive") for o in out] == [True, True]


def test_cpu_bf16_finetuning_where_native_else_refused(models, monkeypatch):
    """--cpu-bf16: fine-tuning under CPU bf16 autocast where the CPU computes bf16 natively (close to float32,
    not identical); refused, naming the field, where torch would emulate it; left out of the saved config
    (and so of the fingerprints of runs made before it existed) while off."""
    from distilflow.tasks.core import hf
    from distilflow.tasks.core.errors import ConfigError

    assert "cpu_bf16" not in FinetuneConfig().to_dict()
    assert FinetuneConfig(cpu_bf16=True).to_dict()["cpu_bf16"] is True
    t = read_glue_file(str(GLUE / "sst2" / "stsa.binary.train"), "sst2").examples[:16]
    d = read_glue_file(str(GLUE / "sst2" / "stsa.binary.dev"), "sst2").examples[:8]
    bf16 = FinetuneConfig(batch_size=8, max_steps=2, device="cpu", cpu_bf16=True)
    monkeypatch.setattr(hf, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(ConfigError, match="FinetuneConfig.cpu_bf16: bf16 on this CPU would be emulated"):
        finetune_glue(models["student"], "sst2", t, d, bf16, seed=0)
    monkeypatch.undo()
    if not hf.cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16 (avx512_bf16 / amx_bf16)")
    seen: list[torch.dtype] = []
    real_linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear",
                        lambda x, *a, **k: (y := real_linear(x, *a, **k), seen.append(y.dtype))[0])
    r = finetune_glue(models["student"], "sst2", t, d, bf16, seed=0)
    monkeypatch.undo()
    assert torch.bfloat16 in seen  # the encoder's projections ran in bf16
    fp32 = finetune_glue(models["student"], "sst2", t, d, bf16.replace(cpu_bf16=False), seed=0)
    assert r["first_loss"] != fp32["first_loss"] and abs(r["first_loss"] - fp32["first_loss"]) < 0.05


@pytest.mark.usefixtures("prefect_test_harness_session")
def test_evaluate_flow_end_to_end(models, heldout_dir, tmp_path):
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    from distilflow.flows.evaluate import evaluate_flow

    torch.set_num_threads(1)
    out = str(tmp_path / "eval")
    kwargs = dict(model=models["student"], tasks=TASKS, output=out, teacher=models["teacher"], data=heldout_dir,
                  glue_dir=str(GLUE), squad_dev=str(SQUAD_DEV), max_train_examples=24, max_eval_examples=16, seeds=3,
                  device="cpu", batch_size=8, epochs=1.0, max_seq_len=64, squad_batch_size=8, squad_epochs=1.0,
                  squad_max_seq_len=128, doc_stride=32, bias_top_k=3)
    report = evaluate_flow(**kwargs)

    res = report["results"]
    assert set(res) == set(TASKS)
    assert all(r.get("status") != "failed" for r in res.values()), {k: r.get("error") for k, r in res.items()}
    # GLUE: official metrics per task, median over the 3 seeds, reference beside ours
    assert set(res["mrpc"]["metrics"]) == {"f1", "accuracy"}
    assert set(res["stsb"]["metrics"]) == {"pearson", "spearman"}
    assert set(res["cola"]["metrics"]) == {"matthews"}
    for name in ("sst2", "mrpc", "cola", "stsb", "rte", "squad"):
        r = res[name]
        assert [run["seed"] for run in r["runs"]] == [42, 43, 44]
        assert r["score"] == pytest.approx(float(np.median([run[r["metric"]] for run in r["runs"]])))
        assert r["n_train"] == 24 and r["n_eval"] == 16
        assert r["hyperparameters"]["batch_size"] == 8
    assert any("no train file" in n for n in res["rte"]["notes"])  # RTE has dev only here
    assert any("also in dev were removed" in n for n in res["mrpc"]["notes"])
    assert res["squad"]["files"]["train"] is None and 0 <= res["squad"]["metrics"]["f1"] <= 100
    # MLM: student and teacher side by side
    assert [row["model"] for row in res["mlm"]["table"]] == ["student", "teacher", "student / teacher"]
    assert res["bias"]["probes"]["teacher"]["config"]["top_k"] == 3

    table = {row["task"]: row for row in report["table"]}
    assert table["sst2"]["reference"] == 91.3 and table["squad"]["reference"] == 87.1
    assert table["mnli"]["ours"] == "not run" and table["mnli"]["reference"] == 82.2
    on_disk = json.loads(Path(out, "results.json").read_text())
    assert on_disk["seeds"] == [42, 43, 44] and on_disk["hyperparameters"]["squad"]["doc_stride"] == 32
    md = Path(out, "results.md").read_text()
    assert "| sst2 | accuracy |" in md and "91.3" in md and "## Bias probe" in md and "## Held-out masked LM" in md

    # fine-tuned models load back for inference
    sst_dir = res["sst2"]["runs"][0]["model_dir"]
    assert AutoModelForSequenceClassification.from_pretrained(sst_dir).config.id2label[1] == "positive"
    assert AutoModelForSequenceClassification.from_pretrained(res["stsb"]["runs"][0]["model_dir"]).config.num_labels == 1
    qa_dir = res["squad"]["runs"][0]["model_dir"]
    AutoModelForQuestionAnswering.from_pretrained(qa_dir)
    ans = answer_questions(qa_dir, [("Who won?", "The Denver Broncos won Super Bowl 50 in Santa Clara.")],
                           FinetuneConfig(max_seq_len=128, doc_stride=32, device="cpu"))
    assert isinstance(ans[0], str) and ans[0] in "The Denver Broncos won Super Bowl 50 in Santa Clara."
    preds = json.loads(Path(out, "squad", "seed-42", "predictions.json").read_text())
    assert len(preds) == 16

    # rerun: every (task, seed) is skipped -- no model file is rewritten -- and the numbers are identical
    weights = os.path.join(sst_dir, "model.safetensors")
    mtime = os.path.getmtime(weights)
    again = evaluate_flow(**kwargs)
    assert os.path.getmtime(weights) == mtime
    assert {k: v["score"] for k, v in again["results"].items()} == {k: v["score"] for k, v in res.items()}


@pytest.mark.usefixtures("prefect_test_harness_session")
def test_cli_failing_benchmark_keeps_the_others(models, tmp_path, capsys):
    from distilflow.cli import main

    glue = tmp_path / "glue"
    (glue / "rte").mkdir(parents=True)
    (glue / "rte" / "dev.tsv").write_text((GLUE / "rte" / "dev.tsv").read_text())
    out = tmp_path / "eval"
    rc = main(["evaluate", "--model", models["student"], "--tasks", "rte,qnli", "--glue-dir", str(glue),
               "--output", str(out), "--max-train-examples", "16", "--max-eval-examples", "16", "--epochs", "1",
               "--batch-size", "8", "--device", "cpu", "--threads", "1"])
    assert rc == 1  # qnli has no files -> FAILED, but rte is scored and the results are written
    report = json.loads((out / "results.json").read_text())
    assert report["results"]["qnli"]["status"] == "failed" and "qnli" in report["results"]["qnli"]["error"]
    assert "accuracy" in report["results"]["rte"]["metrics"]
    text = capsys.readouterr().out
    assert "rte: accuracy" in text and "results.md" in text


def test_cli_config_errors(models, tmp_path, capsys):
    from distilflow.cli import main

    rc = main(["evaluate", "--model", models["student"], "--tasks", "mlm", "--output", str(tmp_path / "o")])
    assert rc == 2 and "--data" in capsys.readouterr().err
    rc = main(["evaluate", "--model", models["student"], "--tasks", "nope", "--output", str(tmp_path / "o")])
    assert rc == 2 and "unknown task" in capsys.readouterr().err


@pytest.mark.gpu
def test_finetune_on_cuda_with_bf16(models, tmp_path):
    t = read_glue_file(str(GLUE / "sst2" / "stsa.binary.train"), "sst2").examples[:64]
    d = read_glue_file(str(GLUE / "sst2" / "stsa.binary.dev"), "sst2").examples[:64]
    r = finetune_glue(models["student"], "sst2", t, d, FinetuneConfig(batch_size=16, epochs=1.0, device="cuda"),
                      seed=0, out_dir=str(tmp_path / "run"))
    assert r["device"].startswith("cuda") and r["steps"] == 4 and np.isfinite(r["final_loss"])


@pytest.mark.gpu
def test_mlm_eval_cuda_matches_cpu(models, heldout_dir):
    cpu = evaluate_mlm(models["student"], heldout_dir, MLMEvalConfig(device="cpu"))
    gpu = evaluate_mlm(models["student"], heldout_dir, MLMEvalConfig(device="cuda", bf16=False))
    assert gpu["predicted_tokens"] == cpu["predicted_tokens"]
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=1e-3)
