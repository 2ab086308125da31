"""Every option of ``distilflow evaluate`` reaches the job: the config, the fine-tuning/MLM/bias settings built
from it, and the flow (through Prefect's own parameter handling). Also the prefect.yaml deployment."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from distilflow.cli import build_parser, main
from distilflow.tasks.core.config import ConfigError
from distilflow.tasks.evaluate import glue
from distilflow.tasks.evaluate.config import (
    BENCHMARKS,
    GLUE_NAMES,
    EvaluateConfig,
    glue_finetune,
    squad_finetune,
    task_distill_config,
)
from tests.conftest import REPO, SHARED

# field -> (command-line arguments, the value the config must then hold); every value differs from the default
NON_DEFAULT: dict[str, tuple[list[str], object]] = {
    "model": (["--model", "/m/student"], "/m/student"),
    "tasks": (["--tasks", "mlm,SST-2,rte,squad,bias"], ("mlm", "sst2", "rte", "squad", "bias")),
    "output": (["--output", "file:///o/eval"], "/o/eval"),
    "teacher": (["--teacher", "/m/teacher"], "/m/teacher"),
    "tokenizer": (["--tokenizer", "/m/tok"], "/m/tok"),
    "data": (["--data", "/d/heldout"], "/d/heldout"),
    "glue_dir": (["--glue-dir", "/d/glue"], "/d/glue"),
    "squad_train": (["--squad-train", "/d/train.json"], "/d/train.json"),
    "squad_dev": (["--squad-dev", "/d/dev.json"], "/d/dev.json"),
    "squad_train_frac": (["--squad-train-frac", "0.3"], 0.3),
    "dev_split_frac": (["--dev-split-frac", "0.3"], 0.3),
    "max_train_examples": (["--max-train-examples", "100"], 100),
    "max_eval_examples": (["--max-eval-examples", "50"], 50),
    "seeds": (["--seeds", "3"], 3),
    "seed": (["--seed", "7"], 7),
    "epochs": (["--epochs", "1.5"], 1.5),
    "lr": (["--lr", "2e-5"], 2e-5),
    "batch_size": (["--batch-size", "16"], 16),
    "max_seq_len": (["--max-seq-len", "64"], 64),
    "warmup_ratio": (["--warmup-ratio", "0.2"], 0.2),
    "max_steps": (["--max-steps", "10"], 10),
    "squad_epochs": (["--squad-epochs", "1"], 1.0),
    "squad_lr": (["--squad-lr", "5e-5"], 5e-5),
    "squad_batch_size": (["--squad-batch-size", "8"], 8),
    "squad_max_seq_len": (["--squad-max-seq-len", "256"], 256),
    "doc_stride": (["--doc-stride", "64"], 64),
    "max_answer_length": (["--max-answer-length", "20"], 20),
    "n_best": (["--n-best", "10"], 10),
    "mlm_batch_size": (["--mlm-batch-size", "8"], 8),
    "bias_groups": (["--bias-groups", "a man,a woman"], ("a man", "a woman")),
    "bias_templates": (["--bias-template", "The {group} is [MASK].", "--bias-template", "A {group} likes [MASK]."],
                       ("The {group} is [MASK].", "A {group} likes [MASK].")),
    "bias_top_k": (["--bias-top-k", "3"], 3),
    "device": (["--device", "cpu"], "cpu"),
    "bf16": (["--no-bf16"], False),
    "cpu_bf16": (["--cpu-bf16"], True),
    "threads": (["--threads", "2"], 2),
    "workers": (["--workers", "2"], 2),
    "overwrite": (["--overwrite"], True),
    "task_distill": (["--task-distill"], True),
    "task_teacher": (["--task-teacher", "/o/teacher-eval"], "/o/teacher-eval"),
    "kd_temperature": (["--kd-temperature", "4"], 4.0),
    "kd_alpha": (["--kd-alpha", "0.9"], 0.9),
    "scratch_baselines": (["--scratch-baselines"], True),
}

# where each option must show up in the settings the benchmarks are built from
IN_GLUE = {"epochs": "epochs", "lr": "learning_rate", "batch_size": "batch_size", "max_seq_len": "max_seq_len",
           "warmup_ratio": "warmup_ratio", "max_steps": "max_steps", "device": "device", "bf16": "bf16",
           "cpu_bf16": "cpu_bf16"}
IN_SQUAD = {"squad_epochs": "epochs", "squad_lr": "learning_rate", "squad_batch_size": "batch_size",
            "squad_max_seq_len": "max_seq_len", "doc_stride": "doc_stride", "max_answer_length": "max_answer_length",
            "n_best": "n_best", "warmup_ratio": "warmup_ratio", "max_steps": "max_steps", "device": "device",
            "bf16": "bf16", "cpu_bf16": "cpu_bf16"}


def _parse(argv: list[str]) -> EvaluateConfig:
    args = build_parser(argv).parse_args(argv)
    cfg = args.spec.config_from(args)
    assert isinstance(cfg, EvaluateConfig)
    return cfg


def _all_non_default() -> EvaluateConfig:
    argv = ["evaluate"] + [a for args, _ in NON_DEFAULT.values() for a in args]
    return _parse(argv)


def test_every_option_is_covered_here():
    cli_fields = {f.name for f in dataclasses.fields(EvaluateConfig) if f.metadata.get("cli", True)}
    assert cli_fields == set(NON_DEFAULT)


def test_every_option_reaches_the_config():
    defaults = {f.name: f.default for f in dataclasses.fields(EvaluateConfig)}
    cfg = _all_non_default()
    for name, (_, expected) in NON_DEFAULT.items():
        assert getattr(cfg, name) == expected, name
        assert defaults[name] != expected, f"{name}: test value is the default"


def test_options_reach_the_fine_tuning_mlm_and_bias_settings():
    from distilflow.tasks.evaluate.suite import bias_config, mlm_config

    cfg = _all_non_default()
    g, s = glue_finetune(cfg), squad_finetune(cfg)
    for field, ft_field in IN_GLUE.items():
        assert getattr(g, ft_field) == getattr(cfg, field), field
    for field, ft_field in IN_SQUAD.items():
        assert getattr(s, ft_field) == getattr(cfg, field), field
    kd = task_distill_config(cfg)
    assert (kd.temperature, kd.alpha) == (4.0, 0.9)
    m, b = mlm_config(cfg), bias_config(cfg)
    assert (m.batch_size, m.max_examples, m.device, m.bf16) == (8, 50, "cpu", False)
    assert (b.groups, b.templates, b.top_k, b.device) == (cfg.bias_groups, cfg.bias_templates, 3, "cpu")


def test_defaults_match_the_recipes():
    """The defaults users' scripts rely on: BERT/DistilBERT GLUE (5e-5, 32, 3 epochs, 128) and run_squad."""
    cfg = _parse(["evaluate", "--model", "m", "--output", "o", "--data", "d", "--glue-dir", "g", "--squad-dev", "s"])
    assert cfg.tasks == ("mlm", "sst2", "mrpc", "cola", "stsb", "rte", "squad", "bias")
    g, s = glue_finetune(cfg), squad_finetune(cfg)
    assert (g.learning_rate, g.batch_size, g.epochs, g.max_seq_len, g.eval_batch_size) == (5e-5, 32, 3.0, 128, 128)
    assert (s.learning_rate, s.batch_size, s.epochs, s.max_seq_len, s.doc_stride, s.eval_batch_size) == (
        3e-5, 12, 2.0, 384, 128, 64)
    assert len(cfg.bias_templates) == 2 and cfg.bias_groups[0] == "White man"


