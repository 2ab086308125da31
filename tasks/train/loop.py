"""Training loops: BERT pretraining (MLM + NSP) and DistilBERT distillation, 1 process or DDP.

Run directly (one process on CPU or one GPU)::

    python -m distilflow.tasks.train.loop pretrain --data DIR --output OUT --config mini
    python -m distilflow.tasks.train.loop distill  --data DIR --teacher OUT_TEACHER --output OUT_STUDENT

or on N GPUs of one host (DDP, NCCL; on CPU the gloo backend is used)::

    torchrun --standalone --nproc-per-node N -m distilflow.tasks.train.loop distill --data DIR ...

``--batch-size`` is per process; the global batch is ``batch_size * grad_accum * N`` sequences.

Outputs in OUT::

    train_config.json            the TrainConfig (typed, validated)
    metrics.jsonl                one line per --log-every steps: loss terms, lr, grad norm, tokens/s, MFU
    checkpoints/step-XXXXXXXX/   model (safetensors), optimizer.pt, scheduler.pt, rng-rank<r>.pt,
                                 trainer_state.json (step, data position), train_config.json
    config.json, model.safetensors, tokenizer files   the final model (save_pretrained), loadable by
                                 transformers.pipeline("fill-mask", model=OUT) with no project code
    summary.json                 final losses, held-out accuracy (--eval-data), throughput

One optimizer step: for each of ``grad_accum`` micro-batches, forward (bf16 autocast on CUDA) and
backward of loss / grad_accum (DDP all-reduces gradients on the last one), clip the global grad norm,
AdamW step, LR schedule step (linear warmup, then linear decay to 0).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer, BertForMaskedLM, BertForPreTraining, PreTrainedModel

from distilflow.tasks.core.config import ConfigError
from distilflow.tasks.core.hf import build_model, load_pretrained
from distilflow.tasks.core.io import join, write_json
from distilflow.tasks.core.stage import ResumeError
from distilflow.tasks.prepare.masking import IGNORE_INDEX, MaskConfig, Vocab
from distilflow.tasks.train.config import TrainConfig
from distilflow.tasks.train.data import (
    Collator,
    Examples,
    StepBatches,
    eval_batches,
    load_examples,
    load_token_weights,
    resolve_source,
)
from distilflow.tasks.train.losses import DistilLosses, ce_rows, combine
from distilflow.tasks.train.models import (
    check_student_layers,
    default_student_layers,
    forward_flops_per_token,
    init_student_from_teacher,
    teacher_config,
)

EVAL_BATCH = 64  # sequences per held-out evaluation batch
# Dense bf16 peak FLOP/s by GPU name (for MFU); --peak-tflops overrides.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


# -- processes and devices ---------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed() -> Dist:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: NCCL on GPUs, gloo on CPU. Else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
    rank = dist.get_rank() if world > 1 else 0
    return Dist(rank, world, local_rank, device)


def peak_flops(cfg: TrainConfig, device: torch.device) -> float | None:
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


# -- objectives (nn.Modules, so that DDP sees the forward that produces the gradients) ---------------
class PretrainObjective(nn.Module):
    """BERT MLM + NSP. The vocabulary projection runs on the masked positions only (15% of the
    tokens), not on every position as BertForPreTraining.forward does."""

    def __init__(self, model: BertForPreTraining):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids, labels, next_sentence_label):
        out = self.model.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        seq, pooled = out.last_hidden_state, out.pooler_output  # [B, L, H], [B, H]
        sel = labels != IGNORE_INDEX  # [B, L]
        logits = self.model.cls.predictions(seq[sel])  # [M, V] masked positions only
        mlm = F.cross_entropy(logits.float(), labels[sel])
        nsp_logits = self.model.cls.seq_relationship(pooled).float()  # [B, 2]
        has_nsp = next_sentence_label != IGNORE_INDEX
        # --no-nsp data (all -100): a zero loss that still touches the head, so DDP sees its params used
        nsp = (F.cross_entropy(nsp_logits[has_nsp], next_sentence_label[has_nsp]) if has_nsp.any()
               else nsp_logits.sum() * 0.0)
        acc = (logits.argmax(-1) == labels[sel]).float().mean()
        return mlm + nsp, {"loss_mlm": mlm.detach(), "loss_nsp": nsp.detach(), "mlm_acc": acc.detach()}


def student_head(student: Any, h: torch.Tensor) -> torch.Tensor:
    """DistilBertForMaskedLM's MLM head on hidden states [N, H] -> logits [N, V]."""
    return student.vocab_projector(student.vocab_layer_norm(student.activation(student.vocab_transform(h))))


