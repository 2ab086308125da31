"""Every option of ``fill-mask``, ``qa``, ``embed``, ``watch`` and ``serve`` reaches the job: command line -> config (each
field given a non-default value), config -> the flow's typed parameters and back, the flags users' scripts
call keep their meaning, and prefect.yaml's inference deployments have parameters the flows accept."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from distilflow.cli import build_parser
from distilflow.tasks.core.config import Config, flag_of
from distilflow.tasks.core.errors import ConfigError
from distilflow.tasks.infer.config import (
    EMBED,
    FILL_MASK,
    QA,
    SERVE,
    WATCH,
    EmbedConfig,
    FillMaskConfig,
    FillMaskJob,
    QAConfig,
    QAJob,
)

REPO = Path(__file__).resolve().parents[2]
COMMANDS = {"fill-mask": FILL_MASK, "qa": QA, "embed": EMBED, "watch": WATCH, "serve": SERVE}
REQUIRED = {"fill-mask": ["--input", "in.txt", "--output", "out", "--model", "m"],
            "qa": ["--input", "in.txt", "--output", "out", "--model", "m"],
            "embed": ["--input", "in.txt", "--output", "out", "--model", "m"],
            "watch": ["drop/"],
            "serve": ["--model", "m"]}


def _other_value(cls: type[Config], f: dataclasses.Field) -> tuple[list[str], Any]:
    """Command-line words giving field ``f`` a value different from its default, and that value."""
    tp = typing.get_type_hints(cls)[f.name]
    default = f.default if f.default is not dataclasses.MISSING else None  # required options: no default
    flag = flag_of(f)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = tp
    if typing.get_origin(tp) in (typing.Union, type(int | str)):
        base = next((a for a in args if typing.get_origin(a) is tuple), args[0])
    if base is bool:
        return ([f"--no-{flag[2:]}"] if default else [flag]), not default
    if typing.get_origin(base) is typing.Literal:
        value = next(c for c in typing.get_args(base) if c != default)
        return [flag, value], value
    if typing.get_origin(base) is tuple:
        if f.metadata.get("sep"):
            return [flag, "alpha, beta"], ("alpha", "beta")
        return [flag, "s3://bucket/a.txt", "/tmp/b.jsonl"], ("s3://bucket/a.txt", "/tmp/b.jsonl")
    if base is int:
        value = (default if isinstance(default, int) else 0) + 3
        return [flag, str(value)], value
    if base is float:
        value = float(default) + 2.5
        return [flag, str(value)], value
    value = f"custom-{f.name}"
    return [flag, value], value


def _parse(command: str, *words: str) -> Any:
    spec = COMMANDS[command]
    return spec.config_from(build_parser([command]).parse_args([command, *words]))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_reaches_the_config(command):
    spec = COMMANDS[command]
    defaults = _parse(command, *REQUIRED[command])
    fields = [f for f in dataclasses.fields(spec.config) if f.metadata.get("cli", True)]
    assert len(fields) >= 8
    for f in fields:
        if f.metadata.get("positional"):
            assert getattr(defaults, f.name) == REQUIRED[command][0]
            continue
        words, want = _other_value(spec.config, f)
        base = list(REQUIRED[command])
        if flag_of(f) in base:  # a required option: replace its value
            i = base.index(flag_of(f))
            del base[i:i + 2]
        cfg = _parse(command, *base, *words)
        assert getattr(cfg, f.name) == want != getattr(defaults, f.name), (command, f.name, words)
        assert {k: v for k, v in cfg.to_dict().items() if k != f.name} == \
            {k: v for k, v in defaults.to_dict().items() if k != f.name}, (command, f.name)


@pytest.mark.parametrize("command", ["fill-mask", "qa", "embed"])
def test_flow_parameters_carry_every_field(command):
    """The flow's typed parameters (what Prefect validates for the UI, deployments and ``flow(**cfg)``)
    accept every non-default value and give back the same config."""
    from distilflow.flows import inference

    flow = {"fill-mask": inference.fill_mask_flow, "qa": inference.qa_flow, "embed": inference.embed_flow}[command]
    spec = COMMANDS[command]
    words = list(REQUIRED[command])
    for f in dataclasses.fields(spec.config):
        if f.metadata.get("cli", True) and flag_of(f) not in words:
            words += _other_value(spec.config, f)[0]
    cfg = _parse(command, *words)
    params = flow.validate_parameters(cfg.to_dict())
    assert spec.config.from_dict(params) == cfg
    assert set(flow.parameters.properties) == {f.name for f in dataclasses.fields(spec.config)}


def test_flags_users_scripts_call():
    cfg = _parse("fill-mask", "--input", "a.txt", "s3://b/c.jsonl", "--output", "o", "--model", "m",
                 "--targets", "paris,london", "--keep-columns", "id,lang", "--quantize", "int8", "--top-k", "3")
    assert cfg.input == ("a.txt", "s3://b/c.jsonl") and cfg.targets == ("paris", "london")
    assert cfg.keep_columns == ("id", "lang") and cfg.quantize == "int8" and cfg.top_k == 3
    d = _parse("fill-mask", *REQUIRED["fill-mask"])
    assert (d.top_k, d.batch_size, d.max_length, d.too_long, d.format, d.device, d.dtype, d.quantize, d.threads,
            d.workers, d.overwrite) == (5, 64, 0, "truncate", "parquet", "auto", "auto", "none", 0, 1, False)
    q = _parse("qa", *REQUIRED["qa"], "--handle-impossible-answer")
    assert q.handle_impossible_answer and (q.top_k, q.max_seq_len, q.doc_stride, q.max_answer_len, q.batch_size) \
        == (1, 384, 128, 15, 32)
    e = _parse("embed", *REQUIRED["embed"], "--normalize", "--pooling", "cls")
    assert e.normalize and e.pooling == "cls" and e.batch_size == 64
    w = _parse("watch", "drop/", "--include", "*.txt,*.jsonl", "--recursive")
    assert w.include == ("*.txt", "*.jsonl") and w.recursive and (w.interval, w.stable_polls) == (2.0, 2)
    f = _parse("fill-mask", *REQUIRED["fill-mask"], "--fast")  # resolved to this machine's fast mode
    assert f.quantize in ("bf16", "int8") and f.output_fingerprint() == _parse(
        "fill-mask", *REQUIRED["fill-mask"], "--quantize", f.quantize).output_fingerprint()
    s = _parse("serve", "--model", "m")
    assert (s.host, s.port, s.task, s.top_k) == ("127.0.0.1", 8000, "auto", None)


def test_one_string_is_accepted_where_a_list_is_expected():
    """A deployment trigger passes ``input`` as one path; old callers passed ``targets`` as "a,b"."""
    a = FillMaskJob(input="in/x.txt", output="o", model="m", targets="a, b")
    b = FillMaskJob(input=["in/x.txt"], output="o", model="m", targets=["a", "b"])
    assert a == b and a.input == ("in/x.txt",) and a.fingerprint() == b.fingerprint()


def test_record_and_fingerprint_are_those_of_the_earlier_configs():
    """The record saved in config.json is the job config minus input/output/run knobs, and its fingerprint
    is the one the configs had before the options moved (values computed with commit 9e18364), so an output
    folder written earlier resumes."""
    job = FillMaskJob(input="x", output="o", model="m", targets=("x", "y"), top_k=3, workers=2, overwrite=True)
    assert job.record() == FillMaskConfig(model="m", targets=("x", "y"), top_k=3)
    assert job.output_fingerprint() == "2653a829519306b2"
    assert FillMaskConfig(model="m").output_fingerprint() == "3f460aa335884954"
    assert QAJob(input="x", output="o", model="m").output_fingerprint() == "2ee0658966609f82"
    assert QAConfig(model="m").output_fingerprint() == "2ee0658966609f82"
    assert EmbedConfig(model="m", normalize=True).output_fingerprint() == "37fa2709ab317ad5"
    # batching, threads, device and run knobs never change the fingerprint
    assert FillMaskJob(input="y", output="p", model="m", targets=("x", "y"), top_k=3, batch_size=8, threads=1,
                       device="cpu").output_fingerprint() == job.output_fingerprint()


@pytest.mark.parametrize("words, field", [
    (["--top-k", "0"], "top_k"), (["--batch-size", "0"], "batch_size"), (["--max-length", "2"], "max_length"),
    (["--quantize", "int8", "--device", "cuda"], "quantize"), (["--fast", "--device", "cuda"], "quantize"), (["--targets", "a,,b", "--threads", "-1"], "threads"),
])
def test_bad_values_name_the_field(words, field):
    with pytest.raises(ConfigError, match=rf"FillMaskJob\.{field}"):
        _parse("fill-mask", *REQUIRED["fill-mask"], *words)


def test_prefect_yaml_inference_deployments_are_accepted():
    from distilflow.flows import inference

    flows = {"fill_mask_flow": inference.fill_mask_flow, "qa_flow": inference.qa_flow,
             "embed_flow": inference.embed_flow}
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    data = "/data/distilflow"

    def render(v: Any) -> Any:
        if isinstance(v, str):
            v = v.replace("{{ $DISTILFLOW_DATA }}", data).replace("{{ event.payload.path }}", f"{data}/inbox/a.txt")
            assert "{{" not in v, v
            return v
        return [render(x) for x in v] if isinstance(v, list) else v

    seen = set()
    for d in spec["deployments"]:
        module, _, name = d["entrypoint"].rpartition(".")
        if module != "distilflow.flows.inference":
            continue
        seen.add(name)
        flow = flows[name]
        params = {k: render(v) for k, v in (d.get("parameters") or {}).items()}
        for trig in d.get("triggers") or []:  # a triggered run = the deployment's parameters + the trigger's
            params = {**params, **{k: render(v) for k, v in trig.get("parameters", {}).items()}}
        cfg_cls = {"fill_mask_flow": FillMaskJob, "qa_flow": QAJob}.get(name, COMMANDS["embed"].config)
        cfg = cfg_cls.from_dict(flow.validate_parameters(params))
        assert cfg.output.startswith(data) and all(re.match(data, i) for i in cfg.input)
    assert seen == set(flows)
