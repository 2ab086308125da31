"""Masked-LM masking: the one implementation used for static (stored) and dynamic (training) masks.

Rules (BERT, Devlin et al. 2019, with the fixes users expect):
  * select ``round(mlm_prob * n)`` of the ``n`` non-special tokens of each sequence, at least one,
    at most ``max_predictions`` (special tokens -- [CLS] [SEP] [PAD] [MASK] [UNK] ... -- never);
  * of the selected: ``mask_frac`` (80%) become [MASK], ``random_frac`` (10%) a random *non-special*
    token that is *different* from the original (BERT's script could draw the same token or [CLS]),
    the rest (10%) stay unchanged;
  * whole-word mode selects words (a piece and its following ``##`` pieces) together, skipping to the
    next word when a whole word would overshoot the budget;
  * optional frequency smoothing (XLM / DistilBERT ``mlm_smoothing=0.7``): a token is chosen with
    weight ``count ** -smoothing``, so rare tokens are predicted more often than their frequency.
    Weighted sampling without replacement uses Efraimidis-Spirakis keys ``log(u) / w``.

Everything works on a *flat* batch: ``ids`` (all tokens of all sequences, 1-D) and ``offsets``
(``n_seq + 1`` boundaries) -- exactly the layout of an Arrow ``list<int32>`` column, so a Parquet row
group is masked without building Python lists, and a padded ``[B, L]`` training batch is the special
case ``offsets = arange(0, B*L + 1, L)`` (padding is special, so it is never selected).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distilflow.tasks.core.config import Config, require

IGNORE_INDEX = -100  # label value at positions that are not predicted (torch CrossEntropy default)


@dataclass(frozen=True)
class MaskConfig(Config):
    mlm_prob: float = 0.15
    mask_frac: float = 0.8
    random_frac: float = 0.1
    whole_word: bool = False
    max_predictions: int = 0  # 0 = no cap (BERT used 20 at seq 128, 80 at seq 512)
    smoothing: float = 0.0  # 0 = uniform; 0.7 = DistilBERT's mlm_smoothing

    def check(self) -> None:
        n = type(self).__name__
        require(0.0 < self.mlm_prob < 1.0, n, "mlm_prob", f"must be in (0, 1), got {self.mlm_prob}")
        require(0.0 <= self.mask_frac <= 1.0, n, "mask_frac", f"must be in [0, 1], got {self.mask_frac}")
        require(0.0 <= self.random_frac <= 1.0, n, "random_frac", f"must be in [0, 1], got {self.random_frac}")
        require(self.mask_frac + self.random_frac <= 1.0, n, "random_frac",
                f"mask_frac + random_frac must be <= 1, got {self.mask_frac + self.random_frac}")
        require(self.max_predictions >= 0, n, "max_predictions", "must be >= 0 (0 = no cap)")
        require(0.0 <= self.smoothing <= 2.0, n, "smoothing", f"must be in [0, 2], got {self.smoothing}")


@dataclass(frozen=True)
class Vocab:
    """What masking needs to know about a tokenizer's vocabulary (built once per job)."""

    size: int
    mask_id: int
    is_special: np.ndarray  # bool [size]: never selected, never used as a random replacement
    is_continuation: np.ndarray  # bool [size]: "##" word pieces (whole-word masking)
    random_ids: np.ndarray  # int32, sorted: candidates for the 10% random replacement

    @classmethod
    def from_tokenizer(cls, tokenizer) -> Vocab:  # a transformers PreTrainedTokenizer(Fast)
        vocab: dict[str, int] = tokenizer.get_vocab()
        size = max(len(tokenizer), max(vocab.values()) + 1)
        is_special = np.zeros(size, dtype=bool)
        is_special[list(tokenizer.all_special_ids)] = True
        # [unusedN] slots (BERT vocabularies) are never produced by the tokenizer: not "real" tokens.
        for tok, i in vocab.items():
            if tok.startswith("[unused") and tok.endswith("]"):
                is_special[i] = True
        is_cont = np.zeros(size, dtype=bool)
        for tok, i in vocab.items():
            if tok.startswith("##"):
                is_cont[i] = True
        if tokenizer.mask_token_id is None:
            raise ValueError("the tokenizer has no mask token; masked-LM data needs one")
        random_ids = np.flatnonzero(~is_special).astype(np.int32)
        return cls(size, int(tokenizer.mask_token_id), is_special, is_cont, random_ids)