class DistillObjective(nn.Module):
    """Student forward + the three DistilBERT losses against precomputed teacher outputs."""

    def __init__(self, student: nn.Module, cfg: TrainConfig):
        super().__init__()
        self.student = student
        self.t, self.a = cfg.temperature, (cfg.alpha_ce, cfg.alpha_mlm, cfg.alpha_cos)

    def forward(self, input_ids, attention_mask, labels, sel, t_logits, t_hidden):
        h = self.student.distilbert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        s_logits = student_head(self.student, h[sel])  # [N, V] on the KL rows
        real = attention_mask.bool()
        lo: DistilLosses = combine(s_logits, t_logits, labels[sel], h[real], t_hidden, self.t, *self.a)
        masked = labels[sel] != IGNORE_INDEX
        acc = (s_logits[masked].argmax(-1) == labels[sel][masked]).float().mean()
        return lo.total, {"loss_ce": lo.ce.detach(), "loss_mlm": lo.mlm.detach(), "loss_cos": lo.cos.detach(),
                          "mlm_acc": acc.detach()}


@torch.no_grad()
def teacher_outputs(teacher: Any, batch: dict[str, torch.Tensor], sel: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits on the KL rows [N, V] and last hidden states of real tokens [M, H]."""
    h = teacher.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"]).last_hidden_state  # [B, L, H]
    return teacher.cls.predictions(h[sel]), h[batch["attention_mask"].bool()]


# -- evaluation ----------------------------------------------------------------------------------------
@torch.no_grad()
def mlm_logits(model: Any, batch: dict[str, torch.Tensor], sel: torch.Tensor) -> torch.Tensor:
    """MLM logits at positions ``sel`` for a BERT (ForPreTraining/ForMaskedLM) or DistilBERT model."""
    if hasattr(model, "distilbert"):
        h = model.distilbert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return student_head(model, h[sel])
    h = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   token_type_ids=batch["token_type_ids"]).last_hidden_state
    return model.cls.predictions(h[sel])


@torch.no_grad()
def evaluate_mlm(model: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device,
                 autocast: contextlib.AbstractContextManager | None = None) -> dict[str, float]:
    """Masked-token accuracy / loss over fixed batches, plus the best constant predictor's accuracy."""
    was_training = model.training
    model.eval()
    n = correct = 0
    loss_sum = 0.0
    label_counts: dict[int, int] = {}
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        sel = b["labels"] != IGNORE_INDEX
        with autocast or contextlib.nullcontext():
            logits = mlm_logits(model, b, sel).float()
        y = b["labels"][sel]
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        n += int(y.numel())
        for t, c in zip(*torch.unique(y, return_counts=True), strict=True):
            label_counts[int(t)] = label_counts.get(int(t), 0) + int(c)
    model.train(was_training)
    majority = max(label_counts.values()) / n if n else 0.0
    return {"masked_tokens": n, "accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1),
            "majority_baseline": majority}


# -- checkpoints -----------------------------------------------------------------------------------------
def checkpoint_dirs(output: str) -> list[str]:
    root = os.path.join(output, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, d) for d in os.listdir(root) if d.startswith("step-"))


