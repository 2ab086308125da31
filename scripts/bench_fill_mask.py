"""Benchmark: ``distilflow fill-mask`` as a whole process vs ``transformers.pipeline("fill-mask")`` vs faster-clip.

Issue 16's two cases, measured in one run on the same rows and the same saved model (random weights,
loaded with ``from_pretrained``; nothing is downloaded):

* ``distilbert``: DistilBERT size (``DistilBertConfig()``: 6 x 768, vocab 30,522), 2,000 mixed-length
  Gutenberg sentences with one (sometimes two) words masked;
* ``bert-base``: BERT-base size (``BertConfig()``: 12 x 768), 1,000 LAMA-like cloze rows ("The capital of
  Peru is [MASK].", "Ada Brown was born in [MASK]."), one mask each. faster-clip (PyPI: a Rust, int8 "drop-in
  replacement" for the bert-base-uncased fill-mask pipeline) runs here too, on the *same* weights: it is
  pointed at them through its cache folder (``$FASTER_CLIP_CACHE/bert-base-uncased/{model.safetensors,
  tokenizer.json}``, the files it would otherwise download from the hub).

How each is timed (default threads everywhere: torch's, faster-clip's own):

* pipeline: ``pipe(rows, batch_size=32)`` in a child process, model loaded and warmed up first (compute only);
* faster-clip: ``FillMask().predict(row)`` per row (its API takes one text) in a child process, warmed up
  first (compute only);
* distilflow: ``distilflow fill-mask --input rows.txt --output DIR --model M`` as a *whole process*: wall
  clock from launch to exit, Prefect's temporary server, imports and model load included;
* start-up: the same command on 2 rows (the fixed cost of a command), with the command line's early
  temporary server and with Prefect's own (``DISTILFLOW_TEMP_SERVER=0``, as before).

Answers: distilflow's Parquet output against the pipeline's (top-k tokens and sequences equal, scores
within 1e-4) row by row; faster-clip's top-5 token strings against the pipeline's.

    python scripts/bench_fill_mask.py                          # both cases, as in BENCHMARKS.md
    python scripts/bench_fill_mask.py --case distilbert --rows 300 --no-startup   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DISTILFLOW_SHARED", REPO.parent / "shared" / "data"))
TOKENIZER = SHARED / "tokenizers" / "bert-base-uncased"
DISTILFLOW = str(Path(sys.executable).with_name("distilflow"))


# -- rows ------------------------------------------------------------------------------------------
def gutenberg_rows(n: int, seed: int) -> list[str]:
    """Mixed-length real sentences (20-120 words: ~43 tokens on average), one word masked (two in 10% of rows)."""
    rng = random.Random(seed)
    sents: list[str] = []
    for book in sorted((SHARED / "corpus" / "gutenberg").glob("pg*.txt")):
        text = book.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        for para in text.split("\n\n"):
            para = " ".join(para.split())
            sents.extend(s for s in re.split(r"(?<=[.!?])\s+", para) if 20 <= len(s.split()) <= 120)
    out = []
    for s in rng.sample(sents, n):
        words = s.split()
        for j in rng.sample(range(len(words)), 2 if rng.random() < 0.1 else 1):
            words[j] = "[MASK]"
        out.append(" ".join(words))
    return out


FIRST = ["Ada", "Alan", "Grace", "Maria", "John", "Emma", "Ivan", "Li", "Omar", "Sofia", "Hugo", "Nina", "Karl",
         "Yuki", "Pablo", "Anna", "Tariq", "Elena", "Samuel", "Mei", "Lars", "Amara", "Felix", "Rosa", "Ahmed"]
LAST = ["Brown", "Turing", "Hopper", "Curie", "Smith", "Garcia", "Petrov", "Wang", "Haddad", "Rossi", "Dubois",
        "Novak", "Weber", "Tanaka", "Lopez", "Larsen", "Okafor", "Silva", "Kim", "Nguyen"]
PERSON = ["{p} was born in [MASK].", "{p} died in [MASK].", "{p} works as a [MASK].", "{p} is a [MASK] by profession.",
          "{p} was a citizen of [MASK].", "The native language of {p} is [MASK]."]
COUNTRY = ["The capital of {country} is [MASK].", "{capital} is the capital of [MASK].",
           "People in {country} speak [MASK].", "The official language of {country} is [MASK].",
           "{country} is located in [MASK].", "The currency of {country} is the [MASK].",
           "{landmark} is located in [MASK].", "{capital} is a city in [MASK]."]


def lama_rows(n: int, seed: int) -> list[str]:
    """LAMA-like cloze rows (T-REx / Google-RE style relations): short facts, one [MASK] each."""
    from distilflow.tasks.prepare.demo_corpus import FACTS

    rows = [t.format(country=c, capital=cap, landmark=lm[0].upper() + lm[1:]) for c, cap, _, _, _, lm in FACTS
            for t in COUNTRY]
    rows += [t.format(p=f"{a} {b}") for a in FIRST for b in LAST for t in PERSON]
    rng = random.Random(seed)
    rows = sorted(set(rows))
    return rng.sample(rows, min(n, len(rows)))


# -- models ----------------------------------------------------------------------------------------
def save_model(kind: str, out: Path, seed: int) -> str:
    import torch
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForMaskedLM,
        DistilBertConfig,
        DistilBertForMaskedLM,
    )

    torch.manual_seed(seed)
    model = DistilBertForMaskedLM(DistilBertConfig()) if kind == "distilbert" else BertForMaskedLM(BertConfig())
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(TOKENIZER)).save_pretrained(out)
    return str(out)


def faster_clip_cache(model: str, root: Path) -> Path:
    """faster-clip's cache layout for ``lang="en"``: <cache>/bert-base-uncased/{model.safetensors, tokenizer.json}."""
    d = root / "bert-base-uncased"
    d.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "tokenizer.json"):
        if not (d / name).exists():
            os.link(Path(model) / name, d / name) if _same_fs(model, d) else shutil.copy(Path(model) / name, d / name)
    return root


