"""``fill-mask --fast`` on CPUs without native bf16 (``--quantize int8``): the encoder in int8 on ONNX Runtime.

``--fast`` picks its mode per machine (``config.fast_mode``): on CPUs with AVX512-BF16 or AMX the trunk runs
under torch's bf16 autocast instead (``fill_mask.bf16_parts``: 3.0-3.2x float32 on a DistilBERT-size trunk on
this project's AMD EPYC host, closer to float32 than int8). This module is the int8 path, chosen for CPUs
without native bf16. Measured before choosing it (DistilBERT size, one 64 x 93 batch, one thread, a 2-core
Xeon with AVX512 and VNNI but *no* AVX512-BF16 or AMX), CPU time per batch:

=============================================  =========  ==========================================
fp32 (torch, the exact mode)                   4.4-5.0 s
bf16 autocast (torch)                          17.9 s     no native bf16 there: emulated, 4x slower
torchao 0.18 Int8DynamicActivationInt8Weight    6.4 s      its CPU path is slower than fp32
our own int8 on ``torch._int_mm``              4.6 s      the GEMM is 2.5x faster, but unfused rescaling
                                                          of the int32 output costs it all back
``torch.ao`` dynamic int8 (fbgemm)             2.1-2.4 s  deprecated, due for removal
ONNX Runtime 1.31 dynamic int8 (VNNI)          2.3 s      maintained; chosen
=============================================  =========  ==========================================

So: every encoder layer but the last is exported once to ONNX (opset 17), its MatMuls quantized to int8
(weights per tensor, activations dynamic: ``onnxruntime.quantization.quantize_dynamic``), and run on ONNX
Runtime; the last layer (queries at the masks only) and the MLM head stay in torch float32, so the fast
mode keeps the exact mode's mask-only saving. The export is cached under ``$DISTILFLOW_CACHE`` (default
``~/.cache/distilflow``) keyed by the model files' sizes and times and the library versions: the first
``--fast`` run on a model pays ~20 s, later ones load the cached file.

Answers are approximate: the fill-mask job measures top-1 agreement with the exact mode on the first
window and reports it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)
EXPORT_VERSION = 1
_LOCK = threading.Lock()


class _Trunk(nn.Module):
    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def cache_root() -> Path:
    return Path(os.environ.get("DISTILFLOW_CACHE") or Path.home() / ".cache" / "distilflow")


def _key(model_dir: str) -> str:
    import onnxruntime

    files = sorted(p for p in Path(model_dir).iterdir() if p.suffix in (".safetensors", ".json"))
    ident = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    blob = json.dumps([os.path.abspath(model_dir), ident, torch.__version__, onnxruntime.__version__,
                       EXPORT_VERSION])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def export_fp32(trunk: nn.Module, path: Path) -> None:
    """``trunk`` as a float32 ONNX graph (TorchScript exporter, opset 17, batch and length dynamic)."""
    ids = torch.full((2, 8), 1000, dtype=torch.long)
    att = torch.ones((2, 8), dtype=torch.long)
    with torch.no_grad():
        torch.onnx.export(_Trunk(trunk).eval(), (ids, att), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["hidden"], opset_version=17, dynamo=False,
                          dynamic_axes={n: {0: "batch", 1: "length"} for n in ("input_ids", "attention_mask",
                                                                               "hidden")})


def int8_trunk_file(trunk: nn.Module, model_dir: str) -> Path:
    """The int8 ONNX file of ``trunk`` (exported and quantized on first use, then cached)."""
    out = cache_root() / "fast" / _key(model_dir) / "trunk.int8.onnx"
    with _LOCK:
        if out.exists():
            return out
        from onnxruntime.quantization import QuantType, quantize_dynamic

        out.parent.mkdir(parents=True, exist_ok=True)
        fp32 = out.with_name(f".trunk.fp32.{os.getpid()}.onnx")
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        log.info("--fast: exporting the encoder of %s to int8 ONNX (once; cached in %s)", model_dir, out.parent)
        export_fp32(trunk, fp32)
        quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8)
        fp32.unlink(missing_ok=True)
        tmp.replace(out)  # atomic: a killed export leaves no half file under the final name
        return out


class OrtTrunk:
    """``trunk(input_ids, attention_mask) -> hidden (B, L, H)`` on ONNX Runtime; safe to call from threads."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads  # 0 = ORT's default (all cores)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        feed: dict[str, Any] = {"input_ids": input_ids.cpu().numpy().astype(np.int64),
                                "attention_mask": attention_mask.cpu().numpy().astype(np.int64)}
        return torch.from_numpy(self.session.run(None, feed)[0])
