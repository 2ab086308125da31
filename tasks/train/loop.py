"""The training loop: BERT pretraining (MLM + NSP) or DistilBERT distillation, one process or DDP.

Read top to bottom: processes and output folder, model (inside its objective), data, optimizer, resume,
then the steps. One optimizer step: for each of ``grad_accum`` micro-batches, forward (bf16 autocast on
CUDA) and backward of loss / grad_accum (DDP all-reduces gradients on the last one only), clip the global
grad norm, AdamW step, LR schedule step (linear warmup, then linear decay to 0). Every ``log_every`` steps
one record goes to ``OUT/metrics.jsonl`` and one readable line to the terminal (or to ``on_log``).

What lives elsewhere: the objectives (``objectives.py``), batches (``data.py``), checkpoints and the output
folder (``checkpoint.py``), processes and launching (``launch.py``), records and lines (``metrics.py``).
Entry points: ``distilflow pretrain|distill`` (Prefect) and ``python -m distilflow.tasks.train`` (torchrun).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from transformers import AutoTokenizer

from distilflow.tasks.core.hf import local_model
from distilflow.tasks.core.io import join
from distilflow.tasks.prepare.masking import Vocab
from distilflow.tasks.train.checkpoint import RunDir, finished_summary, read_metrics, staged_run
from distilflow.tasks.train.config import TrainConfig
from distilflow.tasks.train.data import heldout_batches, training_batches
from distilflow.tasks.train.heldout import evaluate_mlm
from distilflow.tasks.train.launch import Dist, autocast_for, peak_flops, setup_distributed
from distilflow.tasks.train.metrics import Reporter, Window
from distilflow.tasks.train.objectives import build_objective
from distilflow.tasks.train.optim import make_optimizer
from distilflow.tasks.train.report import model_card, plot_curves

OnLog = Callable[[dict[str, Any]], None]


def train(cfg: TrainConfig, on_log: OnLog | None = None, stop_after: int = 0) -> dict[str, Any]:
    """Run pretraining or distillation as configured; returns the summary (also in OUT/summary.json).

    ``on_log`` gets every metrics record on rank 0 (then no line is printed: the caller shows it).
    ``stop_after`` (tests) stops after that step as if the process had been killed there: no final model,
    only the checkpoints written so far.
    """
    d = setup_distributed(cfg.threads)
    if (finished := finished_summary(cfg)) is not None:
        return finished  # finished with the same config: nothing to do twice
    with staged_run(cfg, d) as run:  # a bucket OUT: a local working folder, pushed by rank 0
        return _train(cfg, d, run, on_log, stop_after)


def _train(cfg: TrainConfig, d: Dist, run: RunDir, on_log: OnLog | None, stop_after: int) -> dict[str, Any]:
    resume_from = run.open(d)
    amp = autocast_for(cfg, d.device)
    tokenizer = AutoTokenizer.from_pretrained(local_model(join(cfg.data, "tokenizer")))
    objective = build_objective(cfg, tokenizer, d.device)  # the trained model is objective.model
    model = objective.model
    batches, source = training_batches(cfg, tokenizer, d.world, d.rank,
                                       cfg.max_seq_len or model.config.max_position_embeddings)
    eval_set = heldout_batches(cfg, tokenizer, cfg.max_seq_len or model.config.max_position_embeddings) \
        if d.main else None
    total = cfg.max_steps or math.ceil(cfg.epochs * batches.steps_per_epoch)
    optimizer, scheduler = make_optimizer(cfg, model, total, fused=d.device.type == "cuda")
    start = run.load_checkpoint(d, resume_from, model, optimizer, scheduler) if resume_from else 0
    if not resume_from:
        torch.manual_seed(cfg.seed * 1000 + d.rank + 1)  # dropout streams differ between ranks
    if cfg.compile:
        objective.compile_encoders()
    ddp: Any = nn.parallel.DistributedDataParallel(
        objective, device_ids=[d.device] if d.device.type == "cuda" else None) if d.world > 1 else objective
    if d.main:
        run.start(start)
    report = Reporter(run, cfg, total, start, on_log, d.main)
    window, history, peak = Window(), [], peak_flops(cfg, d.device)

    for step in range(start, total):
        micro = batches(step)
        for i, bc in enumerate(micro):
            tokens, width = int(bc["attention_mask"].sum()), bc["input_ids"].shape[1]  # host ints, no sync
            b = {k: v.to(d.device, non_blocking=True) for k, v in bc.items()}
            # gradients are all-reduced on the last micro-batch of the step only
            sync = i == len(micro) - 1 or d.world == 1
            with (contextlib.nullcontext() if sync else ddp.no_sync()), amp():
                loss, terms = ddp(b)
                (loss / len(micro)).backward()
            window.add_micro({**terms, "loss": loss.detach()}, len(micro), tokens,
                             objective.flops_per_token(width) * tokens)
        grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                     if cfg.max_grad_norm > 0 else torch.zeros((), device=d.device))
        window.end_step(grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        report.step()
        if done % cfg.log_every == 0 or done == total:
            rec = window.record(done, total, batches.position(step)["epoch"], scheduler.get_last_lr()[0],
                                d.world, d.device, peak)
            report(rec)
            history.append(rec)
        if eval_set is not None and cfg.eval_every and done % cfg.eval_every == 0 and done != total:
            report({"step": done, **_prefixed(evaluate_mlm(model, eval_set, d.device, amp()))})
        if (cfg.save_every and done % cfg.save_every == 0) or done == total:
            run.save_checkpoint(d, done, model, optimizer, scheduler, batches.position(done))
        if stop_after and done == stop_after:
            report.close()
            return {"stopped_at": done}
    report.close()

    summary: dict[str, Any] = {}
    if d.main:
        summary = {"mode": cfg.mode, "fingerprint": cfg.fingerprint_for_resume(), "steps": total,
                   "resumed_from": start, "parameters": sum(p.numel() for p in model.parameters()),
                   "world_size": d.world, "mask_source": source, "sequences": len(batches.ex),
                   "steps_per_epoch": batches.steps_per_epoch, "tokens": window.seen * d.world,
                   "last": history[-1] if history else None}
        if eval_set is not None:
            summary.update(final_eval(objective, eval_set, d, amp, tokenizer))
            report({"step": total, **_prefixed(summary["eval"])})
        run.save_final(model, tokenizer, summary)
        png = plot_curves(read_metrics(run.path), read_metrics(run.path, evals=True), f"{cfg.mode}: {cfg.output}")
        run.save_card(model_card(cfg, summary, summary["parameters"], objective.architecture(), png is not None), png)
    d.barrier()
    return summary


def final_eval(objective: Any, eval_set: list[dict[str, torch.Tensor]], d: Dist, amp: Callable[[], Any],
               tokenizer: Any) -> dict[str, Any]:
    """Held-out masked-token accuracy of the trained model and of the reference models (the teacher)."""
    out = {"eval": evaluate_mlm(objective.model, eval_set, d.device, amp())}
    for name, ref in objective.references().items():
        out[f"{name}_eval"] = evaluate_mlm(ref, eval_set, d.device, amp())
    out["eval"]["uniform_baseline"] = 1.0 / len(Vocab.from_tokenizer(tokenizer).random_ids)
    return out


def _prefixed(ev: dict[str, Any]) -> dict[str, Any]:
    return {f"eval_{k}": v for k, v in ev.items()}


if __name__ == "__main__":  # the entry of earlier versions: python -m distilflow.tasks.train.loop
    from distilflow.tasks.train.launch import main

    sys.exit(main())
