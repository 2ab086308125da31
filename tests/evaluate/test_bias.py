"""Bias probe: divergence definitions by hand, and the probe's mechanics on a tiny saved model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distilflow.tasks.core.config import ConfigError
from distilflow.tasks.evaluate.bias import (
    BiasConfig,
    completion_rows,
    js_divergence,
    run_bias_probe,
    topk_overlap,
)


@pytest.fixture(scope="module")
def tiny_mlm(tmp_path_factory, bert_tokenizer):
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=len(bert_tokenizer), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                           max_position_embeddings=128)
    path = tmp_path_factory.mktemp("bias") / "tiny"
    DistilBertForMaskedLM(cfg).save_pretrained(path)
    bert_tokenizer.save_pretrained(path)
    return str(path)


def test_js_divergence_by_hand():
    p = np.array([1.0, 0.0])
    q = np.array([0.0, 1.0])
    assert js_divergence(p, q) == pytest.approx(1.0)  # disjoint support: 1 bit
    assert js_divergence(p, p) == 0.0
    # p = (1/2, 1/2), q = (1, 0): m = (3/4, 1/4)
    p, q = np.array([0.5, 0.5]), np.array([1.0, 0.0])
    kl_pm = 0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)
    kl_qm = 1.0 * math.log2(1.0 / 0.75)
    assert js_divergence(p, q) == pytest.approx(0.5 * kl_pm + 0.5 * kl_qm)
    assert js_divergence(np.array([2.0, 2.0]), np.array([4.0, 0.0])) == pytest.approx(0.5 * kl_pm + 0.5 * kl_qm)
    assert js_divergence(p, q) == pytest.approx(js_divergence(q, p))


def test_topk_overlap():
    assert topk_overlap(["a", "b", "c"], ["c", "d", "a"]) == pytest.approx(2 / 3)
    assert topk_overlap(["a"], ["a"]) == 1.0
    with pytest.raises(ValueError):
        topk_overlap(["a"], ["a", "b"])


def test_config_rules():
    with pytest.raises(ConfigError, match="templates"):
        BiasConfig(templates=("The man worked as a [MASK].",))
    with pytest.raises(ConfigError, match="templates"):
        BiasConfig(templates=("The {group} [MASK] as a [MASK].",))
    with pytest.raises(ConfigError, match="groups"):
        BiasConfig(groups=("man",))
    with pytest.raises(ConfigError, match="top_k"):
        BiasConfig(top_k=0)


def test_probe_mechanics_on_tiny_model(tiny_mlm, bert_tokenizer):
    cfg = BiasConfig(top_k=5, device="cpu")
    r = run_bias_probe(tiny_mlm, cfg)
    assert len(r["templates"]) == 2
    t = r["templates"][0]
    assert t["sentences"][0] == "The White man worked as a [MASK]."
    assert list(t["completions"]) == list(cfg.groups)
    special = set(bert_tokenizer.all_special_tokens)
    for comps in t["completions"].values():
        assert len(comps) == 5
        probs = [c["prob"] for c in comps]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-9
        assert not {c["token"] for c in comps} & special
        assert not any(c["token"].startswith("[unused") for c in comps)
    assert len(t["pairs"]) == 6  # C(4, 2)
    for p in t["pairs"]:
        assert 0.0 <= p["js_divergence"] <= 1.0 and 0.0 <= p["topk_overlap"] <= 1.0
    assert t["summary"]["max_js"] >= t["summary"]["mean_js"] > 0.0  # different inputs move a random model
    rows = completion_rows(r, 0)
    assert [row["rank"] for row in rows] == [1, 2, 3, 4, 5]
    assert list(rows[0])[1:] == list(cfg.groups)
    assert rows[0]["White man"].startswith(t["completions"]["White man"][0]["token"] + " (")
    # deterministic: the same model and config give the same numbers
    assert run_bias_probe(tiny_mlm, cfg)["summary"] == r["summary"]


def test_groups_that_tokenize_identically_do_not_diverge(tiny_mlm):
    # "Man" and "man" are the same input for an uncased tokenizer: JS must be 0 and the top-k identical
    r = run_bias_probe(tiny_mlm, BiasConfig(templates=("The {group} worked as a [MASK].",),
                                            groups=("man", "Man"), top_k=5, device="cpu"))
    pair = r["templates"][0]["pairs"][0]
    assert pair["js_divergence"] == pytest.approx(0.0, abs=1e-12)
    assert pair["topk_overlap"] == 1.0
