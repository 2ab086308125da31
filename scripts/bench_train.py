"""Training step costs: what a distillation step costs next to pretraining the same teacher, and GPU MFU.

Two measurements, both of full training steps (forward, backward, clipping, AdamW) on synthetic
full-length batches (no padding; random weights: speed does not depend on them):

* ``--cpu-ratio`` (issue 12 item 2): seconds per step of *pretraining* the teacher (MLM + NSP,
  ``PretrainObjective``) and of *distilling* it into its half-depth student, with the reference
  distillation loss (full ``[N, V]`` logits of both models, what the project did before) and with the
  project's fused chunked loss (``DistillObjective``). Default: the ``mini`` teacher (4 x 256) at seq 128
  with BERT's 30,522-word vocabulary, batch 16 -- the size where users felt it. The three kinds are timed
  in alternating rounds (median per kind), so a machine shared with other jobs slows them alike::

      python scripts/bench_train.py --cpu-ratio                 # ~2 min on 2 cores
      python scripts/bench_train.py --cpu-ratio --restrict-ce-to-mask
      # --precision bf16 on a CPU with native bf16, at the replication recipe's sizes:
      python scripts/bench_train.py --cpu-ratio --cpu-bf16 --layers 6 --hidden 256 --vocab 8192 --batch-size 32

* default (GPU): BERT-base teacher (12 x 768) -> 6-layer student, seq 128, bf16 autocast: tokens/s and
  MFU of the project's distillation step, against the straightforward HF-style step (full logits via
  ``model(..., output_hidden_states=True)``)::

      python scripts/bench_train.py                      # needs a CUDA GPU (H100: ~1 min)
      python scripts/bench_train.py --compile            # torch.compile the encoders
      python scripts/bench_train.py --tiny               # CPU smoke check (2 x 64 teacher, a few steps)

MFU = model FLOPs (``objective.flops_per_token``: 3 x student forward + teacher forward) x tokens/s / peak
dense bf16 FLOP/s (from the GPU name, or --peak-tflops).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig, BertForMaskedLM, BertForPreTraining

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.train: the reference loss
from distilflow.tasks.train.config import TrainConfig  # noqa: E402
from distilflow.tasks.train.launch import PEAK_BF16  # noqa: E402
from distilflow.tasks.train.losses import distillation_losses  # noqa: E402
from distilflow.tasks.train.models import default_student_layers, init_student_from_teacher  # noqa: E402
from distilflow.tasks.train.objectives import DistillObjective, PretrainObjective  # noqa: E402
from tests.train.test_objectives import reference_forward  # noqa: E402

VOCAB = 30522


def make_batch(b: int, s: int, vocab: int, device: torch.device, g: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(1000, vocab, (b, s), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    pick = torch.rand(b, s, generator=g) < 0.15
    pick[:, 0] = pick[:, -1] = False
    labels = torch.where(pick, ids, torch.full_like(ids, -100))
    ids = torch.where(pick, torch.full_like(ids, 103), ids)  # [MASK]
    out = {"input_ids": ids, "attention_mask": torch.ones(b, s, dtype=torch.long),
           "token_type_ids": torch.zeros(b, s, dtype=torch.long), "labels": labels,
           "next_sentence_label": torch.randint(0, 2, (b,), generator=g)}
    return {k: v.to(device) for k, v in out.items()}


def teacher_config(a: argparse.Namespace) -> BertConfig:
    return BertConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
                      num_attention_heads=max(1, a.hidden // 64), intermediate_size=4 * a.hidden,
                      max_position_embeddings=512)


def stepper(objective: Any, forward: Any, device: torch.device, cpu_bf16: bool = False) -> Any:
    """One full training step of ``objective.model`` with ``forward(batch) -> (loss, terms)`` (bf16 autocast on
    CUDA, and on the CPU with ``cpu_bf16``: what ``--precision bf16`` does)."""
    opt = torch.optim.AdamW(objective.model.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if device.type == "cuda" or cpu_bf16 \
        else contextlib.nullcontext

    def step(b: dict[str, torch.Tensor]) -> None:
        with autocast():
            loss, _ = forward(b)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(objective.model.parameters(), 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def cpu_ratio(a: argparse.Namespace) -> None:
    device = torch.device("cpu")
    torch.manual_seed(0)
    tcfg = teacher_config(a)
    pre = PretrainObjective(BertForPreTraining(tcfg).train(), 0.15)
    teacher = BertForMaskedLM(tcfg).eval().requires_grad_(False)
    cfg = TrainConfig(mode="distill", data="unused", output="/tmp/unused", teacher="unused",
                      restrict_ce_to_mask=a.restrict_ce_to_mask)
    fused = DistillObjective(init_student_from_teacher(teacher, default_student_layers(a.layers)).train(), teacher,
                             cfg)
    if a.cpu_bf16:  # --precision bf16 on the CPU against float32, for both kinds of step
        pre16 = PretrainObjective(copy.deepcopy(pre.model), 0.15)
        fused16 = DistillObjective(copy.deepcopy(fused.model), teacher, cfg)
        kinds = {"pretrain": stepper(pre, pre, device), "pretrain bf16": stepper(pre16, pre16, device, True),
                 "distill (fused, chunked)": stepper(fused, fused, device),
                 "distill bf16": stepper(fused16, fused16, device, True)}
    else:
        ref = DistillObjective(init_student_from_teacher(teacher, default_student_layers(a.layers)).train(), teacher,
                               cfg)
        kinds = {"pretrain": stepper(pre, pre, device), "distill (reference loss)": stepper(
            ref, lambda b: reference_forward(ref, b), device), "distill (fused, chunked)": stepper(fused, fused, device)}
    g = torch.Generator().manual_seed(0)
    batches = [make_batch(a.batch_size, a.seq_len, a.vocab, device, g) for _ in range(2)]
    print(f"CPU, {torch.get_num_threads()} threads; teacher {a.layers}x{a.hidden} (vocab {a.vocab}) -> student "
          f"{len(default_student_layers(a.layers))} layers; batch {a.batch_size} x seq {a.seq_len}; "
          f"restrict_ce_to_mask={a.restrict_ce_to_mask}; {a.rounds} rounds x {a.steps} steps", flush=True)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    extra: dict[str, float] = {}  # peak RSS above the steady state during one step, per kind
    for k, step in kinds.items():  # warmup (allocator, first-call costs) with the memory peak
        with PeakRSS() as peak:
            step(batches[0])
        extra[k] = peak.extra_gib
    for r in range(a.rounds):
        for k, step in kinds.items():
            t0 = time.perf_counter()
            for i in range(a.steps):
                step(batches[i % 2])
            times[k].append((time.perf_counter() - t0) / a.steps)
        print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()), flush=True)
    base = statistics.median(times["pretrain"])
    for k, v in times.items():
        med = statistics.median(v)
        print(f"{k:26s} {med:.3f} s/step  {a.batch_size * a.seq_len / med:,.0f} tok/s  {med / base:.2f}x pretrain  "
              f"step memory +{extra[k]:.2f} GiB")
    if a.cpu_bf16:
        for fp32, bf16 in (("pretrain", "pretrain bf16"), ("distill (fused, chunked)", "distill bf16")):
            print(f"{bf16}: {statistics.median(times[fp32]) / statistics.median(times[bf16]):.2f}x faster than float32")
        ratio = statistics.median(times["distill bf16"]) / statistics.median(times["pretrain bf16"])
        print(f"distill bf16 / pretrain bf16 (both under --precision bf16): {ratio:.2f}x")


class PeakRSS:
    """Peak resident memory of this process above its level at entry (sampled every 5 ms)."""

    def __enter__(self) -> PeakRSS:
        import threading

        import psutil

        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.start = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.extra_gib = max(0, self.peak - self.start) / 2**30


def gpu_bench(kind: str, a: argparse.Namespace, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    tcfg = teacher_config(a)
    teacher = BertForMaskedLM(tcfg).to(device).eval().requires_grad_(False)
    layers = default_student_layers(a.layers)
    student = init_student_from_teacher(teacher, layers).to(device).train()
    cfg = TrainConfig(mode="distill", data="unused", output="/tmp/unused", teacher="unused",
                      restrict_ce_to_mask=a.restrict_ce_to_mask)
    objective = DistillObjective(student, teacher, cfg)
    if a.compile:
        objective.compile_encoders()

    def hf_style(b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                        token_type_ids=b["token_type_ids"], output_hidden_states=True)
        s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
        return distillation_losses(s.logits, t.logits, s.hidden_states[-1], t.hidden_states[-1], b["labels"],
                                   b["attention_mask"], restrict_ce_to_mask=cfg.restrict_ce_to_mask).total, {}

    step = stepper(objective, objective if kind == "ours" else hf_style, device)
    g = torch.Generator().manual_seed(0)
    batches = [make_batch(a.batch_size, a.seq_len, a.vocab, device, g) for _ in range(4)]
    for i in range(a.warmup):
        step(batches[i % len(batches)])
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(a.steps):
        step(batches[i % len(batches)])
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tokens = a.steps * a.batch_size * a.seq_len
    flops = objective.flops_per_token(a.seq_len) * tokens / dt
    peak = a.peak_tflops * 1e12 if a.peak_tflops else (
        next((v for k, v in PEAK_BF16.items() if k in torch.cuda.get_device_name(device)), None) if cuda else None)
    out = {"tokens_per_s": tokens / dt, "tflops": flops / 1e12, "step_ms": 1000 * dt / a.steps}
    if peak:
        out["mfu"] = flops / peak
    if cuda:
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-ratio", action="store_true", help="distill vs pretrain step on CPU (defaults: mini, "
                   "batch 16, seq 128, 3 rounds x 3 steps)")
    p.add_argument("--cpu-bf16", action="store_true", help="with --cpu-ratio: float32 against --precision bf16 "
                   "(CPU bf16 autocast; for CPUs with AVX512-BF16/AMX) for pretraining and distillation steps")
    p.add_argument("--vocab", type=int, default=VOCAB, help="vocabulary size (default %(default)s)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke check: 2 x 64 teacher, batch 4, seq 32, 3 steps")
    p.add_argument("--layers", type=int, default=None, help="teacher layers (default 12; --cpu-ratio: 4)")
    p.add_argument("--hidden", type=int, default=None, help="teacher/student width (default 768; --cpu-ratio: 256)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 256; --cpu-ratio: 16)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 200; --cpu-ratio: 3 per round)")
    p.add_argument("--rounds", type=int, default=3, help="--cpu-ratio: alternating rounds (default 3)")
    p.add_argument("--warmup", type=int, default=20, help="untimed warmup steps (default 20)")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoders")
    p.add_argument("--restrict-ce-to-mask", action="store_true", help="KL on masked positions only")
    p.add_argument("--no-baseline", action="store_true", help="skip the HF-style baseline")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="peak bf16 TFLOP/s for MFU (default: by GPU name)")
    a = p.parse_args()
    small = a.cpu_ratio
    a.layers = a.layers or (4 if small else 12)
    a.hidden = a.hidden or (256 if small else 768)
    a.batch_size = a.batch_size or (16 if small else 256)
    a.steps = a.steps or (3 if small else 200)
    if a.cpu_ratio:
        cpu_ratio(a)
        return
    if a.tiny:
        a.layers, a.hidden, a.batch_size, a.seq_len, a.steps, a.warmup = 2, 64, 4, 32, 3, 1
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    elif not a.tiny:
        print("no CUDA device: this measures CPU fp32 (use --tiny for a smoke check, --cpu-ratio for the ratio)")
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"device {name}; teacher {a.layers}x{a.hidden} -> student {len(default_student_layers(a.layers))} layers; "
          f"batch {a.batch_size} x seq {a.seq_len}; {'bf16 autocast' if cuda else 'fp32'}; compile={a.compile}; "
          f"restrict_ce_to_mask={a.restrict_ce_to_mask}")
    results = {"ours": gpu_bench("ours", a, device)}
    if not a.no_baseline:
        results["hf-baseline"] = gpu_bench("baseline", a, device)
    for k, r in results.items():
        print(f"{k:12s} " + "  ".join(f"{m}={v:,.4g}" for m, v in r.items()))
    if "hf-baseline" in results:
        ratio = results["ours"]["tokens_per_s"] / results["hf-baseline"]["tokens_per_s"]
        print(f"speed-up over the HF-style step: {ratio:.2f}x")


if __name__ == "__main__":
    main()
