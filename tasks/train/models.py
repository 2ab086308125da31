"""Model shapes for the teacher (BERT) and the student (DistilBERT), and student init from a teacher.

* Teacher presets: ``tiny`` (2 x 64, for tests), ``mini`` (4 x 256, CPU demo), ``base`` (12 x 768,
  BERT-base), or a path to a ``config.json`` (a BertConfig, e.g. one written by ``save_pretrained``).
* The student config is derived from the teacher's: same width, heads, FFN size, vocabulary and
  positions; fewer layers (DistilBERT: half). No token-type embeddings, no pooler, no NSP head.
* :func:`init_student_from_teacher` copies the embeddings (word + position + LayerNorm; the
  token-type table is dropped, as in DistilBERT's extraction script), the teacher layers named by
  ``student_layers`` (student layer i <- teacher layer ``student_layers[i]``) and the MLM head.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from transformers import BertConfig, DistilBertConfig, DistilBertForMaskedLM, PreTrainedModel

from distilflow.tasks.core.errors import ConfigError
from distilflow.tasks.core.hf import build_model
from distilflow.tasks.train.config import PRESETS

DISTILBERT_LAYERS_12 = (0, 2, 4, 7, 9, 11)  # the layers DistilBERT took from BERT-base


def teacher_config(spec: str, vocab_size: int, max_position_embeddings: int = 512,
                   pad_token_id: int = 0, dropout: float = 0.1) -> BertConfig:
    """A BertConfig from a preset name or a path to a config.json (``vocab_size`` must match there)."""
    if spec in PRESETS:
        layers, hidden, heads, ffn = PRESETS[spec]
        return BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, intermediate_size=ffn,
                          max_position_embeddings=max_position_embeddings, pad_token_id=pad_token_id,
                          hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    if "://" in spec and not spec.startswith("file://"):  # a config .json in a bucket
        from distilflow.tasks.core.io import exists, read_json

        path = spec
        if not exists(path):
            raise ConfigError(f"TrainConfig.model: --config {spec!r}: no such config file")
        raw: dict[str, Any] = read_json(path)
    else:
        path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
        if not os.path.isfile(path):
            raise ConfigError(f"TrainConfig.model: --config {spec!r}: not a preset ({', '.join(PRESETS)}) and no "
                              "such config file")
        with open(path) as f:
            raw = json.load(f)
    if raw.get("model_type", "bert") != "bert":
        raise ConfigError(f"{path}: model_type {raw.get('model_type')!r}; the teacher must be a BERT config")
    cfg = BertConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "transformers_version")})
    if cfg.vocab_size != vocab_size:
        raise ConfigError(f"{path}: vocab_size {cfg.vocab_size} != tokenizer's {vocab_size}; "
                         "the data was prepared with another tokenizer")
    return cfg


def default_student_layers(n_teacher_layers: int) -> tuple[int, ...]:
    """DistilBERT's (0,2,4,7,9,11) for 12 layers; every other layer (0,2,4,...) otherwise."""
    if n_teacher_layers == 12:
        return DISTILBERT_LAYERS_12
    return tuple(range(0, n_teacher_layers, 2))


def check_student_layers(layers: tuple[int, ...], n_teacher_layers: int) -> None:
    if not layers:
        raise ConfigError("TrainConfig.student_layers: at least one layer is needed")
    bad = [i for i in layers if not 0 <= i < n_teacher_layers]
    if bad:
        raise ConfigError(f"TrainConfig.student_layers: {bad} out of range for a {n_teacher_layers}-layer teacher "
                         f"(valid: 0..{n_teacher_layers - 1})")
    if list(layers) != sorted(set(layers)):
        raise ConfigError(f"TrainConfig.student_layers: {list(layers)} must be strictly increasing")


def student_config(teacher: BertConfig, n_layers: int) -> DistilBertConfig:
    """DistilBERT config with the teacher's width/heads/FFN/vocab/positions and ``n_layers`` layers."""
    if teacher.hidden_act not in ("gelu", "relu"):
        raise ValueError(f"teacher hidden_act {teacher.hidden_act!r}: DistilBERT supports gelu or relu")
    return DistilBertConfig(
        vocab_size=teacher.vocab_size, max_position_embeddings=teacher.max_position_embeddings,
        sinusoidal_pos_embds=False, n_layers=n_layers, n_heads=teacher.num_attention_heads,
        dim=teacher.hidden_size, hidden_dim=teacher.intermediate_size, dropout=teacher.hidden_dropout_prob,
        attention_dropout=teacher.attention_probs_dropout_prob, activation=teacher.hidden_act,
        initializer_range=teacher.initializer_range, pad_token_id=teacher.pad_token_id,
        tie_word_embeddings=True,
    )


