"""Properties of NSP pair / segment construction (BERT's algorithm) on synthetic and real text."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distilflow.tasks.core.rng import derive_rng
from distilflow.tasks.prepare.pairs import (
    NO_NSP_LABEL,
    Encoder,
    PairsConfig,
    TokenizedPart,
    Uniforms,
    _ascii_fast_path,
    encode_sentences,
    make_pairs,
    truncate_cuts,
)
from distilflow.tasks.prepare.sentences import split_sentences
from distilflow.tasks.prepare.shard import CORPUS_SCHEMA
from tests.conftest import GUTENBERG

CLS, SEP = 101, 102


@pytest.fixture(scope="module")
def words(bert_tokenizer):
    """Whole-word vocabulary entries that tokenize to exactly one id each (unique-token corpora)."""
    vocab = bert_tokenizer.get_vocab()
    out = [w for w, i in sorted(vocab.items(), key=lambda x: x[1]) if w.isalpha() and w.isascii() and len(w) >= 3]
    return out[:6000]


def _part(tok, docs: list[list[str]]) -> TokenizedPart:
    d = Path(tempfile.mkdtemp())
    table = pa.table({"doc_id": [f"d#{i}" for i in range(len(docs))], "source": ["x"] * len(docs),
                      "sentences": docs}, schema=CORPUS_SCHEMA)
    pq.write_table(table, d / "part.parquet")
    return TokenizedPart(str(d / "part.parquet"), tok)


def _unique_docs(words, doc_shapes):
    """Docs whose every token is distinct across the corpus: positions can be located exactly."""
    it = iter(words)
    return [[" ".join(next(it) for _ in range(n)) for n in sent_lens] for sent_lens in doc_shapes]


def _rows(out):
    """(input_ids, token_type_ids, next_sentence_label, doc_id) per instance, as built for Parquet."""
    t = out.table()
    return zip([np.asarray(x) for x in t.column("input_ids").to_pylist()],
               [np.asarray(x) for x in t.column("token_type_ids").to_pylist()],
               t.column("next_sentence_label").to_pylist(), t.column("doc_id").to_pylist(), strict=True)


def _split(seq: np.ndarray):
    seps = np.flatnonzero(seq == SEP)
    return seq[1:seps[0]], seq[seps[0] + 1:seps[1]] if len(seps) > 1 else None, seps


doc_shapes = st.lists(st.lists(st.integers(1, 25), min_size=1, max_size=6), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=doc_shapes, max_seq_len=st.sampled_from([8, 16, 32, 64, 128]), seed=st.integers(0, 10**6),
       short=st.sampled_from([0.0, 0.1, 0.5]), balance=st.booleans())
def test_nsp_invariants(bert_tokenizer, words, shapes, max_seq_len, seed, short, balance):
    docs = _unique_docs(words, shapes)
    part = _part(bert_tokenizer, docs)
    cfg = PairsConfig(tokenizer_sha256="t", max_seq_len=max_seq_len, short_seq_prob=short,
                      balance_single_sentence=balance)
    out, counts = make_pairs(part, cfg, derive_rng(seed, "t"), CLS, SEP)
    position = {int(t): (d, i) for d in range(len(docs))
                for i, t in enumerate(np.concatenate([part.tokens(s) for s in part.doc_sents[d]]))}
    assert len(out) > 0
    for seq, types, label, doc_id in _rows(out):
        assert len(seq) <= max_seq_len
        assert seq[0] == CLS and seq[-1] == SEP
        a, b, seps = _split(seq)
        assert len(seps) == 2 and len(a) >= 1 and len(b) >= 1
        assert (types[: seps[0] + 1] == 0).all() and (types[seps[0] + 1:] == 1).all()
        a_pos = [position[int(t)] for t in a]
        b_pos = [position[int(t)] for t in b]
        a_doc = int(doc_id.split("#")[1])
        # A and B are each one contiguous run of a single document
        assert {d for d, _ in a_pos} == {a_doc}
        assert [i for _, i in a_pos] == list(range(a_pos[0][1], a_pos[0][1] + len(a)))
        assert len({d for d, _ in b_pos}) == 1
        assert [i for _, i in b_pos] == list(range(b_pos[0][1], b_pos[0][1] + len(b)))
        if label == 1 and len(docs) > 1:
            assert b_pos[0][0] != a_doc  # a random B never comes from A's document
        if label == 0:
            assert b_pos[0][0] == a_doc
            gap = b_pos[0][1] - (a_pos[-1][1] + 1)
            assert gap >= 0  # B comes after A ...
            if gap > 0:  # ... directly after it, unless truncation removed the tokens between
                assert len(seq) == max_seq_len
    assert counts["label_0"] + counts["label_1"] == len(out)


def test_labels_are_balanced_and_bert_exact_mode(bert_tokenizer, words):
    rng = np.random.default_rng(0)
    shapes = [[int(x) for x in rng.integers(3, 15, size=int(rng.integers(1, 5)))] for _ in range(400)]
    docs = _unique_docs(words * 3, shapes)
    part = _part(bert_tokenizer, docs)
    for max_len in (32, 128):
        out, counts = make_pairs(part, PairsConfig(tokenizer_sha256="t", max_seq_len=max_len), derive_rng(1, "b"), CLS, SEP)
        share = counts["label_1"] / len(out)
        assert 0.45 < share < 0.55, share
    # BERT's exact rule: a one-sentence document always gets a random B
    single = _part(bert_tokenizer, [[f"{w} {w} {w}"] for w in words[:200]])
    out, counts = make_pairs(single, PairsConfig(tokenizer_sha256="t", max_seq_len=64, balance_single_sentence=False),
                             derive_rng(1, "b"), CLS, SEP)
    assert counts["label_0"] == 0 and counts["label_1"] == len(out) == 200


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=doc_shapes, max_seq_len=st.sampled_from([8, 16, 64]), seed=st.integers(0, 10**6))
def test_no_nsp_segments_cover_every_token(bert_tokenizer, words, shapes, max_seq_len, seed):
    docs = _unique_docs(words, shapes)
    part = _part(bert_tokenizer, docs)
    out, _ = make_pairs(part, PairsConfig(tokenizer_sha256="t", max_seq_len=max_seq_len, nsp=False),
                        derive_rng(seed, "s"), CLS, SEP)
    rebuilt: dict[str, list[int]] = {}
    for seq, types, label, doc_id in _rows(out):
        assert len(seq) <= max_seq_len and seq[0] == CLS and seq[-1] == SEP and (seq == SEP).sum() == 1
        assert (types == 0).all() and label == NO_NSP_LABEL and len(seq) > 2
        rebuilt.setdefault(doc_id, []).extend(seq[1:-1].tolist())
    for d in range(len(docs)):
        expected = np.concatenate([part.tokens(s) for s in part.doc_sents[d]]).tolist()
        assert rebuilt[f"d#{d}"] == expected  # contiguous, in order, nothing lost


@settings(max_examples=200, deadline=None)
@given(la=st.integers(1, 300), lb=st.integers(1, 300), max_tokens=st.integers(2, 300), seed=st.integers(0, 1000))
def test_truncate_cuts(la, lb, max_tokens, seed):
    a, b = np.arange(la), np.arange(1000, 1000 + lb)
    fa, ba, fb, bb = truncate_cuts(la, lb, max_tokens, np.random.default_rng(seed))
    ta, tb, removed = a[fa: la - ba], b[fb: lb - bb], fa + ba + fb + bb
    assert min(fa, ba, fb, bb) >= 0
    assert len(ta) + len(tb) == min(la + lb, max_tokens)
    assert len(ta) >= 1 and len(tb) >= 1
    # contiguous sub-slices; the longer side loses tokens first (B on ties)
    assert np.array_equal(ta, np.arange(ta[0], ta[0] + len(ta))) and np.array_equal(tb, np.arange(tb[0], tb[0] + len(tb)))
    if removed:
        assert abs(len(ta) - len(tb)) <= max(abs(la - lb) - removed, 1) or min(la, lb) == min(len(ta), len(tb))


def test_buffered_draws_are_uniform_and_independent_of_the_block_size():
    small, big = Uniforms(np.random.default_rng(5), block=7), Uniforms(np.random.default_rng(5))
    xs = [small.integers(3, 8) for _ in range(50_000)]
    assert xs == [big.integers(3, 8) for _ in range(50_000)]  # same stream, whatever the buffering
    counts = Counter(xs)
    assert sorted(counts) == [3, 4, 5, 6, 7]
    assert all(abs(c - 10_000) < 500 for c in counts.values()), counts


def test_truncation_sides_are_random(bert_tokenizer):
    rng = np.random.default_rng(0)
    fronts = Counter()
    for _ in range(2000):
        fa, ba, fb, bb = truncate_cuts(100, 5, 55, rng)
        assert fa + ba == 50 and fb + bb == 0
        fronts[fa] += 1
    mean_front = sum(k * v for k, v in fronts.items()) / 2000
    assert abs(mean_front - 25) < 1.5  # 50 removals split ~Binomial(50, 1/2) between front and back


TRICKY = ["Café naïve — “quoted” 東京 e\u0301 \t tabs", "x" * 300, "[MASK] [SEP]", "a [mask] and [Sep] here",
          "Bell\x07 and\x1b escape", "UPPER lower MiXeD 123 ##piece", "tab\there", "\x7f del", "", "  ", "don't-stop!?"]


@pytest.mark.parametrize("backend", ["nanotoken", "tokenizers"])
def test_token_ids_equal_hugging_face(bert_tokenizer, backend):
    assert _ascii_fast_path(bert_tokenizer) is not None  # the fallback's fast path is really exercised below
    enc = Encoder(bert_tokenizer.backend_tokenizer.to_str(), prefer=backend)
    assert enc.backend == backend
    text = (GUTENBERG / "pg11.txt").read_text(encoding="utf-8")
    sentences = split_sentences(text[:60000]) + TRICKY
    flat, offsets = encode_sentences(enc, sentences)
    assert flat.dtype == np.int32 and offsets.dtype == np.int64 and len(offsets) == len(sentences) + 1
    for i, s in enumerate(sentences):
        assert flat[offsets[i]:offsets[i + 1]].tolist() == bert_tokenizer(s, add_special_tokens=False)["input_ids"], s


def test_unsupported_tokenizer_falls_back_to_hugging_face(tmp_path):
    """A BPE tokenizer (not WordPiece): nanotoken refuses it, the encoder says why and uses ``tokenizers``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    bpe = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2, "[UNK]": 3}, merges=[("a", "b")], unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    enc = Encoder(bpe.to_str())
    assert enc.backend == "tokenizers" and "nanotoken" in enc.reason
    flat, offsets = enc.encode(["ab a b", "ba"])
    assert flat.tolist() == [2, 0, 1, 1, 0] and offsets.tolist() == [0, 3, 5]


