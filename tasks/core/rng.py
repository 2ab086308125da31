"""Deterministic random streams keyed by names, not by worker rank or execution order."""

from __future__ import annotations

import hashlib

import numpy as np


def derive_rng(seed: int, *keys: str | int) -> np.random.Generator:
    """``derive_rng(0, "pairs", "part-00001-0000")``: same arguments -> same stream, on any worker."""
    digest = hashlib.sha256(repr((int(seed), *keys)).encode()).digest()
    return np.random.default_rng(np.random.SeedSequence(int.from_bytes(digest[:16], "little")))
