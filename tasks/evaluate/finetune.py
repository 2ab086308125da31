"""Fine-tuning for GLUE (sequence classification / regression) and SQuAD (extractive QA).

One run = one (task, seed): load ``AutoModelFor{SequenceClassification,QuestionAnswering}`` from a
local model folder (a new head is initialised from ``seed``), train with AdamW and a linear
warm-up/decay schedule, evaluate with the task's official metric, and ``save_pretrained`` the model
and tokenizer (safetensors) so the folder loads in the ``text-classification`` /
``question-answering`` pipelines. Runs on CPU or CUDA; on CUDA the forward pass uses bf16 autocast
(weights and optimizer state stay fp32).

The loop is deliberately plain (nanoGPT style): batches of pre-tokenised tensors, one optimizer,
one scheduler, gradient clipping -- no Trainer, so every hyper-parameter is visible in the config
that is saved with the results.
"""

from __future__ import annotations

import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from distilflow.tasks.core.config import Config, require
from distilflow.tasks.core.hf import load_pretrained, resolve_device
from distilflow.tasks.core.io import write_json
from distilflow.tasks.evaluate import glue as glue_mod
from distilflow.tasks.evaluate import metrics as M
from distilflow.tasks.evaluate import squad as squad_mod


@dataclass(frozen=True)
class FinetuneConfig(Config):
    """Hyper-parameters of one fine-tuning run (saved with every result).

    Defaults follow BERT/DistilBERT GLUE practice: lr 5e-5, batch 32, 3 epochs, seq 128, 10% warm-up,
    weight decay 0.01 (not on biases/LayerNorm), gradient clipping at 1.0.
    """

    learning_rate: float = 5e-5
    batch_size: int = 32
    epochs: float = 3.0
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_seq_len: int = 128
    eval_batch_size: int = 128
    max_steps: int = 0  # 0 = epochs decide; >0 caps the number of optimizer steps (smoke runs)
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    bf16: bool = True  # bf16 autocast on CUDA; ignored on CPU
    # SQuAD only (BERT's run_squad defaults)
    doc_stride: int = 128
    max_query_len: int = 64
    n_best: int = 20
    max_answer_length: int = 30

    def check(self) -> None:
        n = type(self).__name__
        require(self.learning_rate > 0, n, "learning_rate", "must be > 0")
        require(self.batch_size > 0, n, "batch_size", "must be > 0")
        require(self.eval_batch_size > 0, n, "eval_batch_size", "must be > 0")
        require(self.epochs > 0, n, "epochs", "must be > 0")
        require(0 <= self.warmup_ratio < 1, n, "warmup_ratio", "must be in [0, 1)")
        require(self.weight_decay >= 0, n, "weight_decay", "must be >= 0")
        require(self.max_grad_norm >= 0, n, "max_grad_norm", "must be >= 0 (0 = no clipping)")
        require(self.max_seq_len >= 16, n, "max_seq_len", "must be >= 16")
        require(self.max_steps >= 0, n, "max_steps", "must be >= 0")
        require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), n, "device",
                f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        require(self.n_best > 0, n, "n_best", "must be > 0")
        require(self.max_answer_length > 0, n, "max_answer_length", "must be > 0")


# GLUE / SQuAD recipes differ in sequence length and learning rate (BERT's run_squad: 384/128, 3e-5).
SQUAD_DEFAULTS: dict[str, Any] = {"max_seq_len": 384, "learning_rate": 3e-5, "batch_size": 12, "epochs": 2.0,
                  "eval_batch_size": 64}


# -- plumbing --------------------------------------------------------------------------------------------
def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA


def autocast(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def show_progress() -> bool:
    return os.environ.get("DISTILFLOW_PROGRESS", "1") != "0"


def load_tokenizer(model_path: str, tokenizer_path: str | None = None):
    from transformers import AutoTokenizer

    path = tokenizer_path or model_path
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"no tokenizer in {path} ({e}); save it next to the model (tokenizer.save_pretrained) or pass "
            "--tokenizer PATH") from e


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
               seed: int, desc: str) -> dict[str, Any]:
    """Shuffle -> batch -> forward (autocast) -> loss.backward -> clip -> AdamW step -> schedule.

    make_batch(indices: np.ndarray) -> dict of CPU tensors including the labels; the model returns
    ``.loss`` (HF heads compute cross-entropy / MSE / span CE themselves).
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
                with autocast(device, cfg.bf16):
                    loss = model(**batch).loss
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


# -- GLUE --------------------------------------------------------------------------------------------------
def glue_metrics(task: glue_mod.GlueTask, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Official metric(s) of ``task`` x100, plus ``score`` = the headline (first) metric."""
    fns = {"accuracy": M.accuracy, "f1": M.f1_binary, "matthews": M.matthews_corrcoef,
           "pearson": M.pearson, "spearman": M.spearman}
    out = {m: 100.0 * fns[m](preds, labels) for m in task.metrics}
    out["score"] = out[task.metrics[0]]
    return out


def _encode_pairs(tokenizer, examples: list[glue_mod.Example], max_len: int) -> list[dict[str, list[int]]]:
    a = [e.text_a for e in examples]
    b = [e.text_b for e in examples] if examples and examples[0].text_b is not None else None
    enc = tokenizer(a, b, truncation=True, max_length=max_len)
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    return [{k: enc[k][i] for k in keys} for i in range(len(examples))]


