"""Fine-tuning for GLUE (sequence classification / regression) and SQuAD (extractive QA).

One run = one (task, seed): load ``AutoModelFor{SequenceClassification,QuestionAnswering}`` from a
local model folder (a new head is initialised from ``seed``), train with AdamW and a linear
warm-up/decay schedule, evaluate with the task's official metric, and ``save_pretrained`` the model
and tokenizer (safetensors) so the folder loads in the ``text-classification`` /
``question-answering`` pipelines. Runs on CPU or CUDA; on CUDA the forward pass uses bf16 autocast
(weights and optimizer state stay fp32), on the CPU only when asked (``cpu_bf16``) and where the CPU computes
bf16 natively.

The loop is deliberately plain (nanoGPT style): batches of pre-tokenised tensors, one optimizer,
one scheduler, gradient clipping -- no Trainer, so every hyper-parameter is visible in the config
that is saved with the results.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from distilflow.tasks.core.errors import InputError
from distilflow.tasks.core.hf import (
    build_model,
    check_model_folder,
    load_pretrained,
    local_model,
    require_native_bf16,
    resolve_device,
)
from distilflow.tasks.core.io import join, write_json
from distilflow.tasks.evaluate import glue as glue_mod
from distilflow.tasks.evaluate import metrics as M
from distilflow.tasks.evaluate import squad as squad_mod
from distilflow.tasks.evaluate.config import FinetuneConfig, TaskDistillConfig
from distilflow.tasks.evaluate.task_distill import task_distill_loss

# GLUE / SQuAD recipes differ in sequence length and learning rate (BERT's run_squad: 384/128, 3e-5).
SQUAD_DEFAULTS: dict[str, Any] = {"max_seq_len": 384, "learning_rate": 3e-5, "batch_size": 12, "epochs": 2.0,
                  "eval_batch_size": 64}


# A training loss other than the model's own: (model, batch of device tensors) -> scalar loss.
LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


# -- plumbing --------------------------------------------------------------------------------------------
def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA


def autocast(device: torch.device, bf16: bool, cpu_bf16: bool = False):
    """bf16 autocast on CUDA (``bf16``), on the CPU only with ``cpu_bf16`` (refused where the CPU would emulate
    bf16: slower than float32); float32 otherwise, so CPU runs stay bit-identical by default."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and cpu_bf16:
        require_native_bf16("FinetuneConfig.cpu_bf16", "leave out --cpu-bf16 on this machine")
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def show_progress() -> bool:
    return os.environ.get("DISTILFLOW_PROGRESS", "1") != "0"


def load_tokenizer(model_path: str, tokenizer_path: str | None = None):
    from transformers import AutoTokenizer

    path = tokenizer_path or model_path
    try:
        return AutoTokenizer.from_pretrained(local_model(path))  # s3:// folders through the verified cache
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"no tokenizer in {path} ({e}); save it next to the model (tokenizer.save_pretrained) or pass "
            "--tokenizer PATH") from e


def save_model(model: Any, tokenizer: Any, model_dir: str) -> str:
    """``save_pretrained`` model and tokenizer into ``model_dir``; a bucket URL gets a local folder uploaded
    file by file (each atomic, the manifest last: :func:`~distilflow.tasks.core.remote.upload_folder`)."""
    from distilflow.tasks.core.remote import written_locally

    with written_locally(model_dir) as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return model_dir


def _optimizer(model: torch.nn.Module, cfg: FinetuneConfig, total_steps: int):
    # No weight decay on biases and LayerNorm weights (BERT's recipe).
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate)
    warmup = int(cfg.warmup_ratio * total_steps)

    def lr_lambda(step: int) -> float:  # linear warm-up to lr, then linear decay to 0
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


