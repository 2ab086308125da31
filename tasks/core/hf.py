"""Thread-safe ``from_pretrained`` for models, and the ``--device`` rule every model job shares.

transformers 5 loads a model by patching process-global state for the duration of the call
(``torch.nn.init`` functions swapped for no-ops, weight tying switched off) and restoring it on exit.
Two threads loading at once restore each other's *patched* versions: one model comes back with an
untied, still-on-``meta`` MLM decoder, and every model built afterwards in that process keeps
uninitialised weights. Prefect runs tasks in threads, so every model load in distilflow goes
through :func:`load_pretrained`, which holds one process-wide lock.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from distilflow.tasks.core.errors import ConfigError, InputError

if TYPE_CHECKING:
    import torch  # imported where a device is resolved: the folder checks run in processes without torch

T = TypeVar("T")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")

_LOAD_LOCK = threading.RLock()


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX512-BF16 or AMX in ``/proc/cpuinfo``).
    Elsewhere torch emulates bf16 on the CPU, several times *slower* than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def require_native_bf16(field: str, fix: str) -> None:
    """Refuse bf16 autocast on a CPU that would emulate it (slower than float32): one line naming ``field``
    (``Class.field``) and the ``fix``."""
    if not cpu_has_native_bf16():
        raise ConfigError(f"{field}: bf16 on this CPU would be emulated (no avx512_bf16/amx_bf16 in /proc/cpuinfo), "
                          f"slower than fp32; {fix}")


def check_model_folder(path: str) -> None:
    """Refuse, with one line naming the folder and the fix, what ``from_pretrained`` would load unsafely or
    report confusingly: a missing folder (transformers calls it an invalid hub repo id), a folder without
    ``config.json``, and pickle-only weights (``pytorch_model.bin``: distilflow loads safetensors only)."""
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise InputError(f"{path}: is a file; give the model folder (with config.json and model.safetensors)")
        raise InputError(f"{path}: no such model folder (distilflow loads saved model folders; no model hub "
                         "is contacted)")
    names = set(os.listdir(path))
    if "config.json" not in names:
        raise InputError(f"{path}: no config.json; give a folder written by save_pretrained (e.g. a "
                         "`distilflow pretrain` output)")
    if not any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        pickled = sorted(names & set(PICKLE_WEIGHTS))
        if pickled:
            raise InputError(
                f"{path}: holds pickle weights only ({', '.join(pickled)}); distilflow loads safetensors only. "
                "Convert once where you trust the file: python -c \"from transformers import AutoModel; "
                f"AutoModel.from_pretrained('{path}').save_pretrained('{path}', safe_serialization=True)\"")
        raise InputError(f"{path}: no model weights (model.safetensors) in the folder")


def check_tokenizer_folder(path: str) -> None:
    """A local tokenizer folder whose ``tokenizer.json`` does not load is named with the fix, before any
    output is written (instead of a JSONDecodeError traceback from inside the run)."""
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        return
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(file)
    except Exception as e:  # tokenizers raises plain Exception subclasses for a bad file
        raise InputError(f"{file}: not a valid tokenizer file ({' '.join(str(e).split())[:120]}); copy the "
                         "folder again or re-save it with save_pretrained") from e


def check_model(path: str) -> None:
    """Everything a model job can check before it writes anything: the folder (:func:`check_model_folder`)
    and its tokenizer. Hub ids and remote folders are checked when they load."""
    if "://" in path or _is_hub_id(path):
        return
    check_model_folder(path)
    check_tokenizer_folder(path)


def local_model(path: str) -> str:
    """A local folder for a model/tokenizer ``path``: ``s3://`` (any fsspec URL) folders are fetched into
    the verified local cache (:func:`distilflow.tasks.core.remote.local_copy`); local paths and hub ids
    are returned unchanged. Jobs call it once and pass the result to every ``from_pretrained``."""
    if "://" not in path or path.startswith("file://"):
        return path
    from distilflow.tasks.core.remote import local_copy

    return local_copy(path)


def load_pretrained(cls: Any, path: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(path, use_safetensors=True, **kwargs)`` under the process-wide loading lock.

    ``s3://`` folders load through the local cache (:func:`local_model`). Local folders are checked
    first (:func:`check_model_folder`); pickle weights are never read."""
    path = local_model(path)
    hub = _is_hub_id(path)
    if not hub:
        check_model_folder(path)
    with _LOAD_LOCK:
        try:
            return cls.from_pretrained(path, use_safetensors=True, **kwargs)
        except OSError as e:
            if not hub:
                raise
            raise InputError(f"{path}: no such local model folder, and the model hub has no such model or "
                             f"cannot be reached ({' '.join(str(e).split())[:200]})") from e


def _is_hub_id(path: str) -> bool:
    """``org/name`` or ``name`` that is not a local path: only meaningful where a model hub is reachable."""
    return (not os.path.exists(path) and not path.startswith(("/", ".", "~")) and path.count("/") <= 1
            and not os.path.exists(path.split("/")[0])  # runs/studnt: a typo in a local path, not a hub id
            and os.environ.get("HF_HUB_OFFLINE", "0") != "1" and "://" not in path)


def build_model(cls: type[T], config: Any) -> T:
    """``cls(config)`` (random init) under the same lock, so a concurrent load cannot no-op its init."""
    with _LOAD_LOCK:
        return cls(config)  # type: ignore[call-arg]


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when visible, else CPU; ``cpu`` / ``cuda`` / ``cuda:N`` as given, failing fast when CUDA
    is asked for but not there."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} was requested but no CUDA device is visible; use --device cpu/auto")
    return torch.device(device)
