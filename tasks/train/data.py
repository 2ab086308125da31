"""Training batches from a prepared folder: load, length-grouped batching, padding, masking, sharding.

A prepared folder ``DIR`` (see CONTRIBUTING.md) has ``pairs/`` (unmasked sentence pairs) and
``masked/`` (static masks, ``dupe_factor`` copies). Training reads one of them:

* ``dynamic``: ``pairs/``, masked afresh for every batch with :func:`distilflow.tasks.prepare.masking.mask_padded`
  (the same code as the prepare job), optionally frequency-smoothed from ``token_counts/token_counts.parquet``;
* ``static``: ``masked/``, the stored ``input_ids``/``labels`` as they are.

Determinism / exact resume: the batches of epoch ``e`` are a pure function of ``(seed, e, lengths)``
and the mask of global batch ``g`` uses ``derive_rng(seed, "mask", e, g)``. Optimizer step ``s`` reads
global batches ``(k * accum + a) * world + rank`` (``k = s mod steps_per_epoch``, ``a < accum``), so the
data position is a function of the step: resuming at step ``s`` sees exactly the batches an
uninterrupted run would, and a run with ``world`` processes sees the same batches as one process
with ``accum * world`` accumulation steps (what the DDP test checks).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from distilflow.tasks.core.errors import DataError
from distilflow.tasks.core.io import exists, join, listdir, read_parquet
from distilflow.tasks.core.rng import derive_rng
from distilflow.tasks.core.stage import manifest_url, read_manifest, token_counts_url
from distilflow.tasks.prepare.masking import IGNORE_INDEX, MaskConfig, Vocab, mask_padded, smoothing_weights
from distilflow.tasks.train.config import TrainConfig

REQUIRED = {"pairs": ("input_ids", "token_type_ids", "next_sentence_label"),
            "masked": ("input_ids", "token_type_ids", "next_sentence_label", "labels")}


@dataclass
class Examples:
    """All sequences of a stage, flat (4 bytes per token): row i is ``ids[offsets[i]:offsets[i+1]]``."""

    ids: np.ndarray  # int32 [T]
    offsets: np.ndarray  # int64 [N + 1]
    token_type: np.ndarray  # int8 [T]
    nsp: np.ndarray  # int64 [N]: 0 / 1 / -100
    labels: np.ndarray | None  # int32 [T] (static masks) or None (dynamic)
    skipped: int = 0  # malformed rows dropped at load

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def resolve_source(data_dir: str, source: str) -> str:
    """``auto`` -> ``dynamic`` if ``pairs/`` is there, else ``static``."""
    if source == "auto":
        return "dynamic" if exists(manifest_url(join(data_dir, "pairs"))) else "static"
    return source


def _flat(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False)[offsets[0]: offsets[-1]]
    return values, offsets - offsets[0]


def load_examples(data_dir: str, stage: str, max_len: int = 0) -> Examples:
    """Load ``DIR/<stage>/part-*.parquet`` (stage ``pairs`` or ``masked``) into flat arrays.

    Rows whose columns disagree in length, that are shorter than 3 tokens or longer than ``max_len``
    (``0`` = no limit) are dropped with a warning that names the file and counts them.
    """
    stage_url = join(data_dir, stage)
    try:
        read_manifest(stage_url)
    except FileNotFoundError as e:
        raise DataError(f"{e}. Prepare the data first: distilflow prepare ... --output {data_dir}") from e
    files = [u for u in listdir(stage_url, ".parquet") if os.path.basename(u).startswith("part-")]
    if not files:
        raise DataError(f"{stage_url}: no part-*.parquet files")
    cols = REQUIRED[stage]
    ids_l, off_l, tt_l, nsp_l, lab_l = [], [], [], [], []
    base, skipped = 0, 0
    for url in files:
        table = read_parquet(url)
        missing = [c for c in cols if c not in table.column_names]
        if missing:
            raise DataError(f"{url}: missing column(s) {missing}; expected {list(cols)} (see CONTRIBUTING.md)")
        ids, off = _flat(table.column("input_ids"))
        tt, off_tt = _flat(table.column("token_type_ids"))
        lab, off_lab = _flat(table.column("labels")) if stage == "masked" else (None, off)
        nsp = table.column("next_sentence_label").to_numpy().astype(np.int64)
        lens = np.diff(off)
        ok = (np.diff(off_tt) == lens) & (np.diff(off_lab) == lens) & (lens >= 3)
        if max_len:
            ok &= lens <= max_len
        if not ok.all():
            bad = np.flatnonzero(~ok)
            skipped += len(bad)
            warnings.warn(f"{url}: skipped {len(bad)} malformed row(s) (first: row {int(bad[0])}; "
                          f"columns of different lengths, < 3 tokens or > {max_len or 'inf'} tokens)",
                          stacklevel=2)
            # each column is filtered with its own row lengths (they differ on the bad rows)
            ids, tt = ids[np.repeat(ok, lens)], tt[np.repeat(ok, np.diff(off_tt))]
            lab = lab[np.repeat(ok, np.diff(off_lab))] if lab is not None else None
            nsp, lens = nsp[ok], lens[ok]
        ids_l.append(ids.astype(np.int32))
        tt_l.append(tt.astype(np.int8))
        if lab is not None:
            lab_l.append(lab.astype(np.int32))
        nsp_l.append(nsp)
        off_l.append(base + np.cumsum(lens))
        base += int(lens.sum())
    offsets = np.concatenate([[0], *off_l]).astype(np.int64)
    if len(offsets) == 1:
        raise DataError(f"{stage_url}: no usable rows")
    return Examples(np.concatenate(ids_l), offsets, np.concatenate(tt_l), np.concatenate(nsp_l),
                    np.concatenate(lab_l) if lab_l else None, skipped)


def load_token_weights(data_dir: str, vocab_size: int, smoothing: float) -> np.ndarray | None:
    """``count ** -smoothing`` per token id from ``token_counts/token_counts.parquet`` (None if smoothing=0)."""
    if smoothing == 0:
        return None
    url = token_counts_url(data_dir)
    if not exists(url):
        raise DataError(f"{url} not found: needed for --mlm-smoothing {smoothing} (or use --mlm-smoothing 0)")
    t = read_parquet(url, columns=["token_id", "count"])
    counts = np.zeros(vocab_size, dtype=np.int64)
    tid = t.column("token_id").to_numpy()
    if len(tid) and (tid.max() >= vocab_size or tid.min() < 0):
        raise DataError(f"{url}: token ids outside the vocabulary (size {vocab_size})")
    np.add.at(counts, tid, t.column("count").to_numpy())
    return smoothing_weights(counts, smoothing)


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                  group_batches: int = 64) -> list[np.ndarray]:
    """Length-grouped batches of one epoch (lists of example indices), full batches only.

    Shuffle, cut into groups of ``group_batches`` batches, sort each group by length (so a batch
    holds similar lengths: little padding), split into batches, shuffle the batch order.
    """
    rng = derive_rng(seed, "batches", epoch)
    perm = rng.permutation(len(lengths))
    group = batch_size * max(1, group_batches)
    batches: list[np.ndarray] = []
    for start in range(0, len(perm), group):
        chunk = perm[start: start + group]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(chunk[i: i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


class Collator:
    """Example indices -> a padded batch of torch tensors (masking dynamic or static)."""

    def __init__(self, ex: Examples, pad_id: int, vocab: Vocab | None, mask_cfg: MaskConfig | None,
                 weights: np.ndarray | None = None, pad_multiple: int = 8):
        if ex.labels is None and (vocab is None or mask_cfg is None):
            raise ValueError("dynamic masking needs vocab and mask_cfg")
        self.ex, self.pad_id, self.vocab, self.mask_cfg = ex, pad_id, vocab, mask_cfg
        self.weights, self.pad_multiple = weights, pad_multiple

    def __call__(self, idx: np.ndarray, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        ex = self.ex
        starts, ends = ex.offsets[idx], ex.offsets[idx + 1]
        lens = ends - starts
        width = int(lens.max())
        width = -(-width // self.pad_multiple) * self.pad_multiple  # tensor-core friendly shapes
        b = len(idx)
        ids = np.full((b, width), self.pad_id, dtype=np.int32)  # [B, L]
        tt = np.zeros((b, width), dtype=np.int8)
        labels = np.full((b, width), IGNORE_INDEX, dtype=np.int32)
        for r, (s, e) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
            ids[r, : e - s] = ex.ids[s:e]
            tt[r, : e - s] = ex.token_type[s:e]
            if ex.labels is not None:
                labels[r, : e - s] = ex.labels[s:e]
        attn = (np.arange(width)[None, :] < lens[:, None]).astype(np.int64)  # [B, L] 1 = real token
        if ex.labels is None:
            assert rng is not None and self.vocab is not None and self.mask_cfg is not None
            ids, labels = mask_padded(ids, self.vocab, self.mask_cfg, rng, self.weights)
        return {
            "input_ids": torch.from_numpy(ids.astype(np.int64)),
            "attention_mask": torch.from_numpy(attn),
            "token_type_ids": torch.from_numpy(tt.astype(np.int64)),
            "labels": torch.from_numpy(labels.astype(np.int64)),
            "next_sentence_label": torch.from_numpy(ex.nsp[idx].astype(np.int64)),
        }


class StepBatches:
    """The micro-batches of one rank for optimizer step ``s`` -- a pure function of ``s``."""

    def __init__(self, ex: Examples, collate: Collator, batch_size: int, seed: int,
                 world: int = 1, rank: int = 0, accum: int = 1, group_batches: int = 64):
        self.ex, self.collate, self.batch_size, self.seed = ex, collate, batch_size, seed
        self.world, self.rank, self.accum, self.group_batches = world, rank, accum, group_batches
        n_batches = len(ex) // batch_size  # every epoch has the same number of full batches
        self.steps_per_epoch = n_batches // (world * accum)
        if self.steps_per_epoch == 0:
            raise DataError(f"{len(ex)} sequences make {n_batches} batches of {batch_size}: fewer than one "
                            f"optimizer step ({world} process(es) x {accum} accumulation); lower --batch-size")
        self._epoch, self._batches = -1, []  # type: ignore[var-annotated]

    def position(self, step: int) -> dict[str, int]:
        """Where optimizer step ``step`` (0-based) reads: epoch and first global batch index."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "batch": k * self.accum * self.world}

    def __call__(self, step: int) -> list[dict[str, torch.Tensor]]:
        pos = self.position(step)
        if pos["epoch"] != self._epoch:
            self._epoch = pos["epoch"]
            self._batches = epoch_batches(self.ex.lengths, self.batch_size, self.seed, self._epoch,
                                          self.group_batches)
        out = []
        for a in range(self.accum):
            g = pos["batch"] + a * self.world + self.rank
            out.append(self.collate(self._batches[g], derive_rng(self.seed, "mask", self._epoch, g)))
        return out


