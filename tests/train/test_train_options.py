"""Every option of `distilflow pretrain` / `distill` reaches the job's config and the flow; prefect.yaml fits.

Each option is given alone on the command line with a value different from its default; the parsed
config must hold that value in that field and nothing else may change. The flows' parameters are checked
against the same configs (the deployments in ``prefect.yaml`` included).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from distilflow.cli import build_parser
from distilflow.tasks.core.config import ConfigError
from distilflow.tasks.train.config import DISTILL, DISTILL_ONLY, PRETRAIN, PRETRAIN_ONLY, TrainConfig

REPO = Path(__file__).resolve().parents[2]
# values the generic rule below would get wrong (they must name something that exists / is allowed)
SPECIAL = {"model": "tiny", "teacher": None, "data": "other-data", "output": "other-out",
           "student_layers": (0, 1), "eval_data": "heldout"}


@pytest.fixture()
def teacher_dir(tmp_path: Path) -> Path:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "config.json").write_text("{}")
    (tmp_path / "t2").mkdir()
    (tmp_path / "t2" / "config.json").write_text("{}")
    return tmp_path


def _base(cmd: str, root: Path) -> list[str]:
    argv = [cmd, "--data", "d", "--output", "o"]
    return argv + ["--teacher", str(root / "t")] if cmd == "distill" else argv


def _parse(argv: list[str]) -> TrainConfig:
    args = build_parser(argv).parse_args(argv)
    return args.spec.config_from(args)


def _options(cmd: str) -> list[argparse.Action]:
    parser = build_parser([cmd])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [a for a in sub.choices[cmd]._actions if a.dest not in ("help", "verbose") and a.option_strings]


def _other_value(name: str, default: Any, root: Path) -> tuple[list[str], Any]:
    """Command-line tokens for a non-default value of field ``name`` and the value the config must hold."""
    field = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    tp = typing.get_type_hints(TrainConfig)[name]
    flag = field.metadata.get("flag") or "--" + name.replace("_", "-")
    if name in SPECIAL:
        value = SPECIAL[name] if name != "teacher" else str(root / "t2")
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        return [flag, text], value
    if tp is bool:
        return ([f"--no-{flag[2:]}"] if default else [flag]), not default
    if typing.get_origin(tp) is typing.Literal:
        value = next(c for c in typing.get_args(tp) if c != default)
        return [flag, value], value
    if tp is int:
        return [flag, str(default + 1)], default + 1
    if tp is float:
        value = default + 0.25 if default < 0.5 else default / 2  # stays inside [0, 1) bounds
        return [flag, repr(value)], value
    raise AssertionError(f"{name}: no rule for {tp}")


@pytest.mark.parametrize("cmd", ["pretrain", "distill"])
def test_every_option_reaches_the_config(cmd: str, teacher_dir: Path):
    base_argv = _base(cmd, teacher_dir)
    base = _parse(base_argv)
    assert base.mode == cmd
    seen = set()
    for action in _options(cmd):
        if action.option_strings[0] in ("--data", "--output", "--teacher"):
            tokens, value = _other_value(action.dest, None, teacher_dir)
            argv = [t for t in base_argv]
            argv[argv.index(action.option_strings[0]) + 1] = tokens[1]
        else:
            tokens, value = _other_value(action.dest, getattr(base, action.dest), teacher_dir)
            argv = base_argv + tokens
        cfg = _parse(argv)
        assert getattr(cfg, action.dest) == value != getattr(base, action.dest), action.dest
        changed = {k for k, v in cfg.to_dict().items() if base.to_dict()[k] != v}
        assert changed == {action.dest}, (action.dest, changed)
        seen.add(action.dest)
    hidden = {"mode", "adam_betas", *(DISTILL_ONLY if cmd == "pretrain" else PRETRAIN_ONLY)}
    assert seen == {f.name for f in dataclasses.fields(TrainConfig)} - hidden


def test_distill_keeps_distilbert_defaults_and_old_flags(teacher_dir: Path):
    d = _parse(_base("distill", teacher_dir))
    p = _parse(_base("pretrain", teacher_dir))
    assert (d.lr, d.mlm_smoothing, d.max_grad_norm) == (5e-4, 0.7, 5.0)
    assert (p.lr, p.mlm_smoothing, p.max_grad_norm) == (1e-4, 0.0, 1.0)
    # the preset flag is still --config; old boolean flags still work
    assert _parse(_base("pretrain", teacher_dir) + ["--config", "base"]).model == "base"
    assert _parse(_base("distill", teacher_dir) + ["--restrict-ce-to-mask", "--whole-word"]).whole_word
    with pytest.raises(SystemExit):  # --teacher stays required for distill
        _parse(["distill", "--data", "d", "--output", "o"])
    with pytest.raises(ConfigError, match="TrainConfig.mlm_prob"):
        _parse(_base("pretrain", teacher_dir) + ["--mlm-prob", "1.5"])


def test_resume_fingerprint_ignores_run_only_fields(teacher_dir: Path):
    cfg = _parse(_base("distill", teacher_dir))
    for name in TrainConfig.run_only_fields():
        tokens, value = _other_value(name, getattr(cfg, name), teacher_dir)
        assert cfg.replace(**{name: value}).fingerprint_for_resume() == cfg.fingerprint_for_resume(), name
    assert {"launcher", "nproc_per_node", "resume", "log_every", "eval_data"} <= set(TrainConfig.run_only_fields())
    assert cfg.replace(lr=1).fingerprint_for_resume() == cfg.replace(lr=1.0).fingerprint_for_resume()
    assert cfg.replace(lr=2e-4).fingerprint_for_resume() != cfg.fingerprint_for_resume()


@pytest.mark.parametrize("cmd", ["pretrain", "distill"])
def test_the_flow_receives_every_option(cmd: str, teacher_dir: Path, monkeypatch):
    """run_x passes the whole config to the flow; the flow rebuilds exactly that config."""
    import distilflow.flows.train as ft

    flow = ft.pretrain_flow if cmd == "pretrain" else ft.distill_flow
    spec = PRETRAIN if cmd == "pretrain" else DISTILL
    params = set(inspect.signature(flow.fn).parameters)
    assert params == {f.name for f in dataclasses.fields(TrainConfig)} - {"mode", *spec.skip}
    received: list[dict[str, Any]] = []
    monkeypatch.setattr(ft, "train_task", lambda cfg_dict: received.append(cfg_dict) or {"steps": 0})
    argv = _base(cmd, teacher_dir) + ["--lr", "0.003", "--seed", "7", "--launcher", "subprocess"]
    cfg = _parse(argv)
    flow.fn(**ft._flow_params(cfg))  # the flow's body, without starting a flow run
    assert TrainConfig.from_dict(received[0]) == cfg
    # defaults of the flow are the command's defaults: the flow called with the required fields only
    required = {k: getattr(cfg, k) for k in ("data", "output", "teacher") if k in params}
    flow.fn(**required)
    assert TrainConfig.from_dict(received[1]) == _parse(_base(cmd, teacher_dir))


def test_prefect_yaml_train_deployments_fit_the_flows(tmp_path: Path):
    import distilflow.flows.train as ft

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    flows = {"distilflow.flows.train.pretrain_flow": ft.pretrain_flow,
             "distilflow.flows.train.distill_flow": ft.distill_flow}
    found = 0
    for dep in spec["deployments"]:
        flow = flows.get(dep["entrypoint"])
        if flow is None:
            continue
        found += 1
        params = {k: v.replace("{{ $DISTILFLOW_DATA }}", str(tmp_path)) if isinstance(v, str) else v
                  for k, v in dep.get("parameters", {}).items()}
        assert set(params) <= set(inspect.signature(flow.fn).parameters), dep["name"]
        flow.validate_parameters(params)
        if "teacher" in params:
            Path(params["teacher"]).mkdir(parents=True)
            (Path(params["teacher"]) / "config.json").write_text("{}")
        mode = "pretrain" if flow is ft.pretrain_flow else "distill"
        TrainConfig.from_dict({**params, "mode": mode})  # valid as a config too
    assert found == 2
