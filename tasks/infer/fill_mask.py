"""Fast batch fill-mask with the same answers as ``transformers.pipeline("fill-mask")``.

Why it is faster than the pipeline on the same model:

* rows are tokenized a window at a time and run in **length-sorted** batches (little padding);
* all layers but the last run over every token; the **last layer's queries, output projection and FFN,
  and the MLM head run only at the mask positions** (hidden ``(B, L, H)`` -> ``(M, H)`` -> logits
  ``(M, V)``, instead of ``(B, L, V)``): the other positions' final states are never used
  (BERT / DistilBERT; other architectures run the full model and gather the mask logits);
* ``torch.inference_mode``; on CUDA bf16 autocast and SDPA attention;
* opt-in ``--fast`` (``quantize="auto"``, resolved per machine by ``config.fast_mode``): the trunk under
  bf16 autocast on CPUs with native bf16 (:func:`bf16_parts`), else in int8 on ONNX Runtime
  (tasks/infer/fast.py); the top-1 agreement against the exact model is measured on the first window and
  reported.

Semantics copied from the pipeline (and tested against it): several masks in a text are predicted
independently (one top-k list per mask); ``targets`` restrict the scores to those words (softmax over
the full vocabulary, then pick the targets; a target not in the vocabulary is replaced by its first
word-piece; duplicates dropped; top-k capped at the number of targets); ``sequence`` is
``tokenizer.decode`` of the ids with the prediction filled in, skipping special tokens only when the
text has one mask (with several masks the other ``[MASK]`` tokens stay visible).

``[mask]`` in lower case (as hosted model cards write it) is normalised to the tokenizer's mask token
first: an uncased tokenizer would otherwise split it into ``[``, ``mask``, ``]``.
"""

from __future__ import annotations

import copy
import functools
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from distilflow.tasks.core.errors import ConfigError, InputError
from distilflow.tasks.core.hf import load_pretrained, local_model, resolve_device
from distilflow.tasks.infer.batch_io import ErrorRow, InputRow, WindowResult, length_sorted_batches
from distilflow.tasks.infer.config import FillMaskConfig
from distilflow.tasks.infer.streams import map_batches, streams_for

log = logging.getLogger(__name__)

MASK_PATTERN = re.compile(r"\[mask\]|<mask>", re.IGNORECASE)

FILL_MASK_SCHEMA = pa.schema([
    pa.field("row_id", pa.int64(), nullable=False),
    pa.field("mask_index", pa.int32(), nullable=False),
    pa.field("rank", pa.int32(), nullable=False),
    pa.field("token", pa.int32(), nullable=False),
    pa.field("token_str", pa.string(), nullable=False),
    pa.field("score", pa.float32(), nullable=False),
    pa.field("sequence", pa.string(), nullable=False),
])


def normalize_masks(text: str, mask_token: str) -> str:
    """``[mask]`` / ``[MASK]`` / ``<mask>`` (any case) -> the tokenizer's mask token."""
    return MASK_PATTERN.sub(mask_token, text)


def pipeline_target_ids(tokenizer: Any, targets: Sequence[str]) -> np.ndarray:
    """Target words -> ids exactly as ``FillMaskPipeline.get_target_ids`` does (same order too)."""
    vocab = tokenizer.get_vocab()
    ids = []
    for t in targets:
        id_ = vocab.get(t)
        if id_ is None:
            pieces = tokenizer(t, add_special_tokens=False, return_attention_mask=False,
                               return_token_type_ids=False, max_length=1, truncation=True)["input_ids"]
            if not pieces:
                log.warning("target %r is not in the vocabulary and has no word-pieces; ignoring it", t)
                continue
            id_ = pieces[0]
            log.warning("target %r is not in the vocabulary; using its first word-piece %r",
                        t, tokenizer.convert_ids_to_tokens(id_))
        ids.append(id_)
    ids = list(set(ids))  # the pipeline de-duplicates with a set: keep its order for equal scores
    if not ids:
        raise ConfigError(f"FillMaskConfig.targets: none of {list(targets)} maps to a vocabulary token")
    return np.array(ids)


# encoder(input_ids, attention_mask, is_mask) -> (M, H) final hidden states at the masks; head: (M, H) -> (M, V)
Encoder = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Head = Callable[[torch.Tensor], torch.Tensor]


def _without_last_layer(base: nn.Module, container: str) -> nn.Module:
    """A view of ``base`` whose ``<container>.layer`` list lacks the last layer (weights are shared)."""
    trunk = copy.copy(base)
    trunk._modules = dict(base._modules)
    inner = copy.copy(getattr(base, container))
    inner._modules = dict(inner._modules)
    inner._modules["layer"] = nn.ModuleList(list(getattr(base, container).layer)[:-1])
    trunk._modules[container] = inner
    return trunk