def save_checkpoint(d: Dist, cfg: TrainConfig, step: int, model: PreTrainedModel, optimizer, scheduler,
                    position: dict[str, int]) -> str:
    """All ranks call this. Written into a temp folder that is renamed when complete."""
    root = os.path.join(cfg.output, "checkpoints")
    final = os.path.join(root, f"step-{step:08d}")
    tmp = os.path.join(root, f".tmp-step-{step:08d}")
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        model.save_pretrained(tmp, safe_serialization=True)
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        write_json(os.path.join(tmp, "train_config.json"), cfg.to_dict())
        write_json(os.path.join(tmp, "trainer_state.json"),
                   {"step": step, "position": position, "world_size": d.world,
                    "fingerprint": cfg.fingerprint_for_resume()})
    d.barrier()
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state(d.device)
    torch.save(rng, os.path.join(tmp, f"rng-rank{d.rank}.pt"))
    d.barrier()
    if d.main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(cfg.output)[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    d.barrier()
    return final


def load_checkpoint(d: Dist, cfg: TrainConfig, ckpt: str, model: PreTrainedModel, optimizer, scheduler) -> int:
    """Restore model, optimizer, scheduler and this rank's RNG; returns the step to continue from."""
    with open(os.path.join(ckpt, "trainer_state.json")) as f:
        state = json.load(f)
    if state["fingerprint"] != cfg.fingerprint_for_resume():
        raise ResumeError(f"{ckpt} was written with another config; --resume needs the same settings "
                          f"(only {', '.join(cfg.run_only_fields())} may change). Use a new --output.")
    if state["world_size"] != d.world:
        raise ResumeError(f"{ckpt}: written by {state['world_size']} process(es), now {d.world}; an exact "
                          "resume needs the same number (the data order depends on it)")
    loaded = load_pretrained(type(model), ckpt)
    model.load_state_dict(loaded.state_dict())
    optimizer.load_state_dict(torch.load(os.path.join(ckpt, "optimizer.pt"), weights_only=True,
                                         map_location=d.device))
    scheduler.load_state_dict(torch.load(os.path.join(ckpt, "scheduler.pt"), weights_only=True))
    rng = torch.load(os.path.join(ckpt, f"rng-rank{d.rank}.pt"), weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"], d.device)
    return int(state["step"])


# -- the run -----------------------------------------------------------------------------------------------
def warmup_linear(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and LayerNorm weights (1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def load_teacher(name: str, device: torch.device) -> PreTrainedModel:
    try:
        cfg = AutoConfig.from_pretrained(name)
    except OSError as e:
        raise ConfigError(f"TrainConfig.teacher: cannot load {name!r} ({e}); give a local model folder "
                          "where no model hub is reachable") from e
    if cfg.model_type != "bert":
        raise ConfigError(f"TrainConfig.teacher: {name} is a {cfg.model_type!r} model; a BERT teacher is needed")
    teacher = load_pretrained(BertForMaskedLM, name)  # a BertForPreTraining checkpoint loads too (no NSP head)
    teacher.eval().requires_grad_(False)
    teacher.to(device)  # type: ignore[arg-type]  # (transformers' typing of .to)
    return teacher


def _rewrite_metrics(path: str, keep_until: int) -> None:
    """On resume, drop metric lines written after the checkpoint (they will be produced again)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= keep_until]
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


def train(cfg: TrainConfig, on_log: Callable[[dict[str, Any]], None] | None = None,
          stop_after: int = 0) -> dict[str, Any]:
    """Run pretraining or distillation as configured; returns the summary (also in OUT/summary.json).

    ``on_log`` gets every metrics record (rank 0). ``stop_after`` (tests) stops after that step as if
    the process had been killed there: no final model, only the checkpoints written so far.
    """
    d = setup_distributed()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cuda = d.device.type == "cuda"
    if cfg.precision == "bf16" and not cuda:
        raise ConfigError("TrainConfig.precision: bf16 autocast is for CUDA; use auto or fp32 on CPU")
    use_bf16 = cuda and cfg.precision in ("auto", "bf16")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext

    out = cfg.output
    summary_path = os.path.join(out, "summary.json")
    existing = checkpoint_dirs(out)
    if os.path.exists(summary_path) and existing:
        with open(summary_path) as f:
            done = json.load(f)
        if done.get("fingerprint") == cfg.fingerprint_for_resume():
            return done  # finished with the same config: nothing to do twice
    if existing and not cfg.resume:
        raise ResumeError(f"{out} already has checkpoints; pass --resume to continue, or use a new --output")
    os.makedirs(out, exist_ok=True)

    # data ------------------------------------------------------------------------------------------
    tokenizer = AutoTokenizer.from_pretrained(join(cfg.data, "tokenizer"))
    source = resolve_source(cfg.data, cfg.mask_source)
    teacher: Any = load_teacher(cfg.teacher, d.device) if cfg.mode == "distill" else None
    model_cfg: Any
    if teacher is not None:
        model_cfg = teacher.config
        if model_cfg.vocab_size < len(tokenizer):
            raise ConfigError(f"TrainConfig.teacher: {cfg.teacher} has vocab_size {model_cfg.vocab_size} but the "
                              f"data's tokenizer has {len(tokenizer)} tokens; prepare the data with the "
                              "teacher's tokenizer")
    else:
        model_cfg = teacher_config(cfg.model, len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                   dropout=cfg.dropout)
    max_len = cfg.max_seq_len or model_cfg.max_position_embeddings
    vocab = Vocab.from_tokenizer(tokenizer)
    mask_cfg = MaskConfig(mlm_prob=cfg.mlm_prob, whole_word=cfg.whole_word, smoothing=cfg.mlm_smoothing)

    def collator(ex: Examples) -> Collator:
        w = load_token_weights(cfg.data, vocab.size, cfg.mlm_smoothing) if ex.labels is None else None
        return Collator(ex, tokenizer.pad_token_id, vocab, mask_cfg, w, pad_multiple=8)

    ex = load_examples(cfg.data, "pairs" if source == "dynamic" else "masked", max_len)
    batches = StepBatches(ex, collator(ex), cfg.batch_size, cfg.seed, d.world, d.rank, cfg.grad_accum,
                          cfg.group_batches)
    total = cfg.max_steps or math.ceil(cfg.epochs * batches.steps_per_epoch)
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else int(cfg.warmup_ratio * total)
    eval_set = None
    if cfg.eval_data and d.main:
        eval_src = "pairs" if resolve_source(cfg.eval_data, cfg.mask_source) == "dynamic" else "masked"
        ev = load_examples(cfg.eval_data, eval_src, max_len)
        # uniform masks (no smoothing) so that held-out accuracy is comparable between runs
        # fixed batch size: the eval masks are drawn per batch, so they must not depend on --batch-size
        eval_set = eval_batches(ev, Collator(ev, tokenizer.pad_token_id, vocab, mask_cfg, None),
                                EVAL_BATCH, cfg.seed, cfg.eval_sequences)

    # model, optimizer, schedule ---------------------------------------------------------------------
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model: Any  # BertForPreTraining or DistilBertForMaskedLM
    if teacher is not None:
        layers = cfg.student_layers or default_student_layers(teacher.config.num_hidden_layers)
        check_student_layers(layers, teacher.config.num_hidden_layers)
        model = init_student_from_teacher(teacher, layers)
        objective: nn.Module = DistillObjective(model, cfg)
    else:
        model = build_model(BertForPreTraining, model_cfg)
        objective = PretrainObjective(model)
    model.to(d.device).train()
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.adam_betas,
                                  eps=cfg.adam_eps, fused=cuda)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(warmup, total))
    start = 0
    if existing and cfg.resume:
        start = load_checkpoint(d, cfg, existing[-1], model, optimizer, scheduler)
    else:
        torch.manual_seed(cfg.seed * 1000 + d.rank + 1)  # dropout streams differ between ranks
    if cfg.compile:
        (model.distilbert if teacher is not None else model.bert).compile()
        if teacher is not None:
            teacher.bert.compile()
    ddp: Any = nn.parallel.DistributedDataParallel(objective, device_ids=[d.device] if cuda else None) \
        if d.world > 1 else objective

    metrics_path = os.path.join(out, "metrics.jsonl")
    if d.main:
        write_json(os.path.join(out, "train_config.json"), cfg.to_dict())
        _rewrite_metrics(metrics_path, start)
    tb = None
    if cfg.tensorboard and d.main:
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(os.path.join(out, "tensorboard"))
        except ImportError:
            print("tensorboard is not installed; --tensorboard ignored", file=sys.stderr)
    peak = peak_flops(cfg, d.device)
    mc = model.config
    dims = ((mc.n_layers, mc.dim, mc.hidden_dim) if teacher is not None else
            (mc.num_hidden_layers, mc.hidden_size, mc.intermediate_size))
    tdims = (teacher.config.num_hidden_layers, teacher.config.hidden_size,
             teacher.config.intermediate_size) if teacher is not None else None

    # loop ------------------------------------------------------------------------------------------
    window: dict[str, torch.Tensor] = {}
    win_tokens, win_flops, win_steps, t0 = 0, 0.0, 0, time.perf_counter()
    history: list[dict[str, Any]] = []
    last_eval: dict[str, float] | None = None
    show = d.main and os.environ.get("DISTILFLOW_PROGRESS", "1") != "0" and sys.stderr.isatty()
    bar = tqdm(total=total, initial=start, desc=cfg.mode, unit="step", disable=not show)
    for step in range(start, total):
        bar.update(1)
        micro = batches(step)
        for i, bc in enumerate(micro):
            n_real, width = int(bc["attention_mask"].sum()), bc["input_ids"].shape[1]  # host ints, no sync
            b = {k: v.to(d.device, non_blocking=True) for k, v in bc.items()}
            sync = i == len(micro) - 1
            with (ddp.no_sync() if d.world > 1 and not sync else contextlib.nullcontext()), autocast():
                if teacher is not None:
                    sel = ce_rows(b["labels"], b["attention_mask"], cfg.restrict_ce_to_mask)
                    t_logits, t_hidden = teacher_outputs(teacher, b, sel)
                    loss, terms = ddp(b["input_ids"], b["attention_mask"], b["labels"], sel, t_logits, t_hidden)
                else:
                    loss, terms = ddp(b["input_ids"], b["attention_mask"], b["token_type_ids"], b["labels"],
                                      b["next_sentence_label"])
                (loss / len(micro)).backward()
            terms["loss"] = loss.detach()
            for k, v in terms.items():
                window[k] = window.get(k, 0.0) + v.float() / len(micro)
            # throughput: non-padding tokens; model FLOPs (student 3x forward + teacher forward)
            head_frac = cfg.mlm_prob if (teacher is None or cfg.restrict_ce_to_mask) else 1.0
            f = 3 * forward_flops_per_token(*dims, width, mc.vocab_size, head_frac)
            if tdims is not None:
                f += forward_flops_per_token(*tdims, width, mc.vocab_size, head_frac)
            win_tokens += n_real
            win_flops += f * n_real
        grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                     if cfg.max_grad_norm > 0 else torch.zeros((), device=d.device))
        window["grad_norm"] = window.get("grad_norm", 0.0) + grad_norm.detach().float()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        win_steps += 1
        done = step + 1

        if done % cfg.log_every == 0 or done == total:
            keys = sorted(window)
            vec = torch.stack([window[k] / win_steps for k in keys])
            if d.world > 1:  # mean over ranks; tokens and flops summed
                dist.all_reduce(vec)
                vec /= d.world
                tf = torch.tensor([win_tokens, win_flops], dtype=torch.float64, device=d.device)
                dist.all_reduce(tf)
                win_tokens, win_flops = int(tf[0]), float(tf[1])
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            rec: dict[str, Any] = {"step": done, "total_steps": total, "epoch": batches.position(step)["epoch"],
                                   **{k: round(float(v), 6) for k, v in zip(keys, vec.tolist(), strict=True)},
                                   "lr": scheduler.get_last_lr()[0], "tokens_per_s": round(win_tokens / dt, 1)}
            if peak:
                rec["mfu"] = round(win_flops / dt / (peak * d.world), 4)
            if d.main:
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                print("[metrics] " + json.dumps(rec), flush=True)
                if tb is not None:
                    for k, v in rec.items():
                        if isinstance(v, float):
                            tb.add_scalar(f"train/{k}", v, done)
                if on_log is not None:
                    on_log(rec)
            history.append(rec)
            window, win_tokens, win_flops, win_steps, t0 = {}, 0, 0.0, 0, time.perf_counter()

        if eval_set is not None and cfg.eval_every and done % cfg.eval_every == 0 and done != total:
            last_eval = evaluate_mlm(model, eval_set, d.device, autocast())
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps({"step": done, **{f"eval_{k}": v for k, v in last_eval.items()}}) + "\n")
        if (cfg.save_every and done % cfg.save_every == 0) or done == total:
            save_checkpoint(d, cfg, done, model, optimizer, scheduler, batches.position(done))
        if stop_after and done == stop_after:
            return {"stopped_at": done}

    bar.close()
    # final model and summary -----------------------------------------------------------------------
    summary: dict[str, Any] = {}
    if d.main:
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        summary = {"mode": cfg.mode, "fingerprint": cfg.fingerprint_for_resume(), "steps": total,
                   "resumed_from": start, "parameters": n_params, "world_size": d.world, "mask_source": source,
                   "sequences": len(ex), "steps_per_epoch": batches.steps_per_epoch,
                   "last": history[-1] if history else None}
        if eval_set is not None:
            summary["eval"] = evaluate_mlm(model, eval_set, d.device, autocast())
            if teacher is not None:
                summary["teacher_eval"] = evaluate_mlm(teacher, eval_set, d.device, autocast())
            summary["eval"]["uniform_baseline"] = 1.0 / len(vocab.random_ids)
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps({"step": total, **{f"eval_{k}": v for k, v in summary["eval"].items()}}) + "\n")
        write_json(summary_path, summary)
        if tb is not None:
            tb.close()
    d.barrier()
    del last_eval
    return summary


def launch_command(config_json: str, nproc_per_node: int, torchrun: bool = True) -> list[str]:
    """The command the Prefect task runs: ``torchrun --standalone --nproc-per-node N -m
    distilflow.tasks.train.loop run CONFIG_JSON`` (or plain ``python -m ...`` for one process)."""
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    module = ["-m", "distilflow.tasks.train.loop", "run", config_json]
    if not torchrun:
        return [sys.executable, *module]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(nproc_per_node), *module]


def read_metrics(output: str) -> list[dict[str, Any]]:
    """The training metric records of OUT/metrics.jsonl (eval lines excluded)."""
    path = os.path.join(output, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        recs = [json.loads(ln) for ln in f if ln.strip()]
    return [r for r in recs if "loss" in r]


def main(argv: list[str] | None = None) -> int:
    from distilflow.tasks.train.config import DISTILL, PRETRAIN

    parser = argparse.ArgumentParser(prog="python -m distilflow.tasks.train.loop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode, spec in (("pretrain", PRETRAIN), ("distill", DISTILL)):
        p = sub.add_parser(mode)
        spec.add_to(p)
        p.set_defaults(spec=spec)
    rerun = sub.add_parser("run", help="run a saved TrainConfig json (what the Prefect task launches)")
    rerun.add_argument("config_json")
    args = parser.parse_args(argv)
    if args.mode == "run":
        with open(args.config_json) as f:
            cfg = TrainConfig.from_dict(json.load(f))
    else:
        cfg = args.spec.config_from(args)
    try:
        train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
