"""Batch text embeddings: mean-pooled (over real tokens, [CLS]/[SEP] included) or [CLS] features.

Output Parquet: ``row_id`` int64, ``embedding`` fixed_size_list<float32>[hidden], ``tokens`` int32
(tokens used, after truncation), ``truncated`` bool, plus ``--keep-columns``. Same batch_io machinery
(readers, length-sorted batches, atomic writer, errors file, manifest) as fill-mask and QA.
"""

from __future__ import annotations

import functools
from typing import Any

import pyarrow as pa
import torch

from distilflow.tasks.core.hf import load_pretrained, local_model, resolve_device
from distilflow.tasks.infer.batch_io import ErrorRow, InputRow, WindowResult, length_sorted_batches
from distilflow.tasks.infer.config import EmbedConfig
from distilflow.tasks.infer.streams import map_batches, streams_for


@functools.lru_cache(maxsize=2)
def load_encoder(model: str, device: str = "auto") -> tuple[Any, torch.nn.Module, torch.device]:
    from transformers import AutoModel, AutoTokenizer

    dev = resolve_device(device)
    path = local_model(model)  # once: an s3:// folder is listed and verified once, model and tokenizer read from it
    m = load_pretrained(AutoModel, path).eval().to(dev)  # a *ForMaskedLM folder loads its encoder
    tok = AutoTokenizer.from_pretrained(path)  # after the model: a missing folder is named as such
    return tok, m, dev


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """``(B, L, H)`` -> ``(B, H)``: mean over positions with attention 1, or position 0 ([CLS])."""
    if how == "cls":
        return hidden[:, 0]
    w = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    return (hidden * w).sum(1) / w.sum(1).clamp(min=1.0)


class Embedder:
    def __init__(self, cfg: EmbedConfig):
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.tokenizer, self.model, self.device = load_encoder(cfg.model, cfg.device)
        self.input_columns = (cfg.text_column,)
        limit = int(getattr(self.model.config, "max_position_embeddings", 512) or 512)
        limit = min(limit, int(self.tokenizer.model_max_length or limit))
        self.max_length = min(cfg.max_length, limit) if cfg.max_length else limit
        mcfg: Any = self.model.config
        self.dim = int(getattr(mcfg, "hidden_size", 0) or mcfg.dim)
        self.streams = streams_for(self.device, cfg.threads)
        self.bf16 = self.device.type == "cuda" and cfg.dtype in ("auto", "bfloat16")

    def schema(self) -> pa.Schema:
        return pa.schema([
            pa.field("row_id", pa.int64(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), self.dim), nullable=False),
            pa.field("tokens", pa.int32(), nullable=False),
            pa.field("truncated", pa.bool_(), nullable=False),
        ])

    def embed_ids(self, ids: list[list[int]]) -> torch.Tensor:
        """``(N, H)`` float32 embeddings, in input order, computed in length-sorted batches."""
        out = torch.empty((len(ids), self.dim), dtype=torch.float32)
        pad = self.tokenizer.pad_token_id or 0

        @torch.inference_mode()  # per call: batches may run in other threads (tasks/infer/streams.py)
        def embed(b: list[int]) -> torch.Tensor:
            longest = max(len(ids[i]) for i in b)
            x = torch.full((len(b), longest), pad, dtype=torch.long)
            att = torch.zeros((len(b), longest), dtype=torch.long)
            for j, i in enumerate(b):
                x[j, : len(ids[i])] = torch.tensor(ids[i])
                att[j, : len(ids[i])] = 1
            x, att = x.to(self.device), att.to(self.device)
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                hidden = self.model(input_ids=x, attention_mask=att).last_hidden_state  # (B, L, H)
            v = pool(hidden.float(), att, self.cfg.pooling)
            if self.cfg.normalize:
                v = torch.nn.functional.normalize(v, dim=-1)
            return v.cpu()

        batches = length_sorted_batches([len(x) for x in ids], self.cfg.batch_size)
        for b, v in zip(batches, map_batches(embed, batches, self.streams), strict=True):
            out[b] = v
        return out

    def process(self, rows: list[InputRow], url: str = "") -> WindowResult:
        texts = [r.values[self.cfg.text_column] for r in rows]
        enc = self.tokenizer(texts, truncation=False, verbose=False)["input_ids"]
        ok, ids, trunc, errors = [], [], [], []
        for r, x in zip(rows, enc, strict=True):
            if len(x) > self.max_length:
                if self.cfg.too_long == "error":
                    errors.append(ErrorRow(url, r.row_id, r.line, "too_long",
                                           f"{len(x)} tokens > max_length {self.max_length}"))
                    continue
                x = x[: self.max_length - 1] + x[-1:]  # keep the final [SEP]
                trunc.append(True)
            else:
                trunc.append(False)
            ok.append(r)
            ids.append(x)
        vecs = self.embed_ids(ids).numpy() if ids else None
        cols: dict[str, list[Any]] = {"row_id": [r.row_id for r in ok],
                                      "embedding": [v for v in vecs] if vecs is not None else [],
                                      "tokens": [len(x) for x in ids], "truncated": trunc}
        json_items = [(r.row_id, vecs[i].tolist()) for i, r in enumerate(ok)] if vecs is not None else []
        return WindowResult(cols, cols["row_id"], json_items, errors, {"truncated": sum(trunc)})
