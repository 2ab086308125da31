"""Follow-up of the replication (issue 12, "pretraining must show"): does in-domain text close the gap to the
from-scratch baseline? Task-adaptive pretraining (TAPT, Gururangan et al. 2020, "Don't Stop Pretraining"):
continue the replication teacher's MLM training on the *unlabeled* SST-2 training sentences (never dev), then
fine-tune it with the recipe (lr 3e-4, 2 epochs, seeds 0/1/2) and compare with the run's teacher and its
from-scratch baseline.

    python scripts/replicate_tapt_followup.py --run runs/replicate3 --output runs/tapt

Continued pretraining: 1,500 steps x 32 sentences (~7 passes over the 6,920 sentences), lr 1e-4 (6% warm-up,
linear decay), AdamW (weight decay 0.01), clipping 1.0, Hugging Face's MLM collator (15%, 80/10/10), the MLM head
at the masked positions only and bf16 autocast (a CPU with native bf16; the fine-tuning is float32). NSP is not
trained (one sentence per row); the pooler keeps its pretrained weights. A probe, not part of the recipe.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def continue_pretraining(teacher: str, sentences: list[str], out: str, steps: int, lr: float) -> None:
    import torch
    from transformers import AutoTokenizer, BertForPreTraining, DataCollatorForLanguageModeling
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    random.seed(0)
    tok = AutoTokenizer.from_pretrained(teacher)
    model = BertForPreTraining.from_pretrained(teacher, use_safetensors=True)
    model.train()
    collate = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = int(0.06 * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / (steps - warm)))
    enc = [tok(s, truncation=True, max_length=128)["input_ids"] for s in sentences]
    t0, step = time.time(), 0
    order: list[int] = []
    while step < steps:
        if len(order) < 32:  # a fresh permutation appended when fewer than a batch is left
            order += random.sample(range(len(enc)), len(enc))
        idx, order = order[:32], order[32:]
        batch = collate([{"input_ids": enc[i]} for i in idx])
        ids, labels = batch["input_ids"], batch["labels"]  # [32, T]; labels -100 except at masked positions
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = model.bert(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long()).last_hidden_state
            sel = labels != -100
            logits = model.cls.predictions(h[sel])  # [n_masked, vocab]
        loss = torch.nn.functional.cross_entropy(logits.float(), labels[sel])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        step += 1
        if step % 200 == 0:
            print(f"step {step} loss {loss.item():.3f} {time.time() - t0:.0f} s", flush=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/replicate3", help="a replication run folder (its teacher/)")
    ap.add_argument("--output", default="runs/tapt")
    ap.add_argument("--glue-dir", default=os.path.relpath(REPO.parent / "shared" / "data" / "glue"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=1e-4)
    args = ap.parse_args(argv)

    from distilflow.tasks.evaluate.glue import find_task_files, read_glue_file

    train_file = find_task_files(args.glue_dir, "sst2").train
    if not train_file:
        raise SystemExit(f"{args.glue_dir}: no SST-2 train file")
    sentences = [e.text_a for e in read_glue_file(train_file, "sst2").examples]  # the text only, no labels
    teacher = os.path.join(args.output, "teacher")
    if not os.path.exists(os.path.join(teacher, "model.safetensors")):
        continue_pretraining(os.path.join(args.run, "teacher"), sentences, teacher, args.steps, args.lr)
    from distilflow.cli import main as cli

    for seed in (0, 1, 2):  # the recipe's fine-tuning, one seed per command as the probe ran
        rc = cli(["evaluate", "--model", teacher, "--tasks", "sst2", "--glue-dir", args.glue_dir, "--output",
                  os.path.join(args.output, "eval"), "--lr", "3e-4", "--epochs", "2", "--seed", str(seed), "--seeds", "1"])
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