@pytest.fixture(scope="module", params=[True, False], ids=["uncased", "cased"])
def normalizer_variant(request, bert_tokenizer_path, tmp_path_factory):
    """The shared tokenizer with BertNormalizer(lowercase=...) -- a cased variant exercises the no-lowercase path."""
    import json
    import shutil

    from transformers import BertTokenizerFast

    d = tmp_path_factory.mktemp("tok")
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(bert_tokenizer_path / f, d / f)
    spec = json.loads((d / "tokenizer.json").read_text())
    spec["normalizer"]["lowercase"] = request.param
    (d / "tokenizer.json").write_text(json.dumps(spec))
    return BertTokenizerFast.from_pretrained(str(d))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sentences=st.lists(st.lists(st.sampled_from(list("abcXYZ09 .,'-[]#!\t\x07éü東—") + ["[MASK]", "[SEP]", "[mask]", "Hello"]),
                                   max_size=30).map("".join), min_size=1, max_size=20))
def test_fast_path_ids_equal_the_full_tokenizer(normalizer_variant, sentences):
    for backend in ("nanotoken", "tokenizers"):
        enc = _encoder(normalizer_variant, backend)
        flat, offsets = encode_sentences(enc, sentences)
        for i, s in enumerate(sentences):
            assert flat[offsets[i]:offsets[i + 1]].tolist() == \
                normalizer_variant(s, add_special_tokens=False)["input_ids"], (backend, s)


