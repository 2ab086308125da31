"""Held-out masked-token accuracy during and after training (fixed batches: same numbers every call)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from distilflow.tasks.prepare.masking import IGNORE_INDEX


def student_head(student: Any, h: torch.Tensor) -> torch.Tensor:
    """DistilBertForMaskedLM's MLM head on hidden states [N, H] -> logits [N, V]."""
    return student.vocab_projector(student.vocab_layer_norm(student.activation(student.vocab_transform(h))))


@torch.no_grad()
def mlm_logits(model: Any, batch: dict[str, torch.Tensor], sel: torch.Tensor) -> torch.Tensor:
    """MLM logits [N, V] at positions ``sel`` [B, L] of a BERT (ForPreTraining/ForMaskedLM) or DistilBERT."""
    if hasattr(model, "distilbert"):
        h = model.distilbert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return student_head(model, h[sel])
    h = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   token_type_ids=batch["token_type_ids"]).last_hidden_state
    return model.cls.predictions(h[sel])


@torch.no_grad()
def evaluate_mlm(model: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device,
                 autocast: contextlib.AbstractContextManager | None = None) -> dict[str, float]:
    """Masked-token accuracy / loss over fixed batches, plus the best constant predictor's accuracy."""
    was_training = model.training
    model.eval()
    n = correct = 0
    loss_sum = 0.0
    label_counts: dict[int, int] = {}
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        sel = b["labels"] != IGNORE_INDEX
        with autocast or contextlib.nullcontext():
            logits = mlm_logits(model, b, sel).float()
        y = b["labels"][sel]
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        n += int(y.numel())
        for t, c in zip(*torch.unique(y, return_counts=True), strict=True):
            label_counts[int(t)] = label_counts.get(int(t), 0) + int(c)
    model.train(was_training)
    majority = max(label_counts.values()) / n if n else 0.0
    return {"masked_tokens": n, "accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1),
            "majority_baseline": majority}