def _same_fs(a: str, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


# -- the three contenders --------------------------------------------------------------------------
def child_pipeline(model: str, rows: list[str]) -> dict[str, Any]:
    from transformers import pipeline

    pipe = pipeline("fill-mask", model=model, tokenizer=model, device="cpu")
    pipe(rows[:8], batch_size=8)  # warm-up
    t0 = time.perf_counter()
    out = pipe(rows, batch_size=32)
    return {"seconds": time.perf_counter() - t0, "answers": out}


def child_faster_clip(cache: str, rows: list[str]) -> dict[str, Any]:
    os.environ["FASTER_CLIP_CACHE"] = cache
    from faster_clip import FillMask

    fm = FillMask()
    fm.predict(rows[0], lang="en")  # loads the weights
    t0 = time.perf_counter()
    out = [fm.predict(r, lang="en", top_k=5) for r in rows]
    return {"seconds": time.perf_counter() - t0, "answers": out}


def run_child(kind: str, arg: str, rows_file: Path, out: Path) -> dict[str, Any]:
    subprocess.run([sys.executable, __file__, "--child", kind, "--child-arg", arg, "--child-rows", str(rows_file),
                    "--child-out", str(out)], check=True)
    return json.loads(out.read_text())


def run_distilflow(model: str, rows_file: Path, out: Path, log: Path, *extra: str,
                   env: dict[str, str] | None = None) -> float:
    """Whole-process wall seconds of one ``distilflow fill-mask`` command."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [DISTILFLOW, "fill-mask", "--input", str(rows_file), "--output", str(out), "--model", model, *extra]
    t0 = time.perf_counter()
    with open(log, "a") as f:
        # a loaded machine: Prefect's own 20 s wait for its temporary server is not always enough
        env = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300", **os.environ, **(env or {})}
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"distilflow fill-mask failed ({rc}); see {log}")
    return seconds


# -- answers ---------------------------------------------------------------------------------------
def distilflow_answers(out: Path, n: int) -> list[list[list[dict[str, Any]]]]:
    """Per row, per mask: [{token, score, sequence}] in rank order, from the Parquet output."""
    import pyarrow.parquet as pq

    rows: list[list[list[dict[str, Any]]]] = [[] for _ in range(n)]
    for r in pq.read_table(out).to_pylist():
        masks = rows[r["row_id"]]
        while len(masks) <= r["mask_index"]:
            masks.append([])
        masks[r["mask_index"]].append(r)
    return rows


def same_as_pipeline(ours: list[list[dict[str, Any]]], ref: Any, tol: float = 1e-4, tie: float = 0.0) -> bool:
    """Same top-k tokens and sequences in the same order, scores within ``tol``. ``tie`` > 0: two tokens whose
    scores differ by less than ``tie`` may come in either order (random weights give such near-ties, and
    float sums in another order may swap them)."""
    ref_masks = ref if ref and isinstance(ref[0], list) else [ref]
    if len(ours) != len(ref_masks):
        return False
    for om, rm in zip(ours, ref_masks, strict=True):
        if len(om) != len(rm) or any(abs(o["score"] - r["score"]) >= tol for o, r in zip(om, rm, strict=True)):
            return False
        for o, r in zip(om, rm, strict=True):
            if (o["token"], o["sequence"]) != (r["token"], r["sequence"]) and not any(
                    (o["token"], o["sequence"]) == (x["token"], x["sequence"]) and abs(x["score"] - o["score"]) < tie
                    for x in rm):
                return False
    return True


# -- one case --------------------------------------------------------------------------------------
def bench_case(kind: str, n: int, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    rows = gutenberg_rows(n, args.seed) if kind == "distilbert" else lama_rows(n, args.seed)
    rows_file = work / f"{kind}-rows.txt"
    rows_file.write_text("\n".join(rows) + "\n")
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    lens = [len(x) for x in tok(rows)["input_ids"]]
    model = save_model(kind, work / f"{kind}-model", args.seed)
    print(f"\n== {kind}: {len(rows)} rows, tokens/row min {min(lens)} mean {sum(lens) / len(lens):.1f} max {max(lens)}",
          flush=True)
    res: dict[str, Any] = {"case": kind, "rows": len(rows), "mean_tokens": sum(lens) / len(lens)}
    log = work / "distilflow.log"

    pipe = run_child("pipeline", model, rows_file, work / f"{kind}-pipeline.json")
    res["pipeline_rows_s"] = len(rows) / pipe["seconds"]
    print(f"pipeline(batch_size=32), in-process:     {res['pipeline_rows_s']:7.1f} rows/s ({pipe['seconds']:.1f} s)",
          flush=True)

    walls = [run_distilflow(model, rows_file, work / f"{kind}-out", log) for _ in range(args.repeat)]
    wall = statistics.median(walls)
    res["distilflow_rows_s"] = len(rows) / wall
    got = distilflow_answers(work / f"{kind}-out", len(rows))
    res["identical_strict"] = sum(same_as_pipeline(o, r) for o, r in zip(got, pipe["answers"], strict=True))
    res["identical"] = sum(same_as_pipeline(o, r, tie=1e-6) for o, r in zip(got, pipe["answers"], strict=True))
    res["ratio_vs_pipeline"] = res["distilflow_rows_s"] / res["pipeline_rows_s"]
    print(f"distilflow fill-mask, whole process:     {res['distilflow_rows_s']:7.1f} rows/s ({wall:.1f} s; runs "
          f"{', '.join(f'{w:.1f}' for w in walls)})  = {res['ratio_vs_pipeline']:.2f}x the pipeline; identical answers "
          f"{res['identical']}/{len(rows)} rows ({res['identical_strict']} in the same order also where two scores "
          "tie within 1e-6)", flush=True)

    if args.fast:
        two = work / f"{kind}-2rows.txt"
        two.write_text("\n".join(rows[:2]) + "\n")
        q = ("--quantize", args.fast_mode)
        export = run_distilflow(model, two, work / f"{kind}-fast-export", log, *q)  # int8: the one-time export
        fwall = run_distilflow(model, rows_file, work / f"{kind}-fast", log, *q)
        fast = distilflow_answers(work / f"{kind}-fast", len(rows))
        top1 = [(a[0][0]["token"], b[0][0]["token"]) for a, b in zip(fast, got, strict=True)]
        res["fast_rows_s"] = len(rows) / fwall
        print(f"distilflow fill-mask --quantize {args.fast_mode}, whole proc: {res['fast_rows_s']:7.1f} rows/s "
              f"({fwall:.1f} s) = {res['fast_rows_s'] / res['distilflow_rows_s']:.2f}x exact (the first run on "
              f"2 rows, an int8 export included, took {export:.1f} s); top-1 agreement with exact (random weights) "
              f"{sum(a == b for a, b in top1) / len(top1):.3f}", flush=True)
        # the same without the in-job agreement check (its exact pass over the first 256 rows)
        nwall = run_distilflow(model, rows_file, work / f"{kind}-fast-nocheck", log, *q, "--fast-check-rows", "0")
        same = distilflow_answers(work / f"{kind}-fast-nocheck", len(rows)) == fast
        res["fast_nocheck_rows_s"] = len(rows) / nwall
        print(f"distilflow fill-mask --quantize {args.fast_mode} --fast-check-rows 0, whole proc: "
              f"{res['fast_nocheck_rows_s']:7.1f} rows/s ({nwall:.1f} s) = "
              f"{res['fast_nocheck_rows_s'] / res['distilflow_rows_s']:.2f}x exact; answers equal to the checked "
              f"run's: {same}", flush=True)

    if kind == "bert-base" and not args.no_faster_clip:
        cache = faster_clip_cache(model, work / "faster-clip-cache")
        fc = run_child("faster-clip", str(cache), rows_file, work / f"{kind}-faster-clip.json")
        res["faster_clip_rows_s"] = len(rows) / fc["seconds"]
        same5 = sum([a["token_str"] for a in f] == [b["token_str"] for b in p]
                    for f, p in zip(fc["answers"], pipe["answers"], strict=True))
        res["faster_clip_identical_top5"] = same5
        res["ratio_vs_faster_clip"] = res["distilflow_rows_s"] / res["faster_clip_rows_s"]
        print(f"faster-clip FillMask (int8), in-process: {res['faster_clip_rows_s']:7.1f} rows/s ({fc['seconds']:.1f} s); "
              f"top-5 identical to the pipeline {same5}/{len(rows)}; distilflow = {res['ratio_vs_faster_clip']:.2f}x "
              "faster-clip", flush=True)

    if not args.no_startup:
        two = work / f"{kind}-2rows.txt"
        two.write_text("\n".join(rows[:2]) + "\n")
        early = [run_distilflow(model, two, work / "startup", log) for _ in range(args.repeat)]
        prefect = [run_distilflow(model, two, work / "startup", log, env={"DISTILFLOW_TEMP_SERVER": "0"})
                   for _ in range(args.repeat)]
        res["startup_s"], res["startup_prefect_own_s"] = statistics.median(early), statistics.median(prefect)
        print(f"fixed cost (2 rows, whole process): {res['startup_s']:.1f} s with the early temporary server, "
              f"{res['startup_prefect_own_s']:.1f} s with Prefect's own (runs {', '.join(f'{w:.1f}' for w in early)} / "
              f"{', '.join(f'{w:.1f}' for w in prefect)})", flush=True)
    return res


def agreement(model: str, n: int, seed: int, mode: str) -> dict[str, Any]:
    """--fast against the exact mode on one (trained) model, in-process: top-1 / top-5 agreement per mask and
    the speed of both (wall clock, default threads, after a warm-up)."""
    from distilflow.tasks.infer.config import FillMaskConfig
    from distilflow.tasks.infer.fill_mask import FillMasker

    rows = gutenberg_rows(n, seed)
    exact = FillMasker(FillMaskConfig(model=model, device="cpu"))
    fast = FillMasker(FillMaskConfig(model=model, device="cpu", quantize=mode))  # type: ignore[arg-type]
    enc = [e for e in exact.encode(rows) if isinstance(e, list)]
    times = {}
    out = {}
    for name, job, q in (("exact", exact, False), ("fast", fast, True)):
        job.predict(enc[:16], quantized=q)  # warm-up
        t0 = time.perf_counter()
        out[name] = job.predict(enc, quantized=q)
        times[name] = time.perf_counter() - t0
    pairs = [(a, b) for ra, rb in zip(out["exact"], out["fast"], strict=True) for a, b in zip(ra, rb, strict=True)]
    top1 = sum(int(a[1][0] == b[1][0]) for a, b in pairs) / len(pairs)
    top5 = sum(len(set(a[1].tolist()) & set(b[1].tolist())) for a, b in pairs) / (5 * len(pairs))
    same5 = sum(a[1].tolist() == b[1].tolist() for a, b in pairs) / len(pairs)
    res = {"model": model, "mode": fast.cfg.quantize, "rows": len(enc), "masks": len(pairs), "top1_agreement": top1, "top5_overlap": top5,
           "top5_identical": same5, "exact_rows_s": len(enc) / times["exact"], "fast_rows_s": len(enc) / times["fast"]}
    print(f"--fast ({fast.cfg.quantize}) vs exact on {model}: {len(enc)} rows, {len(pairs)} masks: top-1 agreement {top1:.3f}, top-5 "
          f"overlap {top5:.3f}, identical top-5 lists {same5:.3f}; in-process {res['exact_rows_s']:.1f} -> "
          f"{res['fast_rows_s']:.1f} rows/s = {res['fast_rows_s'] / res['exact_rows_s']:.2f}x", flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=["distilbert", "bert-base", "both"], default="both")
    ap.add_argument("--rows", type=int, default=2000, help="rows of the distilbert case (default 2000)")
    ap.add_argument("--lama-rows", type=int, default=1000, help="rows of the bert-base case (default 1000)")
    ap.add_argument("--repeat", type=int, default=1, help="distilflow runs per measurement; the median counts")
    ap.add_argument("--fast", action="store_true", help="also time --fast (opt-in approximate mode)")
    ap.add_argument("--fast-mode", choices=["auto", "bf16", "int8"], default="auto",
                    help="the --fast mode timed (auto = what --fast picks on this machine)")
    ap.add_argument("--no-faster-clip", action="store_true")
    ap.add_argument("--no-startup", action="store_true", help="skip the 2-row fixed-cost runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--agreement", metavar="MODEL_DIR", default=None,
                    help="only measure --fast against the exact mode on this (trained) model, in-process")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary folder, removed)")
    ap.add_argument("--child", choices=["pipeline", "faster-clip"], help=argparse.SUPPRESS)
    ap.add_argument("--child-arg", help=argparse.SUPPRESS)
    ap.add_argument("--child-rows", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        rows = Path(args.child_rows).read_text().splitlines()
        fn = child_pipeline if args.child == "pipeline" else child_faster_clip
        Path(args.child_out).write_text(json.dumps(fn(args.child_arg, rows)))
        return 0
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (default), {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    if args.agreement:
        print(json.dumps(agreement(args.agreement, args.rows, args.seed, args.fast_mode)))
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-fill-mask-"))
    work.mkdir(parents=True, exist_ok=True)
    cases = ["distilbert", "bert-base"] if args.case == "both" else [args.case]
    results = [bench_case(c, args.rows if c == "distilbert" else args.lama_rows, work, args) for c in cases]
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    print(json.dumps(results))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    ok = all(r["identical"] == r["rows"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
