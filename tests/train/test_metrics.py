"""The readable metrics line, its parse-back, and the window means written to metrics.jsonl."""

from __future__ import annotations

import torch

from distilflow.tasks.train.metrics import Window, format_line, parse_step


def test_line_reads_like_the_issue_example():
    rec = {"step": 120, "total_steps": 300, "epoch": 0, "loss": 3.4123, "loss_mlm": 2.9011, "loss_nsp": 0.5112,
           "mlm_acc": 0.2149, "grad_norm": 1.3, "lr": 9.1e-4, "tokens_per_s": 1234.5}
    assert format_line(rec) == "step 120/300  loss 3.41 (mlm 2.9 nsp 0.511)  acc 0.21  lr 9.1e-4  1.23k tok/s"
    assert parse_step(format_line(rec)) == (120, 300)
    distill = {**rec, "loss_ce": 1.5, "loss_cos": 0.05, "mfu": 0.4123}
    del distill["loss_nsp"]
    assert format_line(distill).startswith("step 120/300  loss 3.41 (ce 1.5 mlm 2.9 cos 0.05)")
    assert format_line(distill).endswith("mfu 41.2%")
    ev = {"step": 300, "eval_accuracy": 0.2123, "eval_majority_baseline": 0.118, "eval_loss": 5.123,
          "eval_masked_tokens": 10}
    assert format_line(ev) == "eval  step 300: held-out masked-token accuracy 0.212 (majority 0.118), loss 5.12"
    assert parse_step(format_line(ev)) is None and parse_step("step 1/x") is None


def test_window_means_over_micro_batches_and_steps():
    w = Window()
    for step_losses in ([1.0, 3.0], [5.0, 7.0]):  # two steps of two micro-batches
        for x in step_losses:
            w.add_micro({"loss": torch.tensor(x)}, n_micro=2, tokens=10, flops=100.0)
        w.end_step(torch.tensor(0.5 * len(step_losses)))
    rec = w.record(step=2, total=4, epoch=0, lr=1e-3, world=1, device=torch.device("cpu"), peak_flops=1e3)
    assert rec["loss"] == 4.0 and rec["grad_norm"] == 1.0 and rec["step"] == 2 and rec["lr"] == 1e-3
    assert rec["tokens_per_s"] > 0 and rec["mfu"] > 0
    assert w.steps == 0 and w.sums == {}  # reset for the next interval