def smoothing_weights(token_counts: np.ndarray, smoothing: float) -> np.ndarray:
    """Per-token selection weight ``max(count, 1) ** -smoothing`` (float64 [vocab])."""
    return np.maximum(token_counts.astype(np.float64), 1.0) ** -smoothing


def mask_flat(
    ids: np.ndarray,
    offsets: np.ndarray,
    vocab: Vocab,
    cfg: MaskConfig,
    rng: np.random.Generator,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mask a flat batch. Returns ``(masked_ids int32 [T], labels int32 [T])``; inputs are not modified.

    ids: int [T] token ids of all sequences back to back; offsets: int [n_seq + 1].
    weights: optional float [vocab] selection weights (see :func:`smoothing_weights`).
    """
    ids = np.asarray(ids)
    offsets = np.asarray(offsets, dtype=np.int64)
    n_seq = len(offsets) - 1
    masked = ids.astype(np.int32, copy=True)
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
    if n_seq == 0 or len(ids) == 0:
        return masked, labels

    lengths = np.diff(offsets)
    # Index arrays are int32 where they fit and are dropped as soon as they are used: a batch of ~1 M
    # tokens otherwise peaks at ~75 MB of int64 temporaries (the values, and so the masks, are the same).
    seq_dtype = np.int32 if n_seq < 2**31 else np.int64
    cand_pos = np.flatnonzero(~vocab.is_special[ids])  # [C] positions of candidates (may be selected)
    if len(cand_pos) == 0:
        return masked, labels
    cand_seq = np.repeat(np.arange(n_seq, dtype=seq_dtype), lengths)[cand_pos]  # [C] sequence of each

    # Budget per sequence: round(p * n_candidates), at least 1, at most max_predictions.
    n_cand = np.bincount(cand_seq, minlength=n_seq)
    budget = np.maximum(1, np.rint(n_cand * cfg.mlm_prob)).astype(np.int64)
    if cfg.max_predictions:
        budget = np.minimum(budget, cfg.max_predictions)
    budget = np.minimum(budget, n_cand)

    # Units: single tokens, or whole words (a word starts at a non-"##" piece, or right after a
    # special token / sequence start, so a word never spans a [SEP]).
    if cfg.whole_word:
        prev_is_cand_same_seq = np.zeros(len(cand_pos), dtype=bool)
        prev_is_cand_same_seq[1:] = (cand_pos[1:] == cand_pos[:-1] + 1) & (cand_seq[1:] == cand_seq[:-1])
        starts = ~(vocab.is_continuation[ids[cand_pos]] & prev_is_cand_same_seq)
        unit_of_cand = np.cumsum(starts) - 1  # [C] unit index of each candidate
        unit_first = np.flatnonzero(starts)  # [U] candidate index of each unit's first piece
        unit_seq = cand_seq[unit_first]  # [U]
    else:  # every candidate is its own unit
        unit_first = None
        unit_seq = cand_seq
    n_units = len(unit_seq)

    # Random priority per unit, as an integer where smaller = drawn first: Efraimidis-Spirakis keys
    # log(u)/w ranked descending; with uniform weights that is simply descending u.
    u = rng.random(n_units)
    prio_bits = 62 - n_seq.bit_length()  # (sequence << prio_bits) | priority fits in an int64
    if weights is None:  # u in [0, 1), so floor(u * 2**prio_bits) fits in prio_bits bits
        u *= float(1 << prio_bits)
        prio = u.astype(np.int64)
        del u
        np.subtract((1 << prio_bits) - 1, prio, out=prio)
    else:
        if n_units >= 1 << prio_bits:
            raise ValueError(f"mask_flat: batch too large ({n_units} units in {n_seq} sequences)")
        key = np.log(np.maximum(u, 1e-300)) / weights[ids[cand_pos if unit_first is None else cand_pos[unit_first]]]
        prio = np.empty(n_units, dtype=np.int64)
        prio[np.argsort(-key)] = np.arange(n_units)
    # Units ordered by sequence, then by priority. (np.lexsort((-key, unit_seq)) does the same ~6x
    # slower; numpy sorts int64 with SIMD.) unit_seq is non-decreasing, so unit_seq[j] is also the
    # sequence of the j-th unit in this order.
    key = unit_seq.astype(np.int64)
    key <<= prio_bits
    key |= prio
    del prio
    order = np.argsort(key)
    del key
    if unit_first is not None:
        unit_size = np.diff(np.append(unit_first, len(cand_pos)))  # [U] pieces per word
        take_sorted = _take_within_budget(unit_seq, unit_size[order], budget)
    else:
        # take the first ``budget`` units of each sequence
        seq_first = np.cumsum(n_cand) - n_cand  # [n_seq] index of the sequence's first unit
        take_sorted = np.arange(n_units) - seq_first[unit_seq] < budget[unit_seq]
    take_unit = np.zeros(n_units, dtype=bool)
    take_unit[order[take_sorted]] = True
    sel = cand_pos[take_unit if unit_first is None else take_unit[unit_of_cand]]  # [S] ascending positions

    labels[sel] = ids[sel]
    # 80 / 10 / 10 decision per selected token.
    r = rng.random(len(sel))
    to_mask = sel[r < cfg.mask_frac]
    to_rand = sel[(r >= cfg.mask_frac) & (r < cfg.mask_frac + cfg.random_frac)]
    masked[to_mask] = vocab.mask_id
    masked[to_rand] = random_different(ids[to_rand], vocab.random_ids, rng)
    return masked, labels


def random_different(orig: np.ndarray, pool: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each ``orig`` id, a uniform draw from sorted ``pool`` that is not ``orig`` itself."""
    k = len(pool)
    pos = np.searchsorted(pool, orig)
    present = (pos < k) & (pool[np.minimum(pos, k - 1)] == orig)
    r = rng.integers(0, k - present.astype(np.int64))  # one fewer choice when orig is in the pool
    r = r + (present & (r >= pos))  # skip over orig's slot
    return pool[r].astype(np.int32)


def _take_within_budget(seq_sorted: np.ndarray, sizes_sorted: np.ndarray, budget: np.ndarray) -> np.ndarray:
    """Whole-word selection, BERT's rule: walk words in priority order, skip a word that would
    overshoot the budget, stop at the budget. Always takes at least the first word."""
    take = np.zeros(len(seq_sorted), dtype=bool)
    # Sequential per sequence but over words (not tokens); sequences are short, units few.
    bounds = np.flatnonzero(np.diff(seq_sorted)) + 1
    starts = np.concatenate(([0], bounds))
    ends = np.concatenate((bounds, [len(seq_sorted)]))
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        left = int(budget[seq_sorted[s]])
        got = 0
        for j in range(s, e):
            size = int(sizes_sorted[j])
            if got + size <= left or got == 0:
                take[j] = True
                got += size
                if got >= left:
                    break
    return take


def mask_padded(ids: np.ndarray, vocab: Vocab, cfg: MaskConfig, rng: np.random.Generator,
                weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mask a padded ``[B, L]`` batch (padding must be a special token). Returns two ``[B, L]`` int32."""
    b, length = ids.shape
    offsets = np.arange(0, b * length + 1, length, dtype=np.int64)
    m, lab = mask_flat(ids.reshape(-1), offsets, vocab, cfg, rng, weights)
    return m.reshape(b, length), lab.reshape(b, length)