def student_state_from_teacher(teacher_sd: dict[str, torch.Tensor], layers: tuple[int, ...]
                               ) -> dict[str, torch.Tensor]:
    """Map a BERT (ForPreTraining / ForMaskedLM) state dict to DistilBertForMaskedLM keys."""
    t, s = "bert.", "distilbert."
    out = {
        s + "embeddings.word_embeddings.weight": teacher_sd[t + "embeddings.word_embeddings.weight"],
        s + "embeddings.position_embeddings.weight": teacher_sd[t + "embeddings.position_embeddings.weight"],
        s + "embeddings.LayerNorm.weight": teacher_sd[t + "embeddings.LayerNorm.weight"],
        s + "embeddings.LayerNorm.bias": teacher_sd[t + "embeddings.LayerNorm.bias"],
    }
    per_layer = {  # DistilBERT name -> BERT name inside one layer
        "attention.q_lin": "attention.self.query",
        "attention.k_lin": "attention.self.key",
        "attention.v_lin": "attention.self.value",
        "attention.out_lin": "attention.output.dense",
        "sa_layer_norm": "attention.output.LayerNorm",
        "ffn.lin1": "intermediate.dense",
        "ffn.lin2": "output.dense",
        "output_layer_norm": "output.LayerNorm",
    }
    for i, j in enumerate(layers):
        for dst, src in per_layer.items():
            for p in ("weight", "bias"):
                out[f"{s}transformer.layer.{i}.{dst}.{p}"] = teacher_sd[f"{t}encoder.layer.{j}.{src}.{p}"]
    head = {
        "vocab_transform.weight": "cls.predictions.transform.dense.weight",
        "vocab_transform.bias": "cls.predictions.transform.dense.bias",
        "vocab_layer_norm.weight": "cls.predictions.transform.LayerNorm.weight",
        "vocab_layer_norm.bias": "cls.predictions.transform.LayerNorm.bias",
        "vocab_projector.bias": "cls.predictions.bias",
    }
    out.update({dst: teacher_sd[src] for dst, src in head.items()})
    # vocab_projector.weight is tied to the word embeddings (as the teacher's decoder is).
    out["vocab_projector.weight"] = out[s + "embeddings.word_embeddings.weight"]
    return {k: v.detach().clone() for k, v in out.items()}


def init_student_from_teacher(teacher: PreTrainedModel, layers: tuple[int, ...] | None = None
                              ) -> DistilBertForMaskedLM:
    """A DistilBertForMaskedLM whose weights are copied from ``teacher`` (a BERT model)."""
    tcfg: Any = teacher.config
    if getattr(tcfg, "model_type", None) != "bert":
        raise ValueError(f"student init needs a BERT teacher, got model_type {tcfg.model_type!r}")
    layers = tuple(layers) if layers is not None else default_student_layers(tcfg.num_hidden_layers)
    check_student_layers(layers, tcfg.num_hidden_layers)
    student = build_model(DistilBertForMaskedLM, student_config(tcfg, len(layers)))
    sd = student_state_from_teacher(teacher.state_dict(), layers)
    missing, unexpected = student.load_state_dict(sd, strict=False)
    if unexpected or missing:
        raise RuntimeError(f"student init: missing {missing}, unexpected {unexpected}")
    student.tie_weights()
    return student


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matmul_params(n_layers: int, hidden: int, ffn: int) -> int:
    """Weights that take part in a matmul per token in the encoder (4 H^2 attention + 2 H F FFN)."""
    return n_layers * (4 * hidden * hidden + 2 * hidden * ffn)


def forward_flops_per_token(n_layers: int, hidden: int, ffn: int, seq_len: int,
                            vocab: int, head_frac: float = 1.0) -> float:
    """Forward FLOPs per token: 2 x matmul params + attention (QK^T and AV: 4 L H S) + the MLM head
    (transform H^2 + decoder H V) on ``head_frac`` of the tokens. Training = 3 x forward."""
    encoder = 2 * matmul_params(n_layers, hidden, ffn) + 4 * n_layers * hidden * seq_len
    head = 2 * (hidden * hidden + hidden * vocab) * head_frac
    return float(encoder + head)