def finetune_glue(model_path: str, task: str, train: list[glue_mod.Example], held_out: list[glue_mod.Example],
                  cfg: FinetuneConfig, seed: int, out_dir: str | None = None,
                  tokenizer_path: str | None = None) -> dict[str, Any]:
    """Fine-tune ``model_path`` on ``train`` and score ``held_out``; save to ``out_dir/model`` if given."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

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
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialised classifier weights" is expected here
    try:
        model = load_pretrained(AutoModelForSequenceClassification, model_path, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    accepted = _model_inputs(model)

    enc_train = _encode_pairs(tokenizer, train, cfg.max_seq_len)
    label_dtype = torch.float32 if t.is_regression else torch.long
    y_train = torch.tensor([e.label for e in train], dtype=label_dtype)
    pad_id = tokenizer.pad_token_id or 0

    def collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        batch = {"input_ids": _pad([r["input_ids"] for r in rows], pad_id),
                 "attention_mask": _pad([r["attention_mask"] for r in rows], 0)}
        if "token_type_ids" in rows[0] and "token_type_ids" in accepted:
            batch["token_type_ids"] = _pad([r["token_type_ids"] for r in rows], 0)
        return batch

    def make_batch(idx: np.ndarray) -> dict[str, torch.Tensor]:
        return {**collate([enc_train[i] for i in idx]), "labels": y_train[idx]}

    stats = train_loop(model, make_batch, len(train), cfg, device, seed, desc=f"{t.name} seed {seed}")

    # evaluation: logits [N, num_labels] -> argmax (classification) or the single value (regression)
    enc_eval = _encode_pairs(tokenizer, held_out, cfg.max_seq_len)
    model.eval()
    outs = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in range(0, len(enc_eval), cfg.eval_batch_size):
            batch = {k: v.to(device) for k, v in collate(enc_eval[b:b + cfg.eval_batch_size]).items()}
            with autocast(device, cfg.bf16):
                outs.append(model(**batch).logits.float().cpu())
    logits = torch.cat(outs).numpy()
    preds = logits[:, 0] if t.is_regression else logits.argmax(-1)
    labels = np.asarray([e.label for e in held_out])
    result = {"task": t.name, "seed": seed, "n_train": len(train), "n_eval": len(held_out),
              **glue_metrics(t, preds, labels), **stats, "eval_seconds": round(time.perf_counter() - t0, 3),
              "device": str(device)}
    if out_dir:
        model_dir = os.path.join(out_dir, "model")
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        result["model_dir"] = model_dir
    return result


# -- SQuAD -------------------------------------------------------------------------------------------------
def finetune_squad(model_path: str, train: list[squad_mod.SquadExample], held_out: list[squad_mod.SquadExample],
                   cfg: FinetuneConfig, seed: int, out_dir: str | None = None,
                   tokenizer_path: str | None = None) -> dict[str, Any]:
    """Fine-tune for extractive QA on ``train``; score ``held_out`` (official EM/F1).

    With ``out_dir``: the model + tokenizer go to ``out_dir/model``, answers to ``out_dir/predictions.json``
    (the official ``{question id: answer}`` format).
    """
    from transformers import AutoModelForQuestionAnswering
    from transformers.utils import logging as hf_logging

    if not train or not held_out:
        raise ValueError(f"squad: need train and evaluation questions, got {len(train)} / {len(held_out)}")
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(model_path, tokenizer_path)
    set_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = load_pretrained(AutoModelForQuestionAnswering, model_path)
    finally:
        hf_logging.set_verbosity(verbosity)
    accepted = _model_inputs(model)

    def tensors(f: squad_mod.Features, idx: np.ndarray | slice) -> dict[str, torch.Tensor]:
        return _qa_inputs(f, idx, accepted)

    ftr = squad_mod.make_features(train, tokenizer, cfg.max_seq_len, cfg.doc_stride, cfg.max_query_len, train=True)

    def make_batch(idx: np.ndarray) -> dict[str, torch.Tensor]:
        return {**tensors(ftr, idx), "start_positions": torch.from_numpy(ftr.start_positions[idx]),
                "end_positions": torch.from_numpy(ftr.end_positions[idx])}

    stats = train_loop(model, make_batch, len(ftr), cfg, device, seed, desc=f"squad seed {seed}")

    fev = squad_mod.make_features(held_out, tokenizer, cfg.max_seq_len, cfg.doc_stride, cfg.max_query_len)
    t0 = time.perf_counter()
    start_logits, end_logits = _qa_logits(model, fev, cfg, device)
    predictions = squad_mod.postprocess(held_out, fev, start_logits, end_logits, cfg.n_best, cfg.max_answer_length)
    scores = squad_mod.score(held_out, predictions)
    result = {"task": "squad", "seed": seed, "n_train": len(train), "n_eval": len(held_out),
              "train_features": len(ftr), "eval_features": len(fev), **scores, "score": scores["f1"], **stats,
              "eval_seconds": round(time.perf_counter() - t0, 3), "device": str(device)}
    if out_dir:
        model_dir = os.path.join(out_dir, "model")
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        write_json(os.path.join(out_dir, "predictions.json"), predictions)
        result["model_dir"] = model_dir
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
            with autocast(device, cfg.bf16):
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