def test_glue_names_match_the_task_registry():
    assert set(GLUE_NAMES) == set(glue.TASKS)
    assert set(BENCHMARKS) == {"mlm", "squad", "bias", *glue.TASKS}


@pytest.mark.parametrize(("argv", "field"), [
    (["--tasks", "nope"], "tasks"),
    (["--dev-split-frac", "1.0"], "dev_split_frac"),
    (["--squad-train-frac", "0"], "squad_train_frac"),
    (["--tasks", "bias", "--bias-template", "no placeholder [MASK]"], "bias_templates"),
    (["--tasks", "mlm"], "data"),
    (["--device", "tpu"], "device"),
    (["--tasks", "sst2", "--glue-dir", "g", "--task-distill"], "task_distill"),  # no teacher to fine-tune
    (["--tasks", "bias", "--scratch-baselines"], "scratch_baselines"),  # nothing is fine-tuned
    (["--kd-alpha", "1.5"], "kd_alpha"),
])
def test_bad_values_name_the_field(argv, field):
    with pytest.raises(ConfigError, match=rf"EvaluateConfig\.{field}"):
        _parse(["evaluate", "--model", "m", "--output", "o", *argv])


def test_bucket_output_and_model_are_accepted():
    """s3:// outputs and models are valid (issue 15): fine-tuned models are uploaded, models read through the cache."""
    cfg = _parse(["evaluate", "--model", "s3://bucket/student", "--output", "s3://bucket/eval", "--tasks", "bias"])
    assert (cfg.model, cfg.output) == ("s3://bucket/student", "s3://bucket/eval")


def test_flow_parameters_are_the_config_fields_and_round_trip():
    """What Prefect makes of the parameters (its pydantic validation) gives back the same config."""
    from distilflow.flows.evaluate import evaluate_flow

    cfg = _all_non_default()
    params = evaluate_flow.validate_parameters(cfg.to_dict())
    assert set(params) == {f.name for f in dataclasses.fields(EvaluateConfig)}
    assert EvaluateConfig.from_dict(json.loads(json.dumps(params))) == cfg


