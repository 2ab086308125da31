"""Held-out masked-LM evaluation: top-1 / top-5 accuracy and perplexity on a prepared ``masked/`` split.

Input is the ``masked/part-*.parquet`` of a prepared folder (CONTRIBUTING.md data contract): every
row has the masked ``input_ids``, ``token_type_ids`` and ``labels`` (original id where a token was
selected for prediction, -100 elsewhere). Using the *stored* masks means a student and its teacher are
scored on exactly the same predictions, and a rerun gives the same numbers.

Reported over all predicted positions (BERT's 80% [MASK] / 10% random / 10% unchanged mix):

* ``top1`` / ``top5``: share of positions whose original token is the argmax / in the 5 best;
* ``perplexity``: exp(mean cross-entropy in nats) -- the masked-LM "pseudo" perplexity, comparable
  between models with the *same tokenizer and masks*, not with causal-LM perplexities;
* ``top1_mask_token``: top-1 on the positions that show [MASK] only (the hardest, cleanest case).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from distilflow.tasks.core.config import Config, require
from distilflow.tasks.core.hf import load_pretrained, local_model, resolve_device
from distilflow.tasks.core.io import exists, iter_parquet_batches, join, listdir
from distilflow.tasks.evaluate.finetune import autocast, show_progress
from distilflow.tasks.evaluate.metrics import perplexity
from distilflow.tasks.prepare.masking import IGNORE_INDEX


@dataclass(frozen=True)
class MLMEvalConfig(Config):
    batch_size: int = 32
    max_examples: int = 0  # 0 = every row of masked/; N = the first N rows (files in name order)
    device: str = "auto"
    bf16: bool = True  # bf16 autocast on CUDA (logits are upcast to fp32 before the softmax)

    def check(self) -> None:
        n = type(self).__name__
        require(self.batch_size > 0, n, "batch_size", "must be > 0")
        require(self.max_examples >= 0, n, "max_examples", "must be >= 0 (0 = all)")


def masked_files(data_dir: str) -> list[str]:
    files = listdir(join(data_dir, "masked"), ".parquet")
    files = [f for f in files if f.rsplit("/", 1)[-1].startswith("part-")]
    if not files:
        raise FileNotFoundError(
            f"{join(data_dir, 'masked')}: no part-*.parquet; run `distilflow prepare --input HELD_OUT_FILES "
            f"--output {data_dir} --tokenizer ...` on held-out text first")
    return files


def iter_masked_batches(data_dir: str, batch_size: int, max_examples: int = 0):
    """Yield lists of rows ``(input_ids, token_type_ids, labels)`` (Python lists), ``batch_size`` at a time."""
    rows: list[tuple[list[int], list[int], list[int]]] = []
    n = 0
    for url in masked_files(data_dir):
        for rb in iter_parquet_batches(url, columns=["input_ids", "token_type_ids", "labels"], batch_size=1024):
            cols = [rb.column(i).to_pylist() for i in range(3)]
            for ids, tt, lab in zip(*cols, strict=True):
                if len(ids) != len(lab):
                    raise ValueError(f"{url}: a row has {len(ids)} input_ids but {len(lab)} labels (corrupt masked/ data)")
                rows.append((ids, tt, lab))
                n += 1
                if len(rows) == batch_size:
                    yield rows
                    rows = []
                if max_examples and n >= max_examples:
                    if rows:
                        yield rows
                    return
    if rows:
        yield rows


def check_tokenizer(model_path: str, data_dir: str) -> None:
    """Refuse to score a model on data made with a different vocabulary (the numbers would be noise)."""
    from transformers import AutoTokenizer

    data_tok, model_tok = join(data_dir, "tokenizer"), model_path
    if not (exists(join(data_tok, "tokenizer.json")) and exists(join(model_tok, "tokenizer.json"))):
        return  # nothing to compare; the vocab-size check in evaluate_mlm still applies
    a = AutoTokenizer.from_pretrained(local_model(data_tok)).get_vocab()
    b = AutoTokenizer.from_pretrained(local_model(model_tok)).get_vocab()
    if a != b:
        raise ValueError(f"{model_path} uses a different vocabulary than {data_dir}/tokenizer "
                         f"({len(b)} vs {len(a)} entries); prepare the held-out data with the model's tokenizer")


def evaluate_mlm(model_path: str, data_dir: str, cfg: MLMEvalConfig | None = None) -> dict[str, Any]:
    """Score one model on ``data_dir/masked``. Returns top1/top5 (x100), perplexity, counts, timing."""
    from transformers import AutoModelForMaskedLM

    cfg = cfg or MLMEvalConfig()
    check_tokenizer(model_path, data_dir)
    device = resolve_device(cfg.device)
    model = load_pretrained(AutoModelForMaskedLM, model_path).to(device).eval()
    vocab_size = model.get_output_embeddings().weight.shape[0]
    mask_id = _mask_id(model_path, data_dir)
    import inspect

    takes_token_types = "token_type_ids" in inspect.signature(model.forward).parameters
    nll = 0.0
    n_pred = top1 = top5 = 0
    n_mask_tok = top1_mask_tok = 0
    n_rows = 0
    t0 = time.perf_counter()
    with torch.no_grad(), tqdm(desc=f"mlm {model_path.rstrip('/').rsplit('/', 1)[-1]}", unit="row",
                               disable=not show_progress()) as bar:
        for rows in iter_masked_batches(data_dir, cfg.batch_size, cfg.max_examples):
            width = max(len(r[0]) for r in rows)
            ids = torch.zeros((len(rows), width), dtype=torch.long)  # [B, L]; pad id is irrelevant (masked out)
            tt = torch.zeros_like(ids)
            labels = torch.full_like(ids, IGNORE_INDEX)
            attn = torch.zeros_like(ids)
            for i, (a, b, c) in enumerate(rows):
                ids[i, : len(a)] = torch.tensor(a)
                tt[i, : len(b)] = torch.tensor(b)
                labels[i, : len(c)] = torch.tensor(c)
                attn[i, : len(a)] = 1
            if int(labels.max()) >= vocab_size:
                raise ValueError(f"{data_dir}: label id {int(labels.max())} >= the model's vocabulary "
                                 f"({vocab_size}); the data was prepared with another tokenizer")
            inputs = {"input_ids": ids.to(device), "attention_mask": attn.to(device)}
            if takes_token_types:
                inputs["token_type_ids"] = tt.to(device)
            with autocast(device, cfg.bf16):
                logits = model(**inputs).logits  # [B, L, V]
            sel = labels.to(device) != IGNORE_INDEX  # [B, L]
            lg = logits[sel].float()  # [P, V] only the predicted positions
            gold = labels.to(device)[sel]  # [P]
            nll += float(torch.nn.functional.cross_entropy(lg, gold, reduction="sum"))
            best5 = lg.topk(min(5, lg.shape[-1]), dim=-1).indices  # [P, 5]
            hit1 = best5[:, 0] == gold
            top1 += int(hit1.sum())
            top5 += int((best5 == gold[:, None]).any(-1).sum())
            shows_mask = ids.to(device)[sel] == mask_id
            n_mask_tok += int(shows_mask.sum())
            top1_mask_tok += int((hit1 & shows_mask).sum())
            n_pred += int(sel.sum())
            n_rows += len(rows)
            bar.update(len(rows))
    if n_pred == 0:
        raise ValueError(f"{data_dir}/masked has no predicted positions (all labels are -100)")
    seconds = time.perf_counter() - t0
    return {
        "model": model_path, "rows": n_rows, "predicted_tokens": n_pred,
        "top1": 100.0 * top1 / n_pred, "top5": 100.0 * top5 / n_pred,
        "top1_mask_token": 100.0 * top1_mask_tok / n_mask_tok if n_mask_tok else float("nan"),
        "loss": nll / n_pred, "perplexity": perplexity(nll, n_pred),
        "seconds": round(seconds, 3), "rows_per_s": round(n_rows / max(seconds, 1e-9), 2), "device": str(device),
    }


def _mask_id(model_path: str, data_dir: str) -> int:
    from transformers import AutoTokenizer

    for path in (join(data_dir, "tokenizer"), model_path):
        if exists(join(path, "tokenizer.json")) or exists(join(path, "vocab.txt")):
            tid = AutoTokenizer.from_pretrained(local_model(path)).mask_token_id
            if tid is not None:
                return int(tid)
    raise FileNotFoundError(f"no tokenizer in {data_dir}/tokenizer or {model_path}; cannot find the [MASK] id")


def compare(student: dict[str, Any], teacher: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Rows for the side-by-side table (student, teacher, and the student's share of the teacher)."""
    keys = ("top1", "top5", "top1_mask_token", "perplexity")
    rows = [{"model": "student", **{k: student[k] for k in keys}, "rows": student["rows"],
             "predicted_tokens": student["predicted_tokens"]}]
    if teacher is not None:
        rows.append({"model": "teacher", **{k: teacher[k] for k in keys}, "rows": teacher["rows"],
                     "predicted_tokens": teacher["predicted_tokens"]})
        rows.append({"model": "student / teacher", **{k: _ratio(student[k], teacher[k]) for k in keys},
                     "rows": "", "predicted_tokens": ""})
    return rows


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b and np.isfinite(a) and np.isfinite(b) else float("nan")