def _last_layer_at_masks(q_lin: nn.Module, k_lin: nn.Module, v_lin: nn.Module, n_heads: int,
                         h: torch.Tensor, attention_mask: torch.Tensor, is_mask: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention of the last layer with queries only at the masks.

    h: (B, L, H) input of the last layer; returns (context (M, H), residual input (M, H)).
    Keys/values still cover every token; everything after attention is per-position, so the rest of
    the layer (output projection, FFN, layer norms) then runs on M rows instead of B * L.
    """
    B, L, H = h.shape
    dh = H // n_heads
    rows = is_mask.nonzero()[:, 0]  # (M,) batch row of each mask, in h[is_mask] order
    x = h[is_mask]  # (M, H)
    M = x.shape[0]
    k = k_lin(h).view(B, L, n_heads, dh).transpose(1, 2)[rows]  # (M, nh, L, dh)
    v = v_lin(h).view(B, L, n_heads, dh).transpose(1, 2)[rows]  # (M, nh, L, dh)
    q = q_lin(x).view(M, n_heads, 1, dh)  # (M, nh, 1, dh)
    keep = attention_mask[rows].bool()[:, None, None, :]  # (M, 1, 1, L): padding is not attended
    ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # scale 1/sqrt(dh)
    return ctx.reshape(M, H), x


def trunk_of(model: Any) -> nn.Module | None:
    """All layers but the last (a view sharing the weights), for the MLM architectures we know."""
    name = type(model).__name__
    if name == "DistilBertForMaskedLM":
        return _without_last_layer(model.distilbert, "transformer")
    if name == "BertForMaskedLM" and not model.config.is_decoder:
        return _without_last_layer(model.bert, "encoder")
    return None


def _split_mlm(model: Any, fast_trunk: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
               ) -> tuple[Encoder, Head] | None:
    """(encoder, head) for the MLM architectures we know; None -> run the full model (slower).

    The encoder runs all layers but the last over every token, then the last layer and the MLM head
    only at the mask positions: the outputs are the same as the full model's at those positions.
    ``fast_trunk``: runs those layers instead of torch (the int8 ONNX Runtime trunk of ``--fast``).
    """
    name = type(model).__name__
    view = trunk_of(model)

    def trunk(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:  # (B, L, H)
        if fast_trunk is not None:
            return fast_trunk(input_ids, attention_mask)
        assert view is not None
        return view(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    if name == "DistilBertForMaskedLM":
        last = model.distilbert.transformer.layer[-1]

        def d_encoder(input_ids: torch.Tensor, attention_mask: torch.Tensor, is_mask: torch.Tensor) -> torch.Tensor:
            h = trunk(input_ids, attention_mask)  # (B, L, H)
            a = last.attention
            ctx, x = _last_layer_at_masks(a.q_lin, a.k_lin, a.v_lin, a.n_heads, h, attention_mask, is_mask)
            y = last.sa_layer_norm(a.out_lin(ctx) + x)
            return last.output_layer_norm(last.ffn(y) + y)  # (M, H)

        def d_head(h: torch.Tensor) -> torch.Tensor:
            h = model.vocab_layer_norm(model.activation(model.vocab_transform(h)))
            return model.vocab_projector(h)

        return d_encoder, d_head
    if view is not None:  # BertForMaskedLM
        last = model.bert.encoder.layer[-1]

        def b_encoder(input_ids: torch.Tensor, attention_mask: torch.Tensor, is_mask: torch.Tensor) -> torch.Tensor:
            h = trunk(input_ids, attention_mask)  # (B, L, H)
            sa = last.attention.self
            ctx, x = _last_layer_at_masks(sa.query, sa.key, sa.value, sa.num_attention_heads, h,
                                          attention_mask, is_mask)
            y = last.attention.output.LayerNorm(last.attention.output.dense(ctx) + x)
            return last.output.LayerNorm(last.output.dense(last.intermediate(y)) + y)  # (M, H)

        return b_encoder, model.cls
    return None


def _cpu_trunk(model: Any) -> nn.Module:
    """The layers before the last of a BERT/DistilBERT MLM on the CPU, or the one-line error --fast gives."""
    view = trunk_of(model)
    if view is None or next(model.parameters()).device.type != "cpu":
        raise ConfigError(f"FillMaskConfig.quantize: --fast runs BERT/DistilBERT masked-LM models on a CPU "
                          f"({type(model).__name__}); use --device cpu, or run without --fast")
    return view


def fast_parts(model_dir: str, model: Any, streams: int, threads: int) -> tuple[Encoder, Head]:
    """(encoder, head) whose trunk runs in int8 on ONNX Runtime (``--fast``, tasks/infer/fast.py)."""
    from distilflow.tasks.infer.fast import int8_trunk_file

    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ConfigError("FillMaskConfig.quantize: --fast needs ONNX Runtime: pip install 'distilflow[fast]' "
                          f"({e})") from e
    view = _cpu_trunk(model)
    path = int8_trunk_file(view, local_model(model_dir))  # (a local folder here: FillMasker passes its copy)
    parts = _split_mlm(model, _ort_trunk(str(path), 1 if streams > 1 else threads))
    assert parts is not None
    return parts


def bf16_parts(model: Any) -> tuple[Encoder, Head]:
    """(encoder, head) whose trunk runs under CPU bf16 autocast (``--fast`` on CPUs with native bf16).

    Autocast computes the matrix products in bf16 and keeps layer norms and softmax in float32; the last
    layer and the MLM head stay in float32 as in the exact mode. On a DistilBERT-size trunk (one 64 x 93 batch,
    AVX512-BF16; ``scripts/bench_fast_trunk.py``): 3.0x float32 at one thread, 3.2x at two, hidden states
    within 0.02 (cosine >= 0.99999) of float32's.
    """
    view = _cpu_trunk(model)

    def trunk(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:  # (B, L, H) float32
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):  # thread-local: set in each stream
            h = view(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return h.float()

    parts = _split_mlm(model, trunk)
    assert parts is not None
    return parts


@functools.lru_cache(maxsize=2)
def _ort_trunk(path: str, threads: int) -> Any:
    from distilflow.tasks.infer.fast import OrtTrunk

    return OrtTrunk(Path(path), threads)


@functools.lru_cache(maxsize=2)
def load_mlm(model: str, device: str = "auto", dtype: str = "auto") -> tuple[Any, nn.Module, torch.device, torch.dtype]:
    """(tokenizer, model in eval mode, device, compute dtype); cached per process (one load per worker)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    dev = resolve_device(device)
    compute = torch.bfloat16 if (dtype == "bfloat16" or (dtype == "auto" and dev.type == "cuda")) else torch.float32
    kwargs: dict[str, Any] = {"attn_implementation": "sdpa"}
    path = local_model(model)  # once: an s3:// folder is listed and verified once, model and tokenizer read from it
    try:
        m = load_pretrained(AutoModelForMaskedLM, path, **kwargs)
    except InputError:
        raise
    except (ValueError, ImportError):  # architectures without SDPA support
        m = load_pretrained(AutoModelForMaskedLM, path)
    m.eval().to(dev)
    tok = AutoTokenizer.from_pretrained(path)  # after the model: a missing folder is named as such
    return tok, m, dev, compute


class FillMasker:
    """Batch fill-mask over lists of texts. ``process`` plugs into ``batch_io.run_file``."""

    input_columns: tuple[str, ...]

    def __init__(self, cfg: FillMaskConfig):
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        model_dir = local_model(cfg.model)  # an s3:// model: its verified local copy, fetched once per job
        self.tokenizer, self.model, self.device, self.dtype = load_mlm(model_dir, cfg.device, cfg.dtype)
        self.streams = streams_for(self.device, cfg.threads)  # batches at once (one core each on a CPU)
        tok = self.tokenizer
        if tok.mask_token_id is None:
            raise InputError(f"{cfg.model}: the tokenizer has no mask token; this is not a fill-mask model")
        self.input_columns = (cfg.text_column,)
        limit = int(getattr(self.model.config, "max_position_embeddings", 512) or 512)
        if type(self.model).__name__.startswith(("Roberta", "XLMRoberta", "Camembert")):
            limit -= 2  # RoBERTa position ids start after the padding index
        limit = min(limit, int(tok.model_max_length or limit))
        self.max_length = min(cfg.max_length, limit) if cfg.max_length else limit
        self.target_ids = pipeline_target_ids(tok, cfg.targets) if cfg.targets else None
        self.top_k = min(cfg.top_k, len(self.target_ids)) if self.target_ids is not None else cfg.top_k
        self.parts = _split_mlm(self.model)
        self.quant_parts = None
        self._agreement_checked = False
        if cfg.quantize == "int8":  # --fast without native bf16: the trunk in int8 on ONNX Runtime (fast.py)
            self.quant_parts = fast_parts(model_dir, self.model, self.streams, cfg.threads)
        elif cfg.quantize == "bf16":  # --fast on CPUs with native bf16: the trunk under bf16 autocast
            self.quant_parts = bf16_parts(self.model)
        if self.quant_parts is not None:
            log.info("--fast: the encoder's layers before the last in %s (%s); %s", cfg.quantize,
                     "torch bf16 autocast" if cfg.quantize == "bf16" else "ONNX Runtime",
                     f"top-1 agreement with the exact mode is measured on the first {cfg.fast_check_rows} rows"
                     if cfg.fast_check_rows else "no agreement check (--fast-check-rows 0)")
        self._token_str: dict[int, str] = {}

    def schema(self) -> pa.Schema:
        return FILL_MASK_SCHEMA

    # -- tokenize --------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> list[list[int] | tuple[str, str]]:
        """Token ids per text ([CLS] .. [SEP]), or (reason, detail) for texts we cannot score."""
        tok = self.tokenizer
        norm = [normalize_masks(t, tok.mask_token) for t in texts]
        ids_list = tok(norm, add_special_tokens=True, truncation=False, return_attention_mask=False,
                       return_token_type_ids=False, verbose=False)["input_ids"]
        out: list[list[int] | tuple[str, str]] = []
        for ids in ids_list:
            masks = [i for i, t in enumerate(ids) if t == tok.mask_token_id]
            if not masks:
                out.append(("no_mask", f"no {tok.mask_token} (or [mask]) in the text"))
            elif len(ids) <= self.max_length:
                out.append(ids)
            elif self.cfg.too_long == "error":
                out.append(("too_long", f"{len(ids)} tokens > max_length {self.max_length}"))
            else:
                out.append(self._window(ids, masks))
        return out

    def _window(self, ids: list[int], masks: list[int]) -> list[int] | tuple[str, str]:
        """Cut a too-long text to max_length tokens keeping every mask.

        If all masks fit in the first window this equals the pipeline's ``truncation=True``;
        otherwise the window is centred on the masks. Special tokens at both ends are kept.
        """
        head, body, tail = ids[:1], ids[1:-1], ids[-1:]
        width = self.max_length - 2
        lo, hi = masks[0] - 1, masks[-1] - 1  # mask positions inside body
        if hi - lo + 1 > width:
            return ("masks_too_far_apart", f"masks span {hi - lo + 1} tokens > {width}")
        if hi < width:
            start = 0
        else:
            start = max(0, min((lo + hi) // 2 - width // 2, len(body) - width))
        end = start + width
        # do not cut a word in two: a WordPiece window must not start or end inside a word
        pieces = self.tokenizer.convert_ids_to_tokens(body[start:end + 1])
        a, b = 0, width  # window = body[start + a : start + b]
        while start + a < lo and pieces[a].startswith("##"):
            a += 1
        while b < len(pieces) and pieces[b].startswith("##") and start + b - 1 > hi:
            b -= 1  # the token after the window continues a word: drop that word's start too
        return head + body[start + a:start + b] + tail

    # -- model -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def mask_logits(self, batch: list[list[int]], quantized: bool = False) -> tuple[torch.Tensor, list[list[int]]]:
        """Logits ``(M, V)`` float32 at every mask of the batch, and mask positions per row."""
        tok = self.tokenizer
        model: Any = self.model
        parts = self.quant_parts if quantized else self.parts
        dev = torch.device("cpu") if quantized else self.device
        longest = max(len(x) for x in batch)
        ids = torch.full((len(batch), longest), tok.pad_token_id or 0, dtype=torch.long)
        att = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, x in enumerate(batch):
            ids[i, : len(x)] = torch.tensor(x)
            att[i, : len(x)] = 1
        ids, att = ids.to(dev), att.to(dev)
        is_mask = ids == tok.mask_token_id  # (B, L)
        positions = [torch.nonzero(is_mask[i]).flatten().tolist() for i in range(len(batch))]
        use_bf16 = dev.type == "cuda" and self.dtype == torch.bfloat16
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            if parts is not None:
                encoder, head = parts
                logits = head(encoder(ids, att, is_mask))  # (M, H) -> (M, V): only where needed
            else:
                logits = model(input_ids=ids, attention_mask=att).logits[is_mask]  # (M, V)
        return logits.float(), positions

    def predict(self, encoded: list[list[int]], quantized: bool = False) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """Per row, per mask: (top-k scores float32, top-k token ids), rows in the given order."""
        out: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in encoded]
        targets = torch.as_tensor(self.target_ids) if self.target_ids is not None else None

        def top_k(b: list[int]) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
            logits, positions = self.mask_logits([encoded[i] for i in b], quantized)
            probs = logits.softmax(dim=-1)  # over the full vocabulary, as the pipeline does
            if targets is not None:
                probs = probs[:, targets.to(probs.device)]
            values, preds = probs.topk(self.top_k)  # (M, k)
            if targets is not None:
                preds = targets.to(preds.device)[preds]
            return values.cpu().numpy(), preds.cpu().numpy(), positions

        batches = length_sorted_batches([len(x) for x in encoded], self.cfg.batch_size)
        for b, (scores_np, tokens_np, positions) in zip(batches, map_batches(top_k, batches, self.streams), strict=True):
            m = 0
            for row, pos in zip(b, positions, strict=True):
                for _ in pos:
                    out[row].append((scores_np[m], tokens_np[m]))
                    m += 1
        return out

    def token_str(self, token: int) -> str:
        s = self._token_str.get(token)
        if s is None:
            s = self._token_str[token] = self.tokenizer.decode([token])
        return s

    # -- the batch_io job --------------------------------------------------------------------------
    def process(self, rows: list[InputRow], url: str = "") -> WindowResult:
        return self._process(rows, url, want_json=self.cfg.format == "json")

    def _process(self, rows: list[InputRow], url: str, want_json: bool) -> WindowResult:
        texts = [r.values[self.cfg.text_column] for r in rows]
        encoded = self.encode(texts)
        errors = [ErrorRow(url, r.row_id, r.line, e[0], e[1]) for r, e in zip(rows, encoded, strict=True)
                  if isinstance(e, tuple)]
        ok = [(r, e) for r, e in zip(rows, encoded, strict=True) if isinstance(e, list)]
        ids = [e for _, e in ok]
        quantized = self.quant_parts is not None
        preds = self.predict(ids, quantized=quantized)
        stats: dict[str, float] = {"masks": sum(len(p) for p in preds)}
        n_check = self.cfg.fast_check_rows
        if quantized and n_check and not self._agreement_checked:
            # --fast is approximate: measure its top-1 agreement with the exact model once, on the first
            # fast_check_rows rows (a sample: on the whole first window it would double the work of small files)
            ref = self.predict(ids[:n_check], quantized=False)
            pairs = [(a[1][0], b[1][0]) for pa_, pb in zip(preds[:n_check], ref, strict=True)
                     for a, b in zip(pa_, pb, strict=True)]
            stats["fast_check_masks"] = len(pairs)
            stats["fast_top1_agree"] = sum(int(a == b) for a, b in pairs)
            self._agreement_checked = True
        cols: dict[str, list[Any]] = {n: [] for n in FILL_MASK_SCHEMA.names}
        json_items: list[tuple[int, Any]] = []
        for (row, ids_row), per_mask in zip(ok, preds, strict=True):
            single = len(per_mask) == 1
            mask_pos = [i for i, t in enumerate(ids_row) if t == self.tokenizer.mask_token_id]
            seqs = []
            for pos, (_, toks) in zip(mask_pos, per_mask, strict=True):
                for t in toks:
                    filled = list(ids_row)
                    filled[pos] = int(t)
                    seqs.append(filled)
            sequences = self.tokenizer.batch_decode(seqs, skip_special_tokens=single)
            row_json: list[list[dict[str, Any]]] = []
            s = 0
            for mi, (scores, toks) in enumerate(per_mask):
                one: list[dict[str, Any]] = []
                for rank, (sc, t) in enumerate(zip(scores.tolist(), toks.tolist(), strict=True), start=1):
                    cols["row_id"].append(row.row_id)
                    cols["mask_index"].append(mi)
                    cols["rank"].append(rank)
                    cols["token"].append(t)
                    cols["token_str"].append(self.token_str(t))
                    cols["score"].append(sc)
                    cols["sequence"].append(sequences[s])
                    if want_json:
                        one.append({"score": sc, "token": t, "token_str": self.token_str(t),
                                    "sequence": sequences[s]})
                    s += 1
                row_json.append(one)
            if want_json:
                json_items.append((row.row_id, row_json[0] if single else row_json))
        return WindowResult(cols, list(cols["row_id"]), json_items, errors, stats)

    def __call__(self, texts: Sequence[str]) -> list[Any]:
        """Pipeline-style results for a list of texts (list of dicts, or list of lists for >1 mask).

        Texts that cannot be scored give ``{"error": reason, "detail": ...}``.
        """
        rows = [InputRow(i, None, {self.cfg.text_column: t}) for i, t in enumerate(texts)]
        res = self._process(rows, "", want_json=True)
        out: list[Any] = [None] * len(texts)
        for rid, item in res.json_items:
            out[rid] = item
        for e in res.errors:
            out[e.row_id or 0] = {"error": e.reason, "detail": e.detail}
        return out