@pytest.mark.usefixtures("prefect_test_harness_session")
def test_the_flow_hands_every_option_to_the_benchmarks(monkeypatch, tmp_path):
    """The real flow run (Prefect parameters, the benchmark task's serialised config) with the work stubbed."""
    import distilflow.flows.evaluate as flows_evaluate

    seen: dict[str, EvaluateConfig] = {}

    def fake(name, cfg, output):
        seen[name] = cfg
        return {"task": name, "metric": "accuracy", "score": 1.0, "metrics": {"accuracy": 1.0}}

    monkeypatch.setattr(flows_evaluate, "run_benchmark", fake)
    cfg = _all_non_default().replace(output=str(tmp_path / "eval"), workers=1)
    report = flows_evaluate.evaluate_flow(**cfg.to_dict())
    # every benchmark (with --task-distill/--scratch-baselines: also sst2-distilled, sst2-scratch ...) got the config
    assert list(seen) == cfg.benchmarks() and "sst2-distilled" in seen and all(c == cfg for c in seen.values())
    assert report["config"] == cfg.to_dict()
    saved = json.loads((tmp_path / "eval" / "config.json").read_text())
    assert saved["glue"]["learning_rate"] == 2e-5 and saved["squad"]["doc_stride"] == 64


def test_prefect_yaml_evaluate_deployment_parameters_are_accepted():
    from distilflow.flows.evaluate import evaluate_flow

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    dep = next(d for d in spec["deployments"] if d["entrypoint"] == "distilflow.flows.evaluate.evaluate_flow")
    params = {k: (v.replace("{{ $DISTILFLOW_DATA }}", "/data") if isinstance(v, str) else v)
              for k, v in dep["parameters"].items()}
    validated = evaluate_flow.validate_parameters(params)
    cfg = EvaluateConfig.from_dict(validated)
    assert cfg.model == "/data/models/student" and "sst2" in cfg.tasks


# -- regression: options that were lost between argparse and the job -------------------------------------------
@pytest.mark.usefixtures("prefect_test_harness_session")
def test_dev_split_frac_reaches_the_training_set(tiny_student, tmp_path):
    """``--dev-split-frac 0.3 --tasks rte`` trained on 141 rows (the default 0.5) before; now on 30% of dev."""
    rte_dev = SHARED / "glue" / "rte" / "dev.tsv"
    dev = glue.read_glue_file(str(rte_dev), "rte").examples
    expected, _ = glue.split_examples(dev, 0.3, seed=0)  # a hash split: about 30%
    out = tmp_path / "eval"
    rc = main(["evaluate", "--model", tiny_student, "--tasks", "rte", "--glue-dir", str(SHARED / "glue"),
               "--output", str(out), "--dev-split-frac", "0.3", "--max-steps", "1", "--batch-size", "8",
               "--max-seq-len", "32", "--device", "cpu"])
    assert rc == 0
    rte = json.loads((out / "results.json").read_text())["results"]["rte"]
    assert rte["n_train"] == len(expected) and rte["n_train"] + rte["n_eval"] == len(dev)
    assert 0.25 * len(dev) < rte["n_train"] < 0.35 * len(dev)  # was 141 (the default 0.5) before the fix
    assert any("30% of dev" in n for n in rte["notes"])


def test_squad_train_frac_reaches_the_split(tiny_student, tmp_path):
    """``--squad-train-frac`` was dropped the same way; the SQuAD job now splits the dev articles by it."""
    from distilflow.tasks.evaluate.squad import read_squad, split_by_title
    from distilflow.tasks.evaluate.suite import run_squad_task

    dev = str(SHARED / "squad" / "dev-v1.1.json")
    cfg = _parse(["evaluate", "--model", tiny_student, "--tasks", "squad", "--squad-dev", dev, "--output",
                  str(tmp_path), "--squad-train-frac", "0.1", "--max-steps", "1", "--max-eval-examples", "4",
                  "--squad-max-seq-len", "128", "--doc-stride", "32", "--squad-batch-size", "4", "--device", "cpu"])
    examples = read_squad(dev)
    train, _ = split_by_title(examples.examples, 0.1, seed=0)
    r = run_squad_task(cfg, str(tmp_path))
    assert r["n_train"] == len([e for e in train if e.id not in examples.misaligned]) < 0.2 * len(examples.examples)
    assert any("10% of the dev articles" in n for n in r["notes"])


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory, bert_tokenizer) -> str:
    import torch
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    path = Path(tmp_path_factory.mktemp("tiny")) / "student"
    torch.manual_seed(0)
    DistilBertForMaskedLM(DistilBertConfig(vocab_size=len(bert_tokenizer), dim=16, n_layers=1, n_heads=2,
                                           hidden_dim=32, max_position_embeddings=128)).save_pretrained(path)
    bert_tokenizer.save_pretrained(path)
    return str(path)
