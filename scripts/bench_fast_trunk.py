"""Benchmark: the ``--fast`` trunk (all encoder layers but the last, reduced precision) against float32 torch.

One batch of 64 rows x 93 tokens (half the rows padded after 60 tokens), random weights, the same batch for
every variant, timed in this process after one warm-up call (3 calls, mean), at 1 and 2 threads:

* ``torch fp32``: the exact mode's trunk (``tasks/infer/fill_mask.trunk_of``), the baseline of every ratio;
* ``torch bf16 autocast``: what ``--fast`` runs on CPUs with native bf16 (``fill_mask.bf16_parts``);
* ``int8``: what ``--fast`` runs elsewhere (``tasks/infer/fast.int8_trunk_file``: ``export_fp32``, then
  ``quantize_dynamic`` QInt8 weights);
* ``fused fp32`` / ``fused int8``: the same export with eager attention, passed through ONNX Runtime's
  transformer optimizer (``onnxruntime.transformers.optimizer.optimize_model``, model type ``bert``:
  fused Attention, SkipLayerNormalization, BiasGelu, EmbedLayerNormalization) before quantizing.

Each variant's error against torch at the unpadded positions is printed (max |diff|, min cosine).

    python scripts/bench_fast_trunk.py --size distilbert
    python scripts/bench_fast_trunk.py --size bert-base
    python scripts/bench_fast_trunk.py --size distilbert --no-fused     # bf16, int8 and fp32 only
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def build(size: str, attn: str):
    from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

    torch.manual_seed(0)
    if size == "distilbert":
        return DistilBertForMaskedLM(DistilBertConfig(attn_implementation=attn)).eval()
    return BertForMaskedLM(BertConfig(attn_implementation=attn)).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["distilbert", "bert-base"], default="distilbert")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--no-fused", action="store_true", help="skip the ONNX Runtime optimizer variants")
    args = ap.parse_args()

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from distilflow.tasks.infer.fast import export_fp32 as export
    from distilflow.tasks.infer.fill_mask import trunk_of

    work = Path(tempfile.mkdtemp(prefix="bench-fast-trunk-"))
    atexit.register(shutil.rmtree, work, True)  # the ONNX files (~0.5-1 GB for BERT-base) go with the run
    model = build(args.size, "sdpa")  # what fill-mask loads
    trunk = trunk_of(model)
    assert trunk is not None
    export(trunk, work / "fp32.onnx")
    quantize_dynamic(str(work / "fp32.onnx"), str(work / "int8.onnx"), weight_type=QuantType.QInt8)
    variants = {"int8 (--fast without native bf16)": work / "int8.onnx"}

    if not args.no_fused:
        add_fused(args.size, model, work, variants)
    run(args, trunk, variants)


def add_fused(size: str, model, work: Path, variants: dict[str, Path]) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    from distilflow.tasks.infer.fast import export_fp32 as export
    from distilflow.tasks.infer.fill_mask import trunk_of

    eager = trunk_of(build(size, "eager"))  # same seed: same weights; eager attention is what the optimizer fuses
    export(eager, work / "eager.onnx")
    cfg = model.config
    fused = optimize_model(str(work / "eager.onnx"), model_type="bert", num_heads=cfg.num_attention_heads if
                           hasattr(cfg, "num_attention_heads") else cfg.n_heads,
                           hidden_size=cfg.hidden_size if hasattr(cfg, "hidden_size") else cfg.dim)
    print("fused operators:", {k: v for k, v in fused.get_fused_operator_statistics().items() if v})
    fused.save_model_to_file(str(work / "fused.onnx"))
    # the fused contrib ops have no ONNX shape inference: tell the quantizer their outputs are float
    quantize_dynamic(str(work / "fused.onnx"), str(work / "fused-int8.onnx"), weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    variants["fused fp32"] = work / "fused.onnx"
    variants["fused int8"] = work / "fused-int8.onnx"


def run(args: argparse.Namespace, trunk, variants: dict[str, Path]) -> None:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    B, L = 64, 93
    x = torch.tensor(rng.integers(1000, 20000, size=(B, L)))
    am = torch.ones((B, L), dtype=torch.long)
    am[B // 2:, 60:] = 0
    keep = am.bool()
    from distilflow.tasks.infer.config import fast_mode

    print(f"{args.size}, batch {B} x {L}, {os.cpu_count()} CPUs (--fast here: {fast_mode()}), onnxruntime "
          f"{ort.__version__}, torch {torch.__version__}")
    print("| threads | variant | s/batch | CPU s/batch | vs torch fp32 | max abs err | min cosine |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.no_grad():
            ref = trunk(input_ids=x, attention_mask=am).last_hidden_state
            t, c = time.perf_counter(), time.process_time()
            for _ in range(args.calls):
                trunk(input_ids=x, attention_mask=am)
            base = (time.perf_counter() - t) / args.calls
            print(f"| {threads} | torch fp32 | {base:.3f} | {(time.process_time() - c) / args.calls:.3f} | 1.00x | | |")
            with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
                out = trunk(input_ids=x, attention_mask=am).last_hidden_state.float()  # warm-up, compared
                t, c = time.perf_counter(), time.process_time()
                for _ in range(args.calls):
                    trunk(input_ids=x, attention_mask=am)
                s = (time.perf_counter() - t) / args.calls
            err = (out - ref).abs()[keep].max().item()
            cos = torch.nn.functional.cosine_similarity(out[keep], ref[keep], dim=-1).min().item()
            print(f"| {threads} | torch bf16 autocast | {s:.3f} | {(time.process_time() - c) / args.calls:.3f} | "
                  f"{base / s:.2f}x | {err:.3g} | {cos:.5f} |")
        for name, path in variants.items():
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            feed = {"input_ids": x.numpy(), "attention_mask": am.numpy()}
            out = torch.from_numpy(sess.run(None, feed)[0])  # warm-up, and the output compared
            t, c = time.perf_counter(), time.process_time()
            for _ in range(args.calls):
                sess.run(None, feed)
            s = (time.perf_counter() - t) / args.calls
            err = (out - ref).abs()[keep].max().item()
            cos = torch.nn.functional.cosine_similarity(out[keep], ref[keep], dim=-1).min().item()
            print(f"| {threads} | {name} | {s:.3f} | {(time.process_time() - c) / args.calls:.3f} | "
                  f"{base / s:.2f}x | {err:.3g} | {cos:.5f} |")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
