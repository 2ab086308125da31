"""Model loading is safe from Prefect's task threads (tasks/hf.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import BertConfig, BertForMaskedLM

from distilflow.tasks.core.hf import build_model, load_pretrained

TINY = dict(vocab_size=512, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=32)


def _check_loaded(m: BertForMaskedLM) -> None:
    w = m.cls.predictions.decoder.weight
    assert w.device.type == "cpu", "MLM decoder left on the meta device (weight tying skipped)"
    assert w.data_ptr() == m.bert.embeddings.word_embeddings.weight.data_ptr()


def test_concurrent_loads_in_threads_tie_weights_and_leave_init_intact(tmp_path):
    torch.manual_seed(0)
    build_model(BertForMaskedLM, BertConfig(**TINY)).save_pretrained(tmp_path)
    # transformers patches torch.nn.init and weight tying globally while loading; without the lock, 8
    # threads interleave those patches and some loads come back with an untied meta decoder
    with ThreadPoolExecutor(8) as pool:
        models = list(pool.map(lambda _: load_pretrained(BertForMaskedLM, str(tmp_path)), range(32)))
    for m in models:
        _check_loaded(m)
    # ... and the process's initialisers are the real ones again: a fresh model is randomly initialised
    fresh = BertForMaskedLM(BertConfig(**TINY))
    std = fresh.bert.encoder.layer[0].attention.self.query.weight.std().item()
    assert abs(std - 0.02) < 0.01, f"query weights std {std}: torch.nn.init left patched to a no-op"
