"""Every option of ``distilflow pipeline`` reaches the job's config and the flow; prefect.yaml's deployment
parameters are accepted; what the stages get is derived from the config (plan)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from distilflow.cli import build_parser
from distilflow.tasks.core.config import ConfigError
from distilflow.tasks.core.errors import InputError
from distilflow.tasks.pipeline import plan
from distilflow.tasks.pipeline.config import PRESETS, PipelineConfig
from tests.conftest import GUTENBERG, REPO

NON_DEFAULT: dict[str, tuple[list[str], object]] = {
    "output": (["--output", "/runs/x"], "/runs/x"),
    "inputs": (["--input", "/c/a.txt", "/c/b.txt"], ("/c/a.txt", "/c/b.txt")),
    "heldout": (["--heldout", "/c/h.txt"], ("/c/h.txt",)),
    "tokenizer": (["--tokenizer", "/tok"], "/tok"),
    "vocab_size": (["--vocab-size", "5000"], 5000),
    "cased": (["--cased"], True),
    "teacher": (["--teacher", "/teacher"], "/teacher"),
    "teacher_config": (["--teacher-config", "tiny"], "tiny"),
    "preset": (["--preset", "small"], "small"),
    "glue_dir": (["--glue-dir", "/glue"], "/glue"),
    "glue_tasks": (["--glue-tasks", "sst2,mrpc"], ("sst2", "mrpc")),
    "squad_dev": (["--squad-dev", "/dev.json"], "/dev.json"),
    "workers": (["--workers", "2"], 2),
    "seed": (["--seed", "3"], 3),
    "precision": (["--precision", "bf16"], "bf16"),
}


def _parse(argv: list[str]) -> PipelineConfig:
    args = build_parser(argv).parse_args(argv)
    cfg = args.spec.config_from(args)
    assert isinstance(cfg, PipelineConfig)
    return cfg


def _all_non_default() -> PipelineConfig:
    return _parse(["pipeline"] + [a for args, _ in NON_DEFAULT.values() for a in args])


def test_every_option_is_covered_here():
    assert {f.name for f in dataclasses.fields(PipelineConfig) if f.metadata.get("cli", True)} == set(NON_DEFAULT)


def test_every_option_reaches_the_config():
    defaults = {f.name: f.default for f in dataclasses.fields(PipelineConfig)}
    cfg = _all_non_default()
    for name, (_, expected) in NON_DEFAULT.items():
        assert getattr(cfg, name) == expected, name
        assert defaults[name] != expected, f"{name}: test value is the default"


def test_cased_uncased_flags_and_defaults():
    base = ["pipeline", "--output", "o"]
    assert _parse(base).cased is False and _parse(base).preset == "debug" and _parse(base).inputs == ()
    assert _parse([*base, "--cased"]).cased is True
    assert _parse([*base, "--cased", "--uncased"]).cased is False
    assert _parse([*base, "--no-cased"]).cased is False
    assert _parse([*base, "--input"]).inputs == ()  # the flag alone: still the demo corpus


def test_bad_values_name_the_field():
    with pytest.raises(SystemExit):  # argparse: invalid choice
        _parse(["pipeline", "--output", "o", "--preset", "huge"])
    with pytest.raises(ConfigError, match=r"PipelineConfig\.heldout"):
        _parse(["pipeline", "--output", "o", "--heldout", "h.txt"])
    with pytest.raises(ConfigError, match=r"PipelineConfig\.workers"):
        _parse(["pipeline", "--output", "o", "--workers", "0"])


def test_options_reach_the_stage_settings(tmp_path):
    """The preset decides sizes unless an option says otherwise; stage settings come from the config."""
    cfg = PipelineConfig(output=str(tmp_path), preset="small", vocab_size=5000, seed=3, teacher_config="tiny")
    assert cfg.p("vocab_size") == 5000 and cfg.p("teacher_config") == "tiny"
    assert cfg.p("max_seq_len") == PRESETS["small"]["max_seq_len"]
    ts = plan.train_settings(cfg, "/held", "pretrain")
    assert (ts["max_steps"], ts["lr"], ts["seed"], ts["eval_data"]) == (3000, 5e-4, 3, "/held")
    ds = plan.train_settings(cfg, "/held", "distill")
    assert (ds["max_steps"], ds["lr"], ds["save_every"]) == (2000, 5e-4, 200)
    assert plan.eval_tasks(cfg) == ["mlm", "bias"]
    both = cfg.replace(glue_dir="/g", glue_tasks=("sst2",), squad_dev="/s.json")
    assert plan.eval_tasks(both) == ["mlm", "bias", "sst2", "squad"]


def test_precision_reaches_training_and_fine_tuning_and_auto_changes_no_record():
    """--precision bf16/fp32 reach the training and evaluate stages; auto (the default) adds nothing to them or to
    the saved pipeline config, so the stage records of earlier runs stay valid."""
    cfg = PipelineConfig(output="o", preset="replicate", glue_dir="/g")
    assert "precision" not in cfg.to_dict() and "precision" not in plan.train_settings(cfg, "/h", "pretrain")
    assert not {"cpu_bf16", "bf16"} & set(plan.eval_settings(cfg))
    bf16 = cfg.replace(precision="bf16")
    assert bf16.to_dict()["precision"] == "bf16" and "--precision bf16" in plan.command_line(bf16)
    assert plan.train_settings(bf16, "/h", "distill")["precision"] == "bf16"
    assert plan.eval_settings(bf16)["cpu_bf16"] is True
    assert plan.eval_settings(cfg.replace(precision="fp32"))["bf16"] is False


def test_corpus_split_and_preflight(tmp_path):
    books = sorted(str(p) for p in GUTENBERG.glob("pg*.txt"))
    c = plan.split_corpus(PipelineConfig(output=str(tmp_path), inputs=(str(GUTENBERG / "pg*.txt"),)))
    assert c.train == books[:-1] and c.heldout == books[-1:]
    c = plan.split_corpus(PipelineConfig(output=str(tmp_path), inputs=(str(GUTENBERG / "pg*.txt"),),
                                         heldout=(books[0],)))
    assert c.train == books[1:] and c.heldout == books[:1]
    with pytest.raises(InputError, match="one input file"):
        plan.split_corpus(PipelineConfig(output=str(tmp_path), inputs=(books[0],)))
    with pytest.raises(InputError, match="--teacher"):
        plan.preflight(PipelineConfig(output=str(tmp_path), teacher=str(tmp_path / "missing")))


def test_flow_parameters_are_the_config_fields_and_round_trip():
    from distilflow.flows.pipeline import pipeline_flow

    cfg = _all_non_default()
    params = pipeline_flow.validate_parameters(cfg.to_dict())
    assert set(params) == {f.name for f in dataclasses.fields(PipelineConfig)}
    assert PipelineConfig.from_dict(json.loads(json.dumps(params))) == cfg


def test_prefect_yaml_pipeline_deployment_parameters_are_accepted():
    from distilflow.flows.pipeline import pipeline_flow

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    dep = next(d for d in spec["deployments"] if d["entrypoint"] == "distilflow.flows.pipeline.pipeline_flow")

    def fill(v):
        return [fill(x) for x in v] if isinstance(v, list) else v.replace("{{ $DISTILFLOW_DATA }}", "/data") \
            if isinstance(v, str) else v

    cfg = PipelineConfig.from_dict(pipeline_flow.validate_parameters({k: fill(v) for k, v in dep["parameters"].items()}))
    assert cfg.preset == "base" and cfg.inputs == ("/data/landing",)
