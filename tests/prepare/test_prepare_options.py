"""Every option of prepare / shard / pairs / mask reaches the job's config, and the flow, unchanged.

For each command the test walks the config's CLI fields, gives each a non-default value on the command
line (old flag names too), and checks it in the parsed config and in the config the flow body receives.
The ``prefect.yaml`` deployments of these flows must have parameters the flows accept.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from distilflow.cli import build_parser
from distilflow.tasks.core.config import ConfigError, flag_of
from distilflow.tasks.prepare.config import (
    MASK,
    PAIRS,
    PREPARE,
    SHARD,
    PrepareConfig,
    mask_record,
    pairs_record,
    shard_record,
)

REPO = Path(__file__).resolve().parents[2]
SPECS = {"prepare": PREPARE, "shard": SHARD, "pairs": PAIRS, "mask": MASK}
# Non-default values inside each option's bounds (everything else is derived from the field's type).
VALUES: dict[str, Any] = {"max_seq_len": 100, "short_seq_prob": 0.25, "mlm_prob": 0.2, "mlm_smoothing": 0.7,
                          "max_predictions": 20, "dupe_factor": 3, "workers": 2, "dask_workers": 2, "seed": 7}


def _value_for(f: dataclasses.Field, tp: Any) -> tuple[list[str], Any]:
    """(command-line tokens, the value the config must hold) for a non-default value of ``f``."""
    flag = flag_of(f)
    if f.name in VALUES:
        v = VALUES[f.name]
        return [flag, str(v)], v
    base = typing.get_args(tp)[0] if type(None) in typing.get_args(tp) else tp
    if base is bool:
        return ([f"--no-{flag[2:]}"], False) if f.default else ([flag], True)
    if typing.get_origin(base) is typing.Literal:
        v = next(c for c in typing.get_args(base) if c != f.default)
        return [flag, v], v
    if typing.get_origin(base) is tuple:
        return [flag, "in/a.txt", "in/b.jsonl"], ("in/a.txt", "in/b.jsonl")
    v = f"value-of-{f.name}" if f.name != "dask_address" else "tcp://127.0.0.1:8786"
    return [flag, v], v


def _required(spec) -> list[str]:
    argv = []
    for f in dataclasses.fields(spec.config):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            argv += _value_for(f, typing.get_type_hints(spec.config)[f.name])[0]
    return argv


@pytest.mark.parametrize("command", list(SPECS))
def test_every_option_reaches_the_config_and_the_flow(command, monkeypatch):
    import distilflow.flows.prepare as flows

    spec = SPECS[command]
    hints = typing.get_type_hints(spec.config)
    cli_fields = [f for f in dataclasses.fields(spec.config) if f.metadata.get("cli", True)]
    assert len(cli_fields) >= 5
    seen: list[Any] = []
    monkeypatch.setattr(flows, "_in_subflow", lambda fn, name, cfg: seen.append(cfg) or {})
    flow = {"prepare": flows.prepare_flow, "shard": flows.shard_flow, "pairs": flows.pairs_flow,
            "mask": flows.mask_flow}[command]
    for f in cli_fields:
        tokens, expected = _value_for(f, hints[f.name])
        argv = [command, *_required(spec), *tokens]
        cfg = build_parser(argv).parse_args(argv).spec.config_from(build_parser(argv).parse_args(argv))
        assert getattr(cfg, f.name) == expected, (command, f.name)
        default = dataclasses.replace(cfg, **{f.name: f.default}) if f.default is not dataclasses.MISSING else None
        assert default is None or getattr(default, f.name) != expected  # the value really is not the default
        # the flow's parameters are the config's fields: the body gets the same config back
        flow.fn(**cfg.to_dict())
        assert seen.pop() == cfg


def test_old_flags_and_defaults_are_unchanged():
    argv = ["prepare", "--input", "a.txt", "b.txt", "--output", "o", "--tokenizer", "t"]
    cfg = PREPARE.config_from(build_parser(argv).parse_args(argv))
    assert cfg == PrepareConfig(inputs=("a.txt", "b.txt"), output="o", tokenizer="t")
    assert (cfg.max_seq_len, cfg.seed, cfg.dupe_factor, cfg.short_seq_prob, cfg.mlm_prob) == (512, 0, 1, 0.1, 0.15)
    assert (cfg.nsp, cfg.whole_word_mask, cfg.bert_exact_nsp, cfg.workers, cfg.overwrite) == (True, False, False, 1, False)
    argv += ["--no-nsp", "--whole-word-mask", "--bert-exact-nsp", "--overwrite", "--one-sentence-per-line"]
    cfg = PREPARE.config_from(build_parser(argv).parse_args(argv))
    assert (cfg.nsp, cfg.whole_word_mask, cfg.bert_exact_nsp, cfg.overwrite, cfg.one_sentence_per_line) == \
        (False, True, True, True, True)


def test_records_and_fingerprints_do_not_change():
    """The stage records (config.json, fingerprints) are what they were before the options moved: an output
    folder written by the previous version resumes. Expected values computed with commit 9e18364. The
    corpus record differs only by the sentence splitter's version (2: case-sensitive abbreviations), which
    changes the corpus and so must refuse to resume a folder split by version 1."""
    cfg = PrepareConfig(inputs=("a",), output="o", tokenizer="t", max_seq_len=128)
    assert shard_record(cfg).splitter_version == 2
    assert shard_record(cfg).fingerprint(exclude=("splitter_version",)) == "70e69714d6e2d45e"
    assert shard_record(cfg).fingerprint() != "70e69714d6e2d45e"
    assert pairs_record(cfg, "abc").fingerprint() == "4b9050f19c29dae8"
    assert mask_record(cfg, "abc").fingerprint() == "81fead0f9f4172a7"
    # run-time knobs never enter the records
    assert PrepareConfig.run_only_fields() == ("workers", "dask_address", "dask_workers", "overwrite")
    other = dataclasses.replace(cfg, workers=2, overwrite=True)
    assert pairs_record(other, "abc") == pairs_record(cfg, "abc")


@pytest.mark.parametrize("field,value", [("max_seq_len", 4), ("mlm_prob", 1.0), ("dupe_factor", 0), ("workers", 0),
                                         ("short_seq_prob", 1.5)])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"PrepareConfig.{field}"):
        PrepareConfig(inputs=("a",), output="o", tokenizer="t", **{field: value})


def test_prefect_yaml_deployments_are_accepted_by_the_flows():
    import distilflow.flows.prepare as flows

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    checked = 0
    for d in spec["deployments"]:
        module, _, name = d["entrypoint"].rpartition(".")
        if module != "distilflow.flows.prepare":
            continue
        flow = getattr(flows, name)
        params = {k: (v.replace("{{ $DISTILFLOW_DATA }}", "/data") if isinstance(v, str) else
                      [x.replace("{{ $DISTILFLOW_DATA }}", "/data") for x in v] if isinstance(v, list) else v)
                  for k, v in d.get("parameters", {}).items()}
        sig = inspect.signature(flow.fn)
        assert set(params) <= set(sig.parameters), set(params) - set(sig.parameters)
        sig.bind(**params)  # every required parameter is given
        flow.validate_parameters(params)  # Prefect's own check (types)
        checked += 1
    assert checked >= 1
