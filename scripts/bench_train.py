"""Distillation throughput: BERT-base teacher (12 x 768) -> 6-layer DistilBERT student, seq 128, bf16.

Measures tokens/s and MFU of one training step of ``distill`` (teacher forward + student forward,
backward, clipping, fused AdamW) with the project's objective (``DistillObjective``: logits only on
the rows the losses use), against a baseline measured in the same run: the straightforward HF-style
step (full ``[B, L, V]`` logits of both models via ``model(..., output_hidden_states=True)``).

    python scripts/bench_train.py                      # real size, needs a CUDA GPU (H100: ~1 min)
    python scripts/bench_train.py --compile            # torch.compile the encoders
    python scripts/bench_train.py --tiny               # CPU smoke check (2 x 64 teacher, a few steps)

Synthetic full-length batches (no padding), random weights: throughput does not depend on them.
MFU = model FLOPs (3 x student forward + teacher forward, per token, see tasks/models.py) x tokens/s /
peak dense bf16 FLOP/s (from the GPU name, or --peak-tflops).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from transformers import BertConfig, BertForMaskedLM

from distilflow.tasks.train.loop import PEAK_BF16, DistillObjective, TrainConfig, teacher_outputs
from distilflow.tasks.train.losses import ce_rows, distillation_losses
from distilflow.tasks.train.models import (
    default_student_layers,
    forward_flops_per_token,
    init_student_from_teacher,
)


def make_batch(b: int, s: int, vocab: int, device: torch.device, g: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(1000, vocab, (b, s), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    pick = torch.rand(b, s, generator=g) < 0.15
    pick[:, 0] = pick[:, -1] = False
    labels = torch.where(pick, ids, torch.full_like(ids, -100))
    ids = torch.where(pick, torch.full_like(ids, 103), ids)  # [MASK]
    out = {"input_ids": ids, "attention_mask": torch.ones(b, s, dtype=torch.long),
           "token_type_ids": torch.zeros(b, s, dtype=torch.long), "labels": labels}
    return {k: v.to(device) for k, v in out.items()}


def bench(kind: str, a: argparse.Namespace, device: torch.device) -> dict[str, float]:
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    tcfg = BertConfig(vocab_size=30522, hidden_size=a.hidden, num_hidden_layers=a.layers,
                      num_attention_heads=a.hidden // 64 if a.hidden >= 64 else 1, intermediate_size=4 * a.hidden,
                      max_position_embeddings=512)
    teacher = BertForMaskedLM(tcfg).to(device).eval().requires_grad_(False)
    layers = default_student_layers(a.layers)
    student = init_student_from_teacher(teacher, layers).to(device).train()
    cfg = TrainConfig(mode="distill", data="unused", output="/tmp/unused", teacher="unused",
                      restrict_ce_to_mask=a.restrict_ce_to_mask)
    objective = DistillObjective(student, cfg)
    if a.compile:
        student.distilbert.compile()
        teacher.bert.compile()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=cuda)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    g = torch.Generator().manual_seed(0)
    batches = [make_batch(a.batch_size, a.seq_len, tcfg.vocab_size, device, g) for _ in range(4)]

    def step(b: dict[str, torch.Tensor]) -> None:
        with autocast:
            if kind == "ours":
                sel = ce_rows(b["labels"], b["attention_mask"], cfg.restrict_ce_to_mask)
                t_logits, t_hidden = teacher_outputs(teacher, b, sel)
                loss, _ = objective(b["input_ids"], b["attention_mask"], b["labels"], sel, t_logits, t_hidden)
            else:
                with torch.no_grad():
                    t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                token_type_ids=b["token_type_ids"], output_hidden_states=True)
                s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
                loss = distillation_losses(s.logits, t.logits, s.hidden_states[-1], t.hidden_states[-1], b["labels"],
                                           b["attention_mask"], restrict_ce_to_mask=cfg.restrict_ce_to_mask).total
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(a.warmup):
        step(batches[i % len(batches)])
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
    head_frac = 0.15 if a.restrict_ce_to_mask else 1.0
    f_student = forward_flops_per_token(len(layers), a.hidden, 4 * a.hidden, a.seq_len, tcfg.vocab_size, head_frac)
    f_teacher = forward_flops_per_token(a.layers, a.hidden, 4 * a.hidden, a.seq_len, tcfg.vocab_size, head_frac)
    flops = (3 * f_student + f_teacher) * tokens / dt
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
    p.add_argument("--tiny", action="store_true", help="CPU smoke check: 2 x 64 teacher, batch 4, seq 32, 3 steps")
    p.add_argument("--layers", type=int, default=12, help="teacher layers (default 12; student: half)")
    p.add_argument("--hidden", type=int, default=768, help="teacher/student width (default 768)")
    p.add_argument("--batch-size", type=int, default=256, help="sequences per step (default 256)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--steps", type=int, default=200, help="timed steps (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="untimed warmup steps (default 20)")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoders")
    p.add_argument("--restrict-ce-to-mask", action="store_true", help="KL on masked positions only")
    p.add_argument("--no-baseline", action="store_true", help="skip the HF-style baseline")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="peak bf16 TFLOP/s for MFU (default: by GPU name)")
    a = p.parse_args()
    if a.tiny:
        a.layers, a.hidden, a.batch_size, a.seq_len, a.steps, a.warmup = 2, 64, 4, 32, 3, 1
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    elif not a.tiny:
        print("no CUDA device: this measures CPU fp32 (use --tiny for a smoke check)")
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"device {name}; teacher {a.layers}x{a.hidden} -> student {len(default_student_layers(a.layers))} layers; "
          f"batch {a.batch_size} x seq {a.seq_len}; {'bf16 autocast' if cuda else 'fp32'}; compile={a.compile}; "
          f"restrict_ce_to_mask={a.restrict_ce_to_mask}")
    results = {"ours": bench("ours", a, device)}
    if not a.no_baseline:
        results["hf-baseline"] = bench("baseline", a, device)
    for k, r in results.items():
        print(f"{k:12s} " + "  ".join(f"{m}={v:,.4g}" for m, v in r.items()))
    if "hf-baseline" in results:
        ratio = results["ours"]["tokens_per_s"] / results["hf-baseline"]["tokens_per_s"]
        print(f"speed-up over the HF-style step: {ratio:.2f}x")


if __name__ == "__main__":
    main()
