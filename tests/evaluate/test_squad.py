"""SQuAD v1.1: reader on the shared dev file, doc-stride features, post-processing, scoring."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distilflow.tasks.evaluate.squad import (
    SquadExample,
    make_features,
    postprocess,
    read_squad,
    score,
    split_by_title,
)
from tests.conftest import SHARED

DEV = SHARED / "squad" / "dev-v1.1.json"


@pytest.fixture(scope="module")
def dev():
    return read_squad(str(DEV))


def test_reader_on_the_official_dev_file(dev):
    # SOURCE.txt: 48 articles, 10,570 questions, 34,726 gold answers
    assert dev.version == "1.1"
    assert len(dev.examples) == 10570
    assert len({e.title for e in dev.examples}) == 48
    assert sum(len(e.answers) for e in dev.examples) == 34726
    first = dev.examples[0]
    assert first.id == "56be4db0acb8001400a502ec"
    assert first.question == "Which NFL team represented the AFC at Super Bowl 50?"
    assert first.answers[0] == "Denver Broncos" and first.answer_starts[0] == 177
    assert first.context[177:177 + len("Denver Broncos")] == "Denver Broncos"
    assert not dev.misaligned  # every first answer points at its text in the official dev file


def test_reader_limit_and_bad_entries(tmp_path):
    doc = {"version": "1.1", "data": [{"title": "T", "paragraphs": [{
        "context": "Paris is the capital of France.",
        "qas": [
            {"id": "ok", "question": "What is the capital?", "answers": [{"text": "Paris", "answer_start": 0}]},
            {"id": "noans", "question": "Why?", "answers": []},
            {"question": "No id?", "answers": [{"text": "x", "answer_start": 0}]},
            {"id": "shifted", "question": "Country?", "answers": [{"text": "France", "answer_start": 3}]},
        ]}]}]}
    f = tmp_path / "s.json"
    f.write_text(json.dumps(doc))
    data = read_squad(str(f))
    assert [e.id for e in data.examples] == ["ok", "shifted"]
    reasons = sorted(b.reason for b in data.bad)
    assert reasons == ["answer_mismatch", "bad_squad_entry", "bad_squad_entry"]
    assert any("data[0].paragraphs[0].qas[1]" in b.message() for b in data.bad)
    assert data.misaligned == {"shifted"}
    assert len(read_squad(str(f), limit=1).examples) == 1
    g = tmp_path / "bad.json"
    g.write_text("[1, 2]")
    assert read_squad(str(g)).bad[0].reason == "not_squad"


def test_split_by_title_has_no_leak(dev):
    a, b = split_by_title(dev.examples, 0.5, seed=0)
    assert len(a) + len(b) == len(dev.examples)
    assert not {e.title for e in a} & {e.title for e in b}


def test_train_features_point_at_the_answer(dev, bert_tokenizer):
    ex = dev.examples[:60]
    f = make_features(ex, bert_tokenizer, max_seq_len=128, doc_stride=48, train=True)
    assert len(f) > len(ex)  # long contexts were cut into several windows
    n_inside = 0
    for i in range(len(f)):
        e = ex[f.example_index[i]]
        s, t = f.start_positions[i], f.end_positions[i]
        if s == 0:
            assert t == 0  # answer outside this window -> [CLS]
            continue
        n_inside += 1
        span = e.context[f.offsets[i, s, 0]:f.offsets[i, t, 1]]
        assert e.answers[0].lower() in span.lower()  # the token span covers the answer (sub-token: may be wider)
        assert f.offsets[i, s, 0] >= 0 and f.offsets[i, t, 0] >= 0  # both inside the context segment
    # every question has its answer inside at least one window
    inside = {int(f.example_index[i]) for i in range(len(f)) if f.start_positions[i] > 0}
    assert inside == set(range(len(ex)))
    assert n_inside >= len(ex)


def test_gold_logits_roundtrip_scores_near_100(dev, bert_tokenizer):
    ex = dev.examples[:200]
    f = make_features(ex, bert_tokenizer, max_seq_len=128, doc_stride=48, train=True)
    start = np.full(f.input_ids.shape, -10.0)
    end = start.copy()
    for i in range(len(f)):
        if f.start_positions[i] > 0:
            start[i, f.start_positions[i]] = 10.0
            end[i, f.end_positions[i]] = 10.0
    preds = postprocess(ex, f, start, end)
    s = score(ex, preds)
    # only answers that are part of a word piece ("gold" in "golden") can't be reproduced exactly
    assert s["exact_match"] > 93 and s["f1"] > 95 and s["missing"] == 0


def test_postprocess_rules(bert_tokenizer):
    ctx = "The Denver Broncos defeated the Carolina Panthers in Santa Clara."
    ex = [SquadExample("q", "t", ctx, "Who won?", ("Denver Broncos",), (4,))]
    f = make_features(ex, bert_tokenizer, max_seq_len=64, doc_stride=16)
    toks = bert_tokenizer.convert_ids_to_tokens(f.input_ids[0].tolist())
    i_denver, i_broncos = toks.index("denver"), toks.index("broncos")
    i_santa = toks.index("santa")
    i_the = toks.index("the")  # first "the" of the context, before "denver" (the question has none)
    start = np.full(f.input_ids.shape, -10.0)
    end = np.full(f.input_ids.shape, -10.0)
    start[0, 0] = end[0, 0] = 100.0  # [CLS] is never an answer
    start[0, 1] = end[0, 1] = 90.0  # a question token is never an answer
    start[0, i_santa] = 50.0
    end[0, i_the] = 60.0  # ends before every high start: invalid
    start[0, i_denver] = 40.0
    end[0, i_broncos] = 30.0
    end[0, i_denver] = 0.0
    preds = postprocess(ex, f, start, end, n_best=20, max_answer_length=30)
    assert preds["q"] == "Denver Broncos"  # original casing, mapped back via offsets
    # a span longer than max_answer_length is not allowed: only the 1-token span remains
    end[0, i_the] = -10.0
    start[0, i_santa] = -10.0
    preds = postprocess(ex, f, start, end, n_best=20, max_answer_length=1)
    assert preds["q"] == "Denver"  # start 40 + end 0 beats "Broncos" (-10 + 30)


def test_doc_stride_validation(bert_tokenizer):
    ex = [SquadExample("q", "t", "a b c", "q?", ("a",), (0,))]
    with pytest.raises(ValueError, match="doc_stride"):
        make_features(ex, bert_tokenizer, max_seq_len=64, doc_stride=60)


def test_long_questions_are_truncated_to_max_query_len(bert_tokenizer):
    question = "why " * 100 + "?"
    ex = [SquadExample("q", "t", "Paris is the capital of France.", question, ("Paris",), (0,))]
    f = make_features(ex, bert_tokenizer, max_seq_len=64, doc_stride=16, max_query_len=20, train=True)
    n_question = int(np.sum((f.offsets[0, :, 0] < 0) & (f.attention_mask[0] == 1))) - 3  # minus [CLS] [SEP] [SEP]
    assert n_question <= 20
    assert f.start_positions[0] > 0  # the whole context still fits, with the answer
