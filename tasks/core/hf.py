"""Thread-safe ``from_pretrained`` for models, and the ``--device`` rule every model job shares.

transformers 5 loads a model by patching process-global state for the duration of the call
(``torch.nn.init`` functions swapped for no-ops, weight tying switched off) and restoring it on exit.
Two threads loading at once restore each other's *patched* versions: one model comes back with an
untied, still-on-``meta`` MLM decoder, and every model built afterwards in that process keeps
uninitialised weights. Prefect runs tasks in threads, so every model load in distilflow goes
through :func:`load_pretrained`, which holds one process-wide lock.
"""

from __future__ import annotations

import threading
from typing import Any, TypeVar

import torch

T = TypeVar("T")

_LOAD_LOCK = threading.RLock()


def load_pretrained(cls: Any, path: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(path, **kwargs)`` under the process-wide model-loading lock."""
    with _LOAD_LOCK:
        return cls.from_pretrained(path, **kwargs)


def build_model(cls: type[T], config: Any) -> T:
    """``cls(config)`` (random init) under the same lock, so a concurrent load cannot no-op its init."""
    with _LOAD_LOCK:
        return cls(config)  # type: ignore[call-arg]


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when visible, else CPU; ``cpu`` / ``cuda`` / ``cuda:N`` as given, failing fast when CUDA
    is asked for but not there."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} was requested but no CUDA device is visible; use --device cpu/auto")
    return torch.device(device)
