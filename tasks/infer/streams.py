"""Batches in parallel on a CPU: one batch per core, each on one thread, instead of every core on one batch.

A length-sorted fill-mask batch of short rows is a small matrix product (64 rows x 10-40 tokens x 768):
torch's intra-op threads split it into pieces that are too small to keep two cores busy, and their
OpenMP spin-waits burn the other core's time whenever the machine has other work (measured on 2 shared
cores, BERT-base, 400 LAMA rows: 14.8 CPU-s with 2 intra-op threads, 5.6 CPU-s with 1). So on a CPU the
jobs run ``threads`` batches at once (default: torch's thread count, i.e. the cores), each with one
intra-op thread; the GEMMs release the GIL, so the Python threads do not serialise. Results come back in
batch order, so outputs do not depend on how many streams ran (each batch is computed alone either way).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_DEFAULT_THREADS = torch.get_num_threads()  # torch's default (physical cores), before anyone changes it
_LOCK = threading.Lock()


def streams_for(device: torch.device, threads: int) -> int:
    """Batches run at once: ``threads`` (0 = torch's default) on a CPU, one on a GPU."""
    if device.type != "cpu":
        return 1
    return max(1, threads or _DEFAULT_THREADS)


@contextmanager
def one_thread_per_batch(streams: int) -> Iterator[None]:
    """torch intra-op threads = 1 while several batches run at once (restored afterwards)."""
    if streams <= 1:
        yield
        return
    with _LOCK:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
    try:
        yield
    finally:
        with _LOCK:
            torch.set_num_threads(before)


def map_batches(fn: Callable[[T], R], batches: Sequence[T], streams: int) -> list[R]:
    """``[fn(b) for b in batches]``, ``streams`` at a time, results in batch order."""
    if streams <= 1 or len(batches) <= 1:
        return [fn(b) for b in batches]
    with one_thread_per_batch(streams), ThreadPoolExecutor(streams, thread_name_prefix="batch") as pool:
        return list(pool.map(fn, batches))
