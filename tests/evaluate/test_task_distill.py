"""Task distillation (a fine-tuned teacher's soft targets + the task loss) and from-scratch baselines.

The loss is checked against numbers worked out by hand; the runs use tiny models saved and loaded through
the real ``from_pretrained`` path on slices of the shared GLUE / SQuAD files.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from distilflow.tasks.core.errors import InputError
from distilflow.tasks.core.stage import config_url
from distilflow.tasks.evaluate.config import EvaluateConfig, FinetuneConfig, TaskDistillConfig
from distilflow.tasks.evaluate.finetune import finetune_glue
from distilflow.tasks.evaluate.glue import read_glue_file
from distilflow.tasks.evaluate.suite import assemble, find_task_teachers, run_benchmark
from distilflow.tasks.evaluate.task_distill import soft_target_loss, task_distill_loss
from tests.conftest import SHARED

GLUE = SHARED / "glue"
SQUAD_DEV = SHARED / "squad" / "dev-v1.1.json"

# p_teacher = softmax([ln 3, 0]) = (3/4, 1/4) against a uniform student (1/2, 1/2):
# KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.1308120...
KL_BY_HAND = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)


def test_soft_target_loss_matches_a_hand_computed_kl():
    student = torch.tensor([[0.0, 0.0]])
    assert soft_target_loss(student, torch.tensor([[math.log(3.0), 0.0]]), 1.0).item() == pytest.approx(
        0.1308120, abs=1e-6)
    # at T = 2 the teacher logits [ln 9, 0] soften to the same (3/4, 1/4); the term is scaled by T^2 = 4
    assert soft_target_loss(student, torch.tensor([[math.log(9.0), 0.0]]), 2.0).item() == pytest.approx(
        4 * KL_BY_HAND, abs=1e-6)
    # batchmean: the mean over rows; a row where student == teacher adds 0
    two = soft_target_loss(torch.tensor([[0.0, 0.0], [1.0, 2.0]]), torch.tensor([[math.log(3.0), 0.0], [1.0, 2.0]]),
                           1.0)
    assert two.item() == pytest.approx(KL_BY_HAND / 2, abs=1e-6)


def test_task_distill_loss_weights_and_variants():
    s, t, task = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(9.0), 0.0]]), torch.tensor(1.0)
    # alpha * 4 KL + (1 - alpha) * task
    assert task_distill_loss(task, s, t, 2.0, 0.5).item() == pytest.approx(0.5 * 4 * KL_BY_HAND + 0.5, abs=1e-6)
    assert task_distill_loss(task, s, t, 2.0, 0.0).item() == pytest.approx(1.0)
    assert task_distill_loss(task, s, t, 2.0, 1.0).item() == pytest.approx(4 * KL_BY_HAND, abs=1e-6)
    # QA: start and end terms averaged (here: the same term twice -> the same value)
    assert task_distill_loss(task, (s, s), (t, t), 2.0, 1.0).item() == pytest.approx(4 * KL_BY_HAND, abs=1e-6)
    # regression (STS-B): squared error to the teacher's prediction, (3 - 1)^2 = 4
    r = task_distill_loss(torch.tensor(0.0), torch.tensor([[1.0]]), torch.tensor([[3.0]]), 2.0, 1.0, regression=True)
    assert r.item() == pytest.approx(4.0)
    # the gradient reaches the student's logits: d/ds of KL(p_t || softmax(s)) at s = 0 is p_s - p_t = (-1/4, 1/4)
    s = torch.zeros(1, 2, requires_grad=True)
    soft_target_loss(s, torch.tensor([[math.log(3.0), 0.0]]), 1.0).backward()
    assert s.grad is not None and torch.allclose(s.grad, torch.tensor([[-0.25, 0.25]]), atol=1e-6)


def _save(path: Path, tokenizer, kind: str, seed: int) -> str:
    from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

    torch.manual_seed(seed)
    if kind == "distilbert":
        model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=1, n_heads=2,
                                                       hidden_dim=64, max_position_embeddings=256))
    else:
        model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, intermediate_size=64, max_position_embeddings=256))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, bert_tokenizer):
    root = tmp_path_factory.mktemp("kd")
    return {"student": _save(root / "student", bert_tokenizer, "distilbert", 0),
            "teacher": _save(root / "teacher", bert_tokenizer, "bert", 1)}


@pytest.fixture(scope="module")
def sst2():
    train = read_glue_file(str(GLUE / "sst2" / "stsa.binary.train"), "sst2").examples[:48]
    dev = read_glue_file(str(GLUE / "sst2" / "stsa.binary.dev"), "sst2").examples[:16]
    return train, dev


def test_alpha_zero_is_plain_fine_tuning_and_alpha_half_is_not(tiny, sst2, tmp_path):
    """With alpha = 0 the soft targets weigh nothing: the run is bit-identical to plain fine-tuning (the
    teacher's pass draws no random numbers from the student's stream)."""
    train, dev = sst2
    ft = FinetuneConfig(batch_size=8, epochs=1.0, max_seq_len=32, device="cpu")
    plain = finetune_glue(tiny["student"], "sst2", train, dev, ft, seed=3, out_dir=str(tmp_path / "teacher-ft"))
    teacher_ft = finetune_glue(tiny["teacher"], "sst2", train, dev, ft, seed=3, out_dir=str(tmp_path / "t"))
    zero = finetune_glue(tiny["student"], "sst2", train, dev, ft, seed=3, teacher=teacher_ft["model_dir"],
                         kd=TaskDistillConfig(alpha=0.0))
    assert (zero["first_loss"], zero["final_loss"], zero["accuracy"]) == (
        plain["first_loss"], plain["final_loss"], plain["accuracy"])
    half = finetune_glue(tiny["student"], "sst2", train, dev, ft, seed=3, teacher=teacher_ft["model_dir"],
                         kd=TaskDistillConfig(alpha=0.5, temperature=2.0))
    assert half["first_loss"] != plain["first_loss"] and math.isfinite(half["final_loss"])


def test_teacher_with_another_vocabulary_is_refused(tiny, sst2, tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    other = tmp_path / "other"
    tok = AutoTokenizer.from_pretrained(tiny["student"])
    tok.add_tokens(["zzzunseen"])
    BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64)).save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(InputError, match="vocabulary differs"):
        finetune_glue(tiny["student"], "sst2", *sst2, FinetuneConfig(batch_size=8, max_steps=1, device="cpu"),
                      seed=0, teacher=str(other))


def _check_distilled(results: dict, task: str, out: str, seeds: list[int]) -> None:
    teacher_runs = {r["seed"]: r["model_dir"] for r in results[f"{task}-teacher"]["runs"]}
    distilled = results[f"{task}-distilled"]
    assert [r["seed"] for r in distilled["runs"]] == seeds
    saved = json.loads(Path(config_url(os.path.join(out, f"{task}-distilled"))).read_text())
    assert {int(k): v for k, v in saved["config"]["teachers"].items()} == teacher_runs  # seed N <- teacher N
    assert saved["config"]["kd"] == {"temperature": 2.0, "alpha": 0.5}
    assert all(os.path.exists(os.path.join(r["model_dir"], "model.safetensors")) for r in distilled["runs"])
    assert any("task distillation" in n for n in distilled["notes"])


def test_distilled_and_scratch_rows_beside_plain_fine_tuning(tiny, tmp_path):
    """sst2 with --task-distill --scratch-baselines: the teacher is fine-tuned first (per seed), the student
    trains on its soft targets, the random-init baselines train with the same recipe; the table lists them
    under the task; a rerun does nothing twice."""
    out = str(tmp_path / "eval")
    cfg = EvaluateConfig(model=tiny["student"], teacher=tiny["teacher"], tasks=("sst2",), output=out,
                         glue_dir=str(GLUE), max_train_examples=24, max_eval_examples=8, seeds=2, batch_size=8,
                         epochs=1.0, max_seq_len=32, device="cpu", task_distill=True, scratch_baselines=True)
    names = cfg.benchmarks()
    assert names == ["sst2", "sst2-teacher", "sst2-distilled", "sst2-scratch", "sst2-teacher-scratch"]
    results = {n: run_benchmark(n, cfg, out) for n in names}
    report = assemble(cfg, results, {"device": "cpu"})
    assert [r["task"] for r in report["table"]][:len(names)] == names
    table = {r["task"]: r for r in report["table"]}
    assert table["sst2-distilled"]["reference"] == table["sst2"]["reference"] == 91.3
    assert table["sst2-teacher"]["reference"] == "" and table["sst2-scratch"]["reference"] == ""
    _check_distilled(results, "sst2", out, [42, 43])
    assert results["sst2-teacher"]["model"] == tiny["teacher"]
    assert results["sst2-teacher-scratch"]["model"] == tiny["teacher"]
    assert any("random init" in n for n in results["sst2-scratch"]["notes"])
    # the from-scratch runs start elsewhere than the pretrained ones (same seed, same data order)
    assert results["sst2-scratch"]["runs"][0]["first_loss"] != results["sst2"]["runs"][0]["first_loss"]

    # rerun: every (variant, seed) is skipped -- the teachers are not fine-tuned again
    weights = os.path.join(results["sst2-teacher"]["runs"][0]["model_dir"], "model.safetensors")
    mtime = os.path.getmtime(weights)
    again = run_benchmark("sst2-distilled", cfg, out)
    assert os.path.getmtime(weights) == mtime and again["score"] == results["sst2-distilled"]["score"]

    # --task-teacher: an evaluate output of the teacher is used as it is (seed N -> its seed N, else its first)
    assert find_task_teachers(out, "sst2", [42, 43, 44]) == {42: results["sst2"]["runs"][0]["model_dir"],
                                                            43: results["sst2"]["runs"][1]["model_dir"],
                                                            44: results["sst2"]["runs"][0]["model_dir"]}
    with pytest.raises(InputError, match="--task-teacher"):
        find_task_teachers(str(tmp_path), "sst2", [42])


def test_squad_task_distillation(tiny, tmp_path):
    """The SQuAD card's second step: start/end soft targets of the SQuAD-fine-tuned teacher."""
    out = str(tmp_path / "eval")
    cfg = EvaluateConfig(model=tiny["student"], teacher=tiny["teacher"], tasks=("squad",), output=out,
                         squad_dev=str(SQUAD_DEV), max_train_examples=16, max_eval_examples=8, squad_batch_size=8,
                         squad_max_seq_len=96, doc_stride=32, squad_epochs=1.0, device="cpu", task_distill=True)
    results = {n: run_benchmark(n, cfg, out) for n in cfg.benchmarks()}
    assert list(results) == ["squad", "squad-teacher", "squad-distilled"]
    _check_distilled(results, "squad", out, [42])
    assert 0 <= results["squad-distilled"]["metrics"]["f1"] <= 100
    assert results["squad-distilled"]["runs"][0]["first_loss"] != results["squad"]["runs"][0]["first_loss"]


