"""AdamW with BERT's schedule: linear warmup to the peak learning rate, then linear decay to 0."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from distilflow.tasks.train.config import TrainConfig


def warmup_linear(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and LayerNorm weights (1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(cfg: TrainConfig, model: nn.Module, total: int, fused: bool
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (fused on CUDA) and its schedule over ``total`` steps (warmup: steps, or a ratio of them)."""
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else int(cfg.warmup_ratio * total)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.adam_betas,
                                  eps=cfg.adam_eps, fused=fused)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(warmup, total))
