"""The replication recipe on tiny sizes: the same code as ``--preset replicate`` writes both report files.

The fast test runs the recipe's evaluation (teacher, student, both from scratch, task distillation; SST-2 and
MRPC, 3 seeds) and its report stage on tiny saved models; the slow one runs ``scripts/replicate.py --tiny``
(the whole pipeline, preset replicate-tiny).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distilflow.tasks.evaluate.config import EvaluateConfig
from distilflow.tasks.evaluate.suite import assemble, run_benchmark
from distilflow.tasks.pipeline import plan
from distilflow.tasks.pipeline.config import PRESETS, PipelineConfig
from distilflow.tasks.pipeline.replicate import (
    HELD_OUT_BOOK,
    TARGETS,
    render_markdown,
    replicate_inputs,
    summarise,
    write_replication,
)
from tests.conftest import REPO, SHARED

KEYS = ("student_vs_teacher_sst2", "student_vs_teacher_mrpc", "speedup", "param_reduction",
        "teacher_vs_scratch_sst2", "student_vs_scratch_sst2")


def test_inputs_hold_out_one_book_and_train_on_the_rest():
    train, held = replicate_inputs(str(SHARED))
    assert [Path(h).name for h in held] == [HELD_OUT_BOOK]
    assert any(t.endswith("tinyshakespeare/input.txt") for t in train) and len(train) == 6
    assert not set(train) & set(held) and not any(t.endswith("SOURCE.txt") for t in train)


def test_summary_ratios_and_targets():
    def res(acc, f1):
        return {"metrics": {"accuracy": acc}, "runs": [{"accuracy": acc}]}, {"metrics": {"f1": f1}, "runs": [{"f1": f1}]}

    results = {}
    for suffix, (acc, f1) in {"": (80.0, 81.0), "-teacher": (82.0, 82.0), "-scratch": (77.0, 75.0),
                              "-teacher-scratch": (80.5, 76.0), "-distilled": (81.0, 80.0)}.items():
        results[f"sst2{suffix}"], results[f"mrpc{suffix}"] = res(acc, f1)
    results["mlm"] = {"models": {"teacher": {"top1": 30.0}, "student": {"top1": 25.0}}}
    s = summarise({"results": results}, {"teacher": 1000, "student": 650}, {"teacher": 100.0, "student": 190.0})
    assert s["student_vs_teacher_sst2"] == round(80 / 82, 4) and s["student_vs_teacher_mrpc"] == round(81 / 82, 4)
    assert s["speedup"] == 1.9 and s["param_reduction"] == 0.35
    assert s["teacher_vs_scratch_sst2"] == 1.5 and s["student_vs_scratch_sst2"] == 3.0  # points
    met = {t["key"]: t["met"] for t in s["targets"]}
    assert met == {"student_vs_teacher_sst2": True, "student_vs_teacher_mrpc": True, "speedup": True,
                   "param_reduction": True, "teacher_vs_scratch_sst2": False, "student_vs_scratch_sst2": True}
    assert s["models"]["teacher_scratch"]["heldout_mlm_top1"] is None and s["models"]["student"]["heldout_mlm_top1"] == 25
    md = render_markdown({"status": "run", "preset": "replicate", "command": "distilflow pipeline ...", **s})
    assert md.count("**met**") == 5 and md.count("**not met**") == 1
    # a benchmark that failed is not a number
    results["sst2-teacher"] = {"status": "failed", "error": "x"}
    s = summarise({"results": results}, {}, {})
    assert s["student_vs_teacher_sst2"] is None and s["targets"][0]["met"] is None


def test_preset_wires_the_recipe_into_the_pipeline_stages(tmp_path):
    cfg = PipelineConfig(output=str(tmp_path), preset="replicate", glue_dir=str(SHARED / "glue"))
    assert plan.eval_tasks(cfg) == ["mlm", "bias", "sst2", "mrpc"]
    ev = plan.eval_settings(cfg)
    assert ev["seeds"] == 3 and ev["task_distill"] and ev["scratch_baselines"] and ev["lr"] == 3e-4
    EvaluateConfig(model="m", output="o", tasks=tuple(plan.eval_tasks(cfg)), data="d", glue_dir="g", teacher="t", **ev)
    # the other presets' evaluate stage is what it was (their stage records, hence reruns, do not change)
    assert plan.eval_settings(PipelineConfig(output="o", glue_dir="g", glue_tasks=("sst2",))) == {}
    cmd = plan.command_line(cfg.replace(inputs=("a.txt", "b c.txt"), workers=2))
    assert cmd == (f"distilflow pipeline --output {tmp_path} --input a.txt 'b c.txt' --preset replicate "
                   f"--glue-dir {SHARED / 'glue'} --workers 2")
    assert PRESETS["replicate"]["teacher_config"] == "replicate"


def _save(path: Path, tokenizer, kind: str) -> str:
    from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

    torch.manual_seed(0)
    if kind == "student":
        model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=1, n_heads=2,
                                                       hidden_dim=64, max_position_embeddings=64))
    else:
        model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, intermediate_size=64, max_position_embeddings=64))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_tiny_replication_writes_both_files(bert_tokenizer, tmp_path):
    """The recipe's evaluation (every variant, 2 tasks, 3 seeds) and report stage on tiny models."""
    teacher, student = _save(tmp_path / "teacher", bert_tokenizer, "teacher"), _save(tmp_path / "student",
                                                                                     bert_tokenizer, "student")
    out, glue = tmp_path / "run", str(SHARED / "glue")
    tiny = PRESETS["replicate-tiny"]
    ev = plan.eval_settings(PipelineConfig(output=str(out), preset="replicate-tiny", glue_dir=glue))
    cfg = EvaluateConfig(model=student, teacher=teacher, tasks=("sst2", "mrpc"), output=str(out / "eval"),
                         glue_dir=glue, device="cpu", max_steps=2, **ev)
    results = {n: run_benchmark(n, cfg, cfg.output) for n in cfg.benchmarks()}
    (out / "eval").mkdir(parents=True, exist_ok=True)
    (out / "eval" / "results.json").write_text(json.dumps(assemble(cfg, results, {"device": "cpu"})))
    r = write_replication(str(out), str(out / "eval"), teacher, student, glue, preset="replicate-tiny",
                          speed_batch=tiny["speed_batch"], speed_rows=32, command="distilflow pipeline ...",
                          stage_seconds={"evaluate": 1.0})
    doc = json.loads((out / "replication.json").read_text())
    for key in KEYS:
        assert key in doc and doc[key] is not None and key in r
    assert set(doc["models"]) == {"teacher", "student", "teacher_scratch", "student_scratch", "student_task_distilled"}
    for m in doc["models"].values():
        assert {"params", "cpu_rows_per_s", "heldout_mlm_top1", "sst2_acc", "mrpc_f1"} <= set(m)
        assert len(m["sst2_acc_per_seed"]) == 3 and len(m["mrpc_f1_per_seed"]) == 3
    assert doc["models"]["student"]["params"] < doc["models"]["teacher"]["params"]
    assert doc["speedup"] == round(doc["models"]["student"]["cpu_rows_per_s"] / doc["models"]["teacher"]["cpu_rows_per_s"], 4)
    assert [t["key"] for t in doc["targets"]] == [t["key"] for t in TARGETS]
    md = (out / "replication.md").read_text()
    assert "| teacher (pretrained) |" in md and "## Targets" in md and "distilflow pipeline" in md


@pytest.mark.slow
def test_replicate_script_tiny_end_to_end(tmp_path):
    """``scripts/replicate.py --tiny``: the whole recipe through the pipeline (minutes on 2 cores)."""
    import runpy

    script = runpy.run_path(str(REPO / "scripts" / "replicate.py"))
    assert script["main"](["--output", str(tmp_path / "rep"), "--tiny", "--docs", str(tmp_path / "docs")]) == 0
    doc = json.loads((tmp_path / "docs" / "replication.json").read_text())
    assert doc["preset"] == "replicate-tiny" and all(doc[k] is not None for k in KEYS)
    assert doc["models"]["teacher"]["heldout_mlm_top1"] is not None
    assert (tmp_path / "docs" / "replication.md").exists()