@pytest.mark.usefixtures("prefect_test_harness_session")
def test_cli_task_distill_through_the_flow(tiny, tmp_path, capsys):
    from distilflow.cli import main

    out = tmp_path / "eval"
    rc = main(["evaluate", "--model", tiny["student"], "--teacher", tiny["teacher"], "--tasks", "mrpc",
               "--glue-dir", str(GLUE), "--output", str(out), "--max-train-examples", "16", "--max-eval-examples", "8",
               "--max-steps", "2", "--batch-size", "8", "--max-seq-len", "32", "--device", "cpu", "--task-distill",
               "--kd-temperature", "3", "--kd-alpha", "0.7"])
    assert rc == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["results"]) == {"mrpc", "mrpc-teacher", "mrpc-distilled"}
    assert [r["task"] for r in report["table"]][:3] == ["mrpc", "mrpc-teacher", "mrpc-distilled"]
    assert json.loads(Path(config_url(str(out / "mrpc-distilled"))).read_text())["config"]["kd"] == {
        "temperature": 3.0, "alpha": 0.7}
    md = (out / "results.md").read_text()
    assert "| mrpc-distilled | f1 |" in md and "| mrpc-teacher | f1 |" in md
    assert "mrpc-distilled: f1" in capsys.readouterr().out
