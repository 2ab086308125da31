"""Benchmark: batch fill-mask (tasks/fill_mask.py) vs ``transformers.pipeline("fill-mask", batch_size=32)``.

Same rows, same model, same process, alternating in chunks; prints rows/s of each, the ratio, whether the
answers are identical (top-k tokens equal on every row, scores within 1e-4), and the opt-in int8 mode's
speed and top-1 agreement with float32.

The model is DistilBERT-size (``DistilBertConfig()`` defaults: 6 layers, dim 768, vocab 30,522) with random
weights, saved and loaded with ``from_pretrained``; rows are real sentences from the shared Gutenberg books
with one (sometimes two) words masked.

    python scripts/bench_fill_mask.py --rows 300 --threads 1

Times are process CPU seconds (``time.process_time``): with one thread that is the wall time of an idle
machine, and other jobs on a shared machine do not distort it. ``--wall`` reports wall-clock instead.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    sents: list[str] = []
    for book in sorted((SHARED / "corpus" / "gutenberg").glob("pg*.txt")):
        text = book.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        for para in text.split("\n\n"):
            para = " ".join(para.split())
            sents.extend(s for s in re.split(r"(?<=[.!?])\s+", para) if 4 <= len(s.split()) <= 80)
    out = []
    for s in rng.sample(sents, n):
        words = s.split()
        for j in rng.sample(range(len(words)), 2 if rng.random() < 0.1 else 1):
            words[j] = "[MASK]"
        out.append(" ".join(words))
    return out


def same(ours, ref, tol: float = 1e-4) -> bool:
    if ref and isinstance(ref[0], list):
        return isinstance(ours[0], list) and len(ours) == len(ref) and all(
            same(o, r, tol) for o, r in zip(ours, ref, strict=True))
    return ([p["token"] for p in ours] == [p["token"] for p in ref]
            and [p["sequence"] for p in ours] == [p["sequence"] for p in ref]
            and all(abs(o["score"] - r["score"]) < tol for o, r in zip(ours, ref, strict=True)))


def top1(out) -> list[int]:
    return [p[0]["token"] for p in (out if isinstance(out[0], list) else [out])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=300, help="rows to score (default 300)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both (default 1: CPU time then equals work, robust on a shared machine)")
    ap.add_argument("--batch-size", type=int, default=16,
                    help="our batch size, length-sorted (the pipeline gets 32) (default 16)")
    ap.add_argument("--chunks", type=int, default=1,
                    help="alternate pipeline/ours over this many chunks (default 1: each gets all rows at once)")
    ap.add_argument("--init-range", type=float, default=0.02,
                    help="initializer_range of the random weights (default 0.02, DistilBERT's)")
    ap.add_argument("--seed", type=int, default=0, help="row sample / weights seed (default 0)")
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 mode")
    ap.add_argument("--wall", action="store_true", help="measure wall-clock time instead of CPU time")
    args = ap.parse_args()
    clock = time.perf_counter if args.wall else time.process_time

    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForMaskedLM, pipeline

    from distilflow.tasks.infer.fill_mask import FillMaskConfig, FillMasker

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    texts = sentences(args.rows, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tok = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "bert-base-uncased"))
        DistilBertForMaskedLM(DistilBertConfig(initializer_range=args.init_range)).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        lens = [len(x) for x in tok(texts)["input_ids"]]
        print(f"{len(texts)} rows, tokens/row min {min(lens)} mean {sum(lens) / len(lens):.1f} max {max(lens)}; "
              f"threads={args.threads}; {'wall' if args.wall else 'CPU'} time; torch {torch.__version__}; device cpu")

        pipe = pipeline("fill-mask", model=tmp, tokenizer=tmp, device="cpu")
        ours = FillMasker(FillMaskConfig(model=tmp, batch_size=args.batch_size, device="cpu"))
        pipe(texts[:8], batch_size=8)  # warm-up
        ours(texts[:8])

        # interleave the two in chunks so that load changes on a shared machine hit both alike
        ref, got, t_pipe, t_ours = [], [], 0.0, 0.0
        step = max(1, len(texts) // args.chunks)
        for i in range(0, len(texts), step):
            chunk = texts[i:i + step]
            t0 = clock()
            ref.extend(pipe(chunk, batch_size=32) if len(chunk) > 1 else [pipe(chunk[0])])
            t_pipe += clock() - t0
            t0 = clock()
            got.extend(ours(chunk))
            t_ours += clock() - t0
        identical = sum(same(o, r) for o, r in zip(got, ref, strict=True))
        print(f"pipeline(batch_size=32): {len(texts) / t_pipe:8.1f} rows/s ({t_pipe:.1f} s)")
        print(f"distilflow fill-mask:    {len(texts) / t_ours:8.1f} rows/s ({t_ours:.1f} s)")
        print(f"ratio ours/pipeline:     {t_pipe / t_ours:8.2f}x")
        print(f"identical answers (top-5 tokens, sequences, scores within 1e-4): {identical}/{len(texts)} rows")

        if not args.no_int8:
            q = FillMasker(FillMaskConfig(model=tmp, batch_size=args.batch_size, device="cpu", quantize="int8"))
            q(texts[:8])
            got_q, t_q = [], 0.0
            for i in range(0, len(texts), step):
                t0 = clock()
                got_q.extend(q(texts[i:i + step]))
                t_q += clock() - t0
            a = [x for o in got for x in top1(o)]
            b = [x for o in got_q for x in top1(o)]
            agree = sum(x == y for x, y in zip(a, b, strict=True)) / len(a)
            print(f"int8 (quantize_dynamic): {len(texts) / t_q:8.1f} rows/s ({t_q:.1f} s), "
                  f"{t_pipe / t_q:.2f}x the pipeline, {t_ours / t_q:.2f}x float32 ours; "
                  f"top-1 agreement with float32: {agree:.4f} over {len(a)} masks")
    return 0 if identical == len(texts) else 1


if __name__ == "__main__":
    sys.exit(main())