_ENCODERS: dict = {}


def _encoder(tok, backend: str) -> Encoder:
    key = (id(tok), backend)
    if key not in _ENCODERS:
        _ENCODERS[key] = Encoder(tok.backend_tokenizer.to_str(), prefer=backend)
    return _ENCODERS[key]


# any Unicode text a corpus can hold (valid UTF-8: no surrogates), cased and uncased
_ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sentences=st.lists(_ANY_TEXT, min_size=1, max_size=20))
def test_nanotoken_equals_hugging_face_on_random_unicode(normalizer_variant, sentences):
    flat, offsets = encode_sentences(_encoder(normalizer_variant, "nanotoken"), sentences)
    for i, s in enumerate(sentences):
        assert flat[offsets[i]:offsets[i + 1]].tolist() == \
            normalizer_variant(s, add_special_tokens=False)["input_ids"], repr(s)


def test_workers_load_neither_transformers_nor_torch(bert_tokenizer_path, tmp_path):
    """The pairs/mask units get a TokenizerInfo made in the flow process; a worker encodes from
    tokenizer.json alone (a transformers import costs seconds per worker process, torch more)."""
    import pickle
    import subprocess
    import sys

    from distilflow.tasks.prepare.pairs import TokenizerInfo

    (tmp_path / "info.pkl").write_bytes(pickle.dumps(TokenizerInfo.load(str(bert_tokenizer_path))))
    code = ("import pickle, sys; from distilflow.tasks.prepare.pairs import encoder_for; "
            f"info = pickle.loads(open({str(tmp_path / 'info.pkl')!r}, 'rb').read()); "
            "flat, _ = encoder_for(info.path).encode(['Hello world.']); "
            "print(flat.tolist(), info.vocab.mask_id, 'transformers' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[7592,", "2088,", "1012]", "103", "False", "False"]
