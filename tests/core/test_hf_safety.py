"""Model folders are checked before loading: safetensors only, one clear line for what is missing."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from distilflow.tasks.core.errors import InputError
from distilflow.tasks.core.hf import load_pretrained


def _tiny(tmp_path, safe: bool):
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    model = BertForMaskedLM(cfg)
    out = tmp_path / ("safe" if safe else "pickle")
    if safe:
        model.save_pretrained(out)
    else:  # what an old checkpoint looks like: config.json + pytorch_model.bin
        out.mkdir()
        cfg.save_pretrained(out)
        torch.save(model.state_dict(), out / "pytorch_model.bin")
    return out


def test_safetensors_folder_loads(tmp_path):
    m = load_pretrained(BertForMaskedLM, str(_tiny(tmp_path, safe=True)))
    assert m.config.hidden_size == 16


def test_pickle_only_folder_is_refused_with_the_conversion(tmp_path):
    path = _tiny(tmp_path, safe=False)
    with pytest.raises(InputError, match=r"pickle weights only \(pytorch_model.bin\).*save_pretrained"):
        load_pretrained(BertForMaskedLM, str(path))


@pytest.mark.parametrize("name", ["missing", "runs/studnt"])
def test_missing_folder_is_named_not_called_a_hub_id(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    target = str(tmp_path / name) if name == "missing" else name
    with pytest.raises(InputError, match="no such model folder"):
        load_pretrained(BertForMaskedLM, target)


def test_folder_without_config_or_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        load_pretrained(BertForMaskedLM, str(tmp_path / "empty"))
    BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
               intermediate_size=8).save_pretrained(tmp_path / "noweights")
    with pytest.raises(InputError, match="no model weights"):
        load_pretrained(BertForMaskedLM, str(tmp_path / "noweights"))