def _pad(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def _model_inputs(model: torch.nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def train_loop(model: torch.nn.Module, make_batch, n_examples: int, cfg: FinetuneConfig, device: torch.device,
               seed: int, desc: str, loss_fn: LossFn | None = None) -> dict[str, Any]:
    """Shuffle -> batch -> forward (autocast) -> loss.backward -> clip -> AdamW step -> schedule.

    make_batch(indices: np.ndarray) -> dict of CPU tensors including the labels; the model returns
    ``.loss`` (HF heads compute cross-entropy / MSE / span CE themselves). ``loss_fn(model, batch)``
    replaces that loss (task distillation adds the soft-target term).
    """
    steps_per_epoch = math.ceil(n_examples / cfg.batch_size)
    total = math.ceil(cfg.epochs * steps_per_epoch)
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    opt, sched = _optimizer(model, cfg, total)
    rng = np.random.default_rng(seed)  # data order depends on the seed only
    model.to(device).train()
    step, losses, t0, seen = 0, [], time.perf_counter(), 0
    with tqdm(total=total, desc=desc, unit="step", disable=not show_progress()) as bar:
        while step < total:
            order = rng.permutation(n_examples)
            for b in range(0, n_examples, cfg.batch_size):
                if step >= total:
                    break
                batch = {k: v.to(device) for k, v in make_batch(order[b:b + cfg.batch_size]).items()}
                with autocast(device, cfg.bf16, cfg.cpu_bf16):
                    loss = loss_fn(model, batch) if loss_fn else model(**batch).loss
                loss.backward()
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                seen += len(batch["input_ids"])
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    seconds = time.perf_counter() - t0
    return {"steps": step, "train_seconds": round(seconds, 3), "examples_per_s": round(seen / max(seconds, 1e-9), 2),
            "first_loss": losses[0] if losses else None,
            "final_loss": float(np.mean(losses[-10:])) if losses else None}


# -- loading, soft targets ---------------------------------------------------------------------------------
def _load_for_finetuning(auto_cls: Any, model_path: str, from_scratch: bool, **kwargs: Any) -> Any:
    """The model with a new task head; ``from_scratch``: the same architecture with random weights (drawn from
    the seed set just before)."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialised classifier weights" is expected here
    try:
        if from_scratch:
            local = local_model(model_path)
            check_model_folder(local)
            return build_model(auto_cls.from_config, AutoConfig.from_pretrained(local, **kwargs))
        return load_pretrained(auto_cls, model_path, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)


def _load_teacher(auto_cls: Any, teacher: str, tokenizer: Any, device: torch.device) -> Any:
    """A fine-tuned teacher for soft targets; it must read the student's token ids (same vocabulary)."""
    t_tok = load_tokenizer(teacher)
    if t_tok.get_vocab() != tokenizer.get_vocab():
        raise InputError(f"{teacher}: the teacher's vocabulary differs from the student's; task distillation "
                         "needs the same token ids (use the teacher the student was distilled from)")
    return load_pretrained(auto_cls, teacher).to(device).eval()


def _kd_loss(kd: TaskDistillConfig, keys: tuple[str, ...], regression: bool = False) -> LossFn:
    """Task loss (the model's, from the labels in the batch) plus the soft-target term on ``keys`` outputs."""
    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        targets = tuple(batch[f"teacher_{k}"] for k in keys)
        out = model(**{k: v for k, v in batch.items() if not k.startswith("teacher_")})
        return task_distill_loss(out.loss, tuple(getattr(out, k) for k in keys), targets, kd.temperature, kd.alpha,
                                 regression=regression)
    return loss


# -- GLUE --------------------------------------------------------------------------------------------------
def glue_metrics(task: glue_mod.GlueTask, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Official metric(s) of ``task`` x100, plus ``score`` = the headline (first) metric."""
    fns = {"accuracy": M.accuracy, "f1": M.f1_binary, "matthews": M.matthews_corrcoef,
           "pearson": M.pearson, "spearman": M.spearman}
    out = {m: 100.0 * fns[m](preds, labels) for m in task.metrics}
    out["score"] = out[task.metrics[0]]
    return out


def _glue_collate(pad_id: int, accepted: set[str]) -> Callable[[list[dict[str, list[int]]]], dict[str, torch.Tensor]]:
    """Pad a list of encoded rows into a batch of the inputs the model accepts (DistilBERT: no token types)."""
    def collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        batch = {"input_ids": _pad([r["input_ids"] for r in rows], pad_id),
                 "attention_mask": _pad([r["attention_mask"] for r in rows], 0)}
        if "token_type_ids" in rows[0] and "token_type_ids" in accepted:
            batch["token_type_ids"] = _pad([r["token_type_ids"] for r in rows], 0)
        return batch
    return collate


def _glue_teacher_logits(teacher: str, tokenizer: Any, t: glue_mod.GlueTask, enc: list[dict[str, list[int]]],
                         pad_id: int, cfg: FinetuneConfig, device: torch.device) -> torch.Tensor:
    """The fine-tuned teacher's logits for every training row, float32 [N, num_labels] (eval mode)."""
    from transformers import AutoModelForSequenceClassification

    model = _load_teacher(AutoModelForSequenceClassification, teacher, tokenizer, device)
    if model.config.num_labels != t.num_labels:
        raise InputError(f"{teacher}: has {model.config.num_labels} output(s), task {t.name} needs {t.num_labels}; "
                         "give a teacher fine-tuned on this task")
    collate = _glue_collate(pad_id, _model_inputs(model))
    outs = []
    with torch.no_grad():
        for b in range(0, len(enc), cfg.eval_batch_size):
            batch = {k: v.to(device) for k, v in collate(enc[b:b + cfg.eval_batch_size]).items()}
            with autocast(device, cfg.bf16, cfg.cpu_bf16):
                outs.append(model(**batch).logits.float().cpu())
    return torch.cat(outs)


def _encode_pairs(tokenizer, examples: list[glue_mod.Example], max_len: int) -> list[dict[str, list[int]]]:
    a = [e.text_a for e in examples]
    b = [e.text_b for e in examples] if examples and examples[0].text_b is not None else None
    enc = tokenizer(a, b, truncation=True, max_length=max_len)
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    return [{k: enc[k][i] for k in keys} for i in range(len(examples))]


def finetune_glue(model_path: str, task: str, train: list[glue_mod.Example], held_out: list[glue_mod.Example],
                  cfg: FinetuneConfig, seed: int, out_dir: str | None = None, tokenizer_path: str | None = None,
                  *, from_scratch: bool = False, teacher: str | None = None,
                  kd: TaskDistillConfig | None = None) -> dict[str, Any]:
    """Fine-tune ``model_path`` on ``train`` and score ``held_out``; save to ``out_dir/model`` if given.

    ``from_scratch``: the same architecture, randomly initialised from ``seed`` (the baseline that shows
    what pretraining brought). ``teacher``: a model fine-tuned on this task whose soft targets are added to
    the loss (task distillation, ``kd``: temperature and weight).
    """
    from transformers import AutoModelForSequenceClassification

    t = glue_mod.get_task(task)
    if not train or not held_out:
        raise ValueError(f"{t.name}: need train and evaluation examples, got {len(train)} / {len(held_out)}")
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(model_path, tokenizer_path)
    set_seed(seed)  # the new classification head is initialised from this seed
    kwargs: dict[str, Any] = {"num_labels": t.num_labels}
    if t.is_regression:
        kwargs["problem_type"] = "regression"
    else:
        kwargs["problem_type"] = "single_label_classification"
        kwargs["id2label"] = dict(enumerate(t.labels))
        kwargs["label2id"] = {name: i for i, name in enumerate(t.labels)}
    model = _load_for_finetuning(AutoModelForSequenceClassification, model_path, from_scratch, **kwargs)
    pad_id = tokenizer.pad_token_id or 0
    collate = _glue_collate(pad_id, _model_inputs(model))

    enc_train = _encode_pairs(tokenizer, train, cfg.max_seq_len)
    label_dtype = torch.float32 if t.is_regression else torch.long
    y_train = torch.tensor([e.label for e in train], dtype=label_dtype)
    extra: dict[str, torch.Tensor] = {}
    loss_fn = None
    if teacher:  # soft targets: the teacher's logits [N_train, num_labels], computed once
        kd = kd or TaskDistillConfig()
        with torch.random.fork_rng(devices=[]):  # the student's dropout draws stay those of plain fine-tuning
            extra["teacher_logits"] = _glue_teacher_logits(teacher, tokenizer, t, enc_train, pad_id, cfg, device)
        loss_fn = _kd_loss(kd, ("logits",), regression=t.is_regression)

    def make_batch(idx: np.ndarray) -> dict[str, torch.Tensor]:
        return {**collate([enc_train[i] for i in idx]), "labels": y_train[idx],
                **{k: v[idx] for k, v in extra.items()}}

    stats = train_loop(model, make_batch, len(train), cfg, device, seed, desc=f"{t.name} seed {seed}",
                       loss_fn=loss_fn)

    # evaluation: logits [N, num_labels] -> argmax (classification) or the single value (regression)
    enc_eval = _encode_pairs(tokenizer, held_out, cfg.max_seq_len)
    model.eval()
    outs = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in range(0, len(enc_eval), cfg.eval_batch_size):
            batch = {k: v.to(device) for k, v in collate(enc_eval[b:b + cfg.eval_batch_size]).items()}
            with autocast(device, cfg.bf16, cfg.cpu_bf16):
                outs.append(model(**batch).logits.float().cpu())
    logits = torch.cat(outs).numpy()
    preds = logits[:, 0] if t.is_regression else logits.argmax(-1)
    labels = np.asarray([e.label for e in held_out])
    result = {"task": t.name, "seed": seed, "n_train": len(train), "n_eval": len(held_out),
              **glue_metrics(t, preds, labels), **stats, "eval_seconds": round(time.perf_counter() - t0, 3),
              "device": str(device)}
    if teacher:
        result["teacher"] = teacher
    if out_dir:
        result["model_dir"] = save_model(model, tokenizer, join(out_dir, "model"))
    return result


# -- SQuAD -------------------------------------------------------------------------------------------------
def finetune_squad(model_path: str, train: list[squad_mod.SquadExample], held_out: list[squad_mod.SquadExample],
                   cfg: FinetuneConfig, seed: int, out_dir: str | None = None, tokenizer_path: str | None = None,
                   *, from_scratch: bool = False, teacher: str | None = None,
                   kd: TaskDistillConfig | None = None) -> dict[str, Any]:
    """Fine-tune for extractive QA on ``train``; score ``held_out`` (official EM/F1).

    With ``out_dir``: the model + tokenizer go to ``out_dir/model``, answers to ``out_dir/predictions.json``
    (the official ``{question id: answer}`` format). ``from_scratch`` / ``teacher`` / ``kd``: as
    :func:`finetune_glue` (the soft targets are the teacher's start and end distributions).
    """
    from transformers import AutoModelForQuestionAnswering

    if not train or not held_out:
        raise ValueError(f"squad: need train and evaluation questions, got {len(train)} / {len(held_out)}")
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(model_path, tokenizer_path)
    set_seed(seed)
    model = _load_for_finetuning(AutoModelForQuestionAnswering, model_path, from_scratch)
    accepted = _model_inputs(model)

    def tensors(f: squad_mod.Features, idx: np.ndarray | slice) -> dict[str, torch.Tensor]:
        return _qa_inputs(f, idx, accepted)

    ftr = squad_mod.make_features(train, tokenizer, cfg.max_seq_len, cfg.doc_stride, cfg.max_query_len, train=True)
    extra: dict[str, torch.Tensor] = {}
    loss_fn = None
    if teacher:  # soft targets: the teacher's start/end logits [N_windows, L] each, computed once
        kd = kd or TaskDistillConfig()
        with torch.random.fork_rng(devices=[]):  # the student's dropout draws stay those of plain fine-tuning
            t_model = _load_teacher(AutoModelForQuestionAnswering, teacher, tokenizer, device)
            starts, ends = _qa_logits(t_model, ftr, cfg, device)
        extra = {"teacher_start_logits": torch.from_numpy(starts), "teacher_end_logits": torch.from_numpy(ends)}
        del t_model
        loss_fn = _kd_loss(kd, ("start_logits", "end_logits"))

    def make_batch(idx: np.ndarray) -> dict[str, torch.Tensor]:
        return {**tensors(ftr, idx), "start_positions": torch.from_numpy(ftr.start_positions[idx]),
                "end_positions": torch.from_numpy(ftr.end_positions[idx]), **{k: v[idx] for k, v in extra.items()}}

    stats = train_loop(model, make_batch, len(ftr), cfg, device, seed, desc=f"squad seed {seed}", loss_fn=loss_fn)

    fev = squad_mod.make_features(held_out, tokenizer, cfg.max_seq_len, cfg.doc_stride, cfg.max_query_len)
    t0 = time.perf_counter()
    start_logits, end_logits = _qa_logits(model, fev, cfg, device)
    predictions = squad_mod.postprocess(held_out, fev, start_logits, end_logits, cfg.n_best, cfg.max_answer_length)
    scores = squad_mod.score(held_out, predictions)
    result = {"task": "squad", "seed": seed, "n_train": len(train), "n_eval": len(held_out),
              "train_features": len(ftr), "eval_features": len(fev), **scores, "score": scores["f1"], **stats,
              "eval_seconds": round(time.perf_counter() - t0, 3), "device": str(device)}
    if teacher:
        result["teacher"] = teacher
    if out_dir:
        result["model_dir"] = save_model(model, tokenizer, join(out_dir, "model"))
        write_json(join(out_dir, "predictions.json"), predictions)
    return result


def _qa_inputs(f: squad_mod.Features, idx: np.ndarray | slice, accepted: set[str]) -> dict[str, torch.Tensor]:
    batch = {"input_ids": torch.from_numpy(f.input_ids[idx]).long(),
             "attention_mask": torch.from_numpy(f.attention_mask[idx]).long()}
    if f.token_type_ids is not None and "token_type_ids" in accepted:
        batch["token_type_ids"] = torch.from_numpy(f.token_type_ids[idx]).long()
    return batch


def _qa_logits(model: torch.nn.Module, feats: squad_mod.Features, cfg: FinetuneConfig,
               device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Start/end logits, float32 [N_windows, L] each."""
    accepted = _model_inputs(model)
    model.eval()
    starts, ends = [], []
    with torch.no_grad():
        for b in range(0, len(feats), cfg.eval_batch_size):
            batch = {k: v.to(device) for k, v in _qa_inputs(feats, slice(b, b + cfg.eval_batch_size), accepted).items()}
            with autocast(device, cfg.bf16, cfg.cpu_bf16):
                out = model(**batch)
            starts.append(out.start_logits.float().cpu())
            ends.append(out.end_logits.float().cpu())
    return torch.cat(starts).numpy(), torch.cat(ends).numpy()


def answer_questions(model_dir: str, questions: list[tuple[str, str]], cfg: FinetuneConfig | None = None) -> list[str]:
    """Extractive QA with a fine-tuned folder: ``[(question, context)] -> [answer text]``.

    The same windows / n-best / max-answer-length post-processing as the evaluation. (transformers 5
    removed the ``question-answering`` pipeline; this is its replacement for our saved models.)
    """
    from transformers import AutoModelForQuestionAnswering

    cfg = cfg or FinetuneConfig(**SQUAD_DEFAULTS)
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(model_dir)
    model = load_pretrained(AutoModelForQuestionAnswering, model_dir).to(device)
    examples = [squad_mod.SquadExample(str(i), "", c, q, ("",), (0,)) for i, (q, c) in enumerate(questions)]
    feats = squad_mod.make_features(examples, tokenizer, cfg.max_seq_len, cfg.doc_stride, cfg.max_query_len)
    s, e = _qa_logits(model, feats, cfg, device)
    pred = squad_mod.postprocess(examples, feats, s, e, cfg.n_best, cfg.max_answer_length)
    return [pred[ex.id] for ex in examples]


def median_over_seeds(runs: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, float]:
    """Per-metric median over seed runs (``--seeds 3`` -> the middle run's value of each metric)."""
    return {k: float(np.median([r[k] for r in runs])) for k in keys if all(k in r for r in runs)}
