"""Properties of the one masking implementation (static and dynamic masking both call it)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distilflow.tasks.core.config import ConfigError
from distilflow.tasks.core.rng import derive_rng
from distilflow.tasks.prepare.masking import (
    IGNORE_INDEX,
    MaskConfig,
    Vocab,
    mask_flat,
    mask_padded,
    smoothing_weights,
)


@pytest.fixture(scope="module")
def vocab(bert_tokenizer):
    return Vocab.from_tokenizer(bert_tokenizer)


def _batch(rng, vocab, n_seq, min_len=3, max_len=60, pad_to=None):
    """Random [CLS] a.. [SEP] b.. [SEP] sequences of real (non-special) ids, flat + offsets."""
    seqs = []
    for _ in range(n_seq):
        n = int(rng.integers(min_len, max_len + 1))
        body = rng.choice(vocab.random_ids, size=n)
        cut = int(rng.integers(1, n)) if n > 1 else 1
        seq = np.concatenate(([101], body[:cut], [102], body[cut:], [102])).astype(np.int32)
        if pad_to:
            seq = np.concatenate((seq, np.zeros(pad_to - len(seq), dtype=np.int32)))
        seqs.append(seq)
    offsets = np.concatenate(([0], np.cumsum([len(s) for s in seqs])))
    return np.concatenate(seqs), offsets


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), n_seq=st.integers(1, 20), whole_word=st.booleans(),
       smoothing=st.sampled_from([0.0, 0.7]))
def test_invariants(vocab, seed, n_seq, whole_word, smoothing):
    rng = np.random.default_rng(seed)
    ids, offsets = _batch(rng, vocab, n_seq)
    weights = smoothing_weights(rng.integers(0, 1000, size=vocab.size), smoothing) if smoothing else None
    masked, labels = mask_flat(ids, offsets, vocab, MaskConfig(whole_word=whole_word, smoothing=smoothing), rng, weights)
    sel = labels != IGNORE_INDEX
    # labels hold the original id exactly where selected
    assert np.array_equal(labels[sel], ids[sel])
    # never a special token
    assert not vocab.is_special[ids[sel]].any()
    # unselected positions are untouched
    assert np.array_equal(masked[~sel], ids[~sel])
    # replacements are [MASK], the original, or a non-special token
    changed = sel & (masked != ids) & (masked != vocab.mask_id)
    assert not vocab.is_special[masked[changed]].any()
    for s in range(n_seq):
        lo, hi = offsets[s], offsets[s + 1]
        n_cand = int((~vocab.is_special[ids[lo:hi]]).sum())
        n_sel = int(sel[lo:hi].sum())
        assert n_sel >= 1  # at least one prediction per sequence
        if not whole_word:
            assert n_sel == max(1, round(n_cand * 0.15))


def test_rates_80_10_10(vocab):
    rng = derive_rng(0, "rates")
    ids, offsets = _batch(rng, vocab, 4000, 20, 120)
    masked, labels = mask_flat(ids, offsets, vocab, MaskConfig(), rng)
    sel = labels != IGNORE_INDEX
    cand = ~vocab.is_special[ids]
    assert abs(sel.sum() / cand.sum() - 0.15) < 0.005
    m, o = masked[sel], ids[sel]
    assert abs((m == vocab.mask_id).mean() - 0.8) < 0.01
    assert abs((m == o).mean() - 0.1) < 0.01
    rand = (m != vocab.mask_id) & (m != o)
    assert abs(rand.mean() - 0.1) < 0.01
    assert not (m[rand] == o[rand]).any()  # random replacement always differs from the original
    assert len(np.unique(m[rand])) > 1000  # and is spread over the vocabulary


def test_random_replacement_differs_even_with_a_tiny_pool():
    from distilflow.tasks.prepare.masking import random_different

    rng = np.random.default_rng(0)
    pool = np.array([5, 9], dtype=np.int32)
    out = random_different(np.array([5, 9, 7] * 500, dtype=np.int32), pool, rng)
    assert (out[0::3] == 9).all() and (out[1::3] == 5).all() and set(out[2::3]) == {5, 9}


def test_whole_word_masks_all_pieces_together(vocab, bert_tokenizer):
    text = "the unbelievably extraordinary photosynthesis characterization of hyperparameters " * 6
    ids = np.array(bert_tokenizer(text)["input_ids"], dtype=np.int32)
    word_ids = bert_tokenizer(text).word_ids()
    rng = derive_rng(1, "ww")
    for _ in range(50):
        _, labels = mask_flat(ids, np.array([0, len(ids)]), vocab, MaskConfig(whole_word=True), rng)
        sel = labels != IGNORE_INDEX
        for w in set(x for x in word_ids if x is not None):
            pos = [i for i, x in enumerate(word_ids) if x == w]
            assert sel[pos].all() or not sel[pos].any(), f"word {w} partially masked"
    assert any(t.startswith("##") for t in bert_tokenizer.convert_ids_to_tokens(ids))  # the test has pieces


def test_smoothing_prefers_rare_tokens(vocab):
    rng = derive_rng(2, "smooth")
    common, rare = int(vocab.random_ids[100]), int(vocab.random_ids[200])
    seq = np.array([101] + [common] * 50 + [rare] * 50 + [102], dtype=np.int32)
    ids = np.tile(seq, 400)
    offsets = np.arange(0, len(ids) + 1, len(seq))
    counts = np.ones(vocab.size)
    counts[common], counts[rare] = 1_000_000, 10
    _, labels_u = mask_flat(ids, offsets, vocab, MaskConfig(), rng)
    _, labels_s = mask_flat(ids, offsets, vocab, MaskConfig(smoothing=0.7), rng, smoothing_weights(counts, 0.7))
    share = lambda lab: (lab == rare).sum() / max((lab != IGNORE_INDEX).sum(), 1)  # noqa: E731
    assert abs(share(labels_u) - 0.5) < 0.05
    assert share(labels_s) > 0.95


def test_padded_batch_never_selects_padding_and_is_deterministic(vocab):
    rng = derive_rng(3, "pad")
    ids, _ = _batch(rng, vocab, 8, 3, 30, pad_to=40)
    ids = ids.reshape(8, 40)
    a = mask_padded(ids, vocab, MaskConfig(), derive_rng(9, "x"))
    b = mask_padded(ids, vocab, MaskConfig(), derive_rng(9, "x"))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert ((a[1] != IGNORE_INDEX) & (ids == 0)).sum() == 0


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="mlm_prob"):
        MaskConfig(mlm_prob=1.5)
    with pytest.raises(ConfigError, match="random_frac"):
        MaskConfig(mask_frac=0.95, random_frac=0.1)
    with pytest.raises(ConfigError, match="whole_word"):
        MaskConfig(whole_word="yes")  # type: ignore[arg-type]
