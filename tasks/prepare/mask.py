"""Stage 3 -- mask: ``pairs/part-*.parquet`` -> ``masked/part-*.parquet`` (static masking).

Each pairs part is masked ``dupe_factor`` times with independent random streams (BERT's static
masking: the model sees ``dupe_factor`` different masks of every sequence); the copies are written one
after the other into the same output part. The masking itself is :func:`distilflow.tasks.prepare.masking.mask_flat`,
the same function the training job uses for dynamic masking.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from distilflow.tasks.core.config import Config, require
from distilflow.tasks.core.io import ParquetRowGroups, iter_parquet_batches, join, release_memory
from distilflow.tasks.core.rng import derive_rng
from distilflow.tasks.core.stage import StageDir
from distilflow.tasks.prepare.masking import IGNORE_INDEX, MaskConfig, Vocab, mask_flat, smoothing_weights
from distilflow.tasks.prepare.pairs import PAIRS_SCHEMA, TokenizerInfo, read_token_counts

MASKED_SCHEMA = PAIRS_SCHEMA.append(pa.field("labels", pa.list_(pa.int32()), nullable=False))


@dataclass(frozen=True)
class MaskStageConfig(Config):
    tokenizer_sha256: str
    mlm_prob: float = 0.15
    whole_word: bool = False
    smoothing: float = 0.0
    max_predictions: int = 0
    dupe_factor: int = 1
    seed: int = 0

    def check(self) -> None:
        require(1 <= self.dupe_factor <= 100, type(self).__name__, "dupe_factor",
                f"must be in [1, 100], got {self.dupe_factor}")
        self.mask_config()  # validates the masking fields (names them in the error)

    def mask_config(self) -> MaskConfig:
        return MaskConfig(mlm_prob=self.mlm_prob, whole_word=self.whole_word, smoothing=self.smoothing,
                          max_predictions=self.max_predictions)


def mask_part(pairs_url: str, key: str, stage: StageDir, cfg: MaskStageConfig,
              tokenizer: TokenizerInfo | str) -> dict[str, Any]:
    """Mask every row of one pairs part ``dupe_factor`` times; write ``masked/<key>.parquet``."""
    vocab = (tokenizer if isinstance(tokenizer, TokenizerInfo) else TokenizerInfo.load(tokenizer)).vocab
    mcfg = cfg.mask_config()
    weights = None
    if mcfg.smoothing > 0:
        weights = smoothing_weights(read_token_counts(stage.root, vocab.size), mcfg.smoothing)
    counts: Counter[str] = Counter()
    name = f"{key}.parquet"
    # batch by batch into the file (the same bytes as one table written at the end, a batch in memory)
    with ParquetRowGroups(join(stage.url, name), MASKED_SCHEMA) as out:
        for dupe in range(cfg.dupe_factor):
            rng = derive_rng(cfg.seed, "mask", key, dupe)
            for batch in iter_parquet_batches(pairs_url, batch_size=8192):
                out.add(mask_batch(batch, vocab, mcfg, rng, weights, counts))
    tokens = int(counts["tokens"])
    stats = {"files": [{"file": name, "rows": out.rows, "tokens": tokens}], "counts": dict(counts),
             "skipped": {}}
    stage.mark_done(key, stats)
    release_memory()
    return stats


def mask_batch(batch: pa.RecordBatch, vocab: Vocab, cfg: MaskConfig, rng: np.random.Generator,
               weights: np.ndarray | None, counts: Counter[str]) -> pa.Table:
    """Mask one Arrow batch without materialising Python lists (works on the list offsets/values)."""
    ids_col = batch.column("input_ids")
    offsets = ids_col.offsets.to_numpy().astype(np.int64)
    values = ids_col.values.to_numpy()[offsets[0]: offsets[-1]]
    offsets = offsets - offsets[0]
    masked, labels = mask_flat(values, offsets, vocab, cfg, rng, weights)
    sel = np.flatnonzero(labels != IGNORE_INDEX)
    now, before = masked[sel], values[sel]
    as_mask, unchanged = int((now == vocab.mask_id).sum()), int((now == before).sum())
    counts["sequences"] += len(offsets) - 1
    counts["tokens"] += len(values)
    counts["candidates"] += len(values) - int(vocab.is_special[values].sum())
    counts["selected"] += len(sel)
    counts["as_mask"] += as_mask
    counts["unchanged"] += unchanged
    counts["random"] += len(sel) - as_mask - unchanged  # [MASK] is special: never an original token
    off32 = pa.array(offsets.astype(np.int32))
    return pa.Table.from_arrays(
        [
            pa.ListArray.from_arrays(off32, pa.array(masked, pa.int32())),
            batch.column("token_type_ids"),
            batch.column("next_sentence_label"),
            batch.column("doc_id"),
            pa.ListArray.from_arrays(off32, pa.array(labels, pa.int32())),
        ],
        schema=MASKED_SCHEMA,
    )