def eval_batches(ex: Examples, collate: Collator, batch_size: int, seed: int,
                 max_sequences: int = 0) -> list[dict[str, torch.Tensor]]:
    """Fixed evaluation batches (sorted by length, masks from a fixed seed): same numbers every call."""
    n = len(ex) if not max_sequences else min(len(ex), max_sequences)
    order = np.argsort(-ex.lengths[:n], kind="stable")
    return [collate(order[i: i + batch_size], derive_rng(seed, "eval-mask", i))
            for i in range(0, n, batch_size)]


EVAL_BATCH = 64  # sequences per held-out evaluation batch


def training_batches(cfg: TrainConfig, tokenizer: Any, world: int, rank: int, max_len: int
                     ) -> tuple[StepBatches, str]:
    """This rank's batches of ``cfg.data`` (``StepBatches``: step -> micro-batches) and the mask source
    used (``dynamic``: pairs masked per batch, ``static``: the stored masks)."""
    source = resolve_source(cfg.data, cfg.mask_source)
    ex = load_examples(cfg.data, "pairs" if source == "dynamic" else "masked", max_len)
    vocab = Vocab.from_tokenizer(tokenizer)
    weights = load_token_weights(cfg.data, vocab.size, cfg.mlm_smoothing) if ex.labels is None else None
    collate = Collator(ex, tokenizer.pad_token_id, vocab, _mask_config(cfg), weights, pad_multiple=8)
    return StepBatches(ex, collate, cfg.batch_size, cfg.seed, world, rank, cfg.grad_accum, cfg.group_batches), source


def heldout_batches(cfg: TrainConfig, tokenizer: Any, max_len: int) -> list[dict[str, torch.Tensor]] | None:
    """Fixed held-out batches of ``cfg.eval_data`` (None without one). Uniform masks (no smoothing), so
    held-out accuracy is comparable between runs; a fixed batch size, because the eval masks are drawn per
    batch and must not depend on ``--batch-size``."""
    if not cfg.eval_data:
        return None
    src = "pairs" if resolve_source(cfg.eval_data, cfg.mask_source) == "dynamic" else "masked"
    ev = load_examples(cfg.eval_data, src, max_len)
    collate = Collator(ev, tokenizer.pad_token_id, Vocab.from_tokenizer(tokenizer), _mask_config(cfg), None)
    return eval_batches(ev, collate, EVAL_BATCH, cfg.seed, cfg.eval_sequences)


def _mask_config(cfg: TrainConfig) -> MaskConfig:
    return MaskConfig(mlm_prob=cfg.mlm_prob, whole_word=cfg.whole_word, smoothing=cfg.mlm_smoothing)
