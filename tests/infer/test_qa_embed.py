"""Batch QA (pipeline post-processing semantics) and embeddings, through the shared batch_io machinery.

transformers 5 removed the ``question-answering`` pipeline, so QA is checked against an independent
brute-force implementation of that pipeline's rules (masked softmax over start/end logits, every span
with start <= end < start + max_answer_len inside the context, word-aligned characters, per-feature
top ``2k + 10`` candidates merged by answer text across overlapping features) run one example at a
time, unbatched, on a tiny real model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForQuestionAnswering,
    AutoTokenizer,
    BertConfig,
    BertForQuestionAnswering,
    DistilBertConfig,
    DistilBertForQuestionAnswering,
)

from distilflow.tasks.infer.batch_io import InputRow, open_output, run_file
from distilflow.tasks.infer.embed import EmbedConfig, Embedder
from distilflow.tasks.infer.qa import QAConfig, QuestionAnswerer
from tests.conftest import GUTENBERG


def save_tiny_qa(path: Path, kind: str, tokenizer_path: Path) -> str:
    torch.manual_seed(1)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_path))
    if kind == "bert":
        m = BertForQuestionAnswering(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, intermediate_size=64,
                                                max_position_embeddings=256, initializer_range=0.5))
    else:
        m = DistilBertForQuestionAnswering(DistilBertConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2,
                                                            hidden_dim=64, max_position_embeddings=256,
                                                            initializer_range=0.5))
    m.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=["bert", "distilbert"])
def qa_path(request, tmp_path_factory, bert_tokenizer_path):
    return save_tiny_qa(tmp_path_factory.mktemp("qa-" + request.param), request.param, bert_tokenizer_path)


def reference_qa(path: str, question: str, context: str, top_k: int = 1, max_seq_len: int = 384,
                 doc_stride: int = 128, max_answer_len: int = 15) -> list[dict]:
    """The 4.x pipeline's rules, brute force, one example and one feature at a time."""
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForQuestionAnswering.from_pretrained(path).eval()
    enc = tok(question, context, truncation="only_second", max_length=max_seq_len, stride=doc_stride,
              return_overflowing_tokens=True, return_offsets_mapping=True)
    answers: dict[str, dict] = {}
    for span in range(len(enc["input_ids"])):
        ids = enc["input_ids"][span]
        inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        if "token_type_ids" in tok.model_input_names:
            inputs["token_type_ids"] = torch.tensor([enc["token_type_ids"][span]])
        with torch.no_grad():
            out = model(**inputs)
        seq = enc.sequence_ids(span)
        ctx = np.array([s == 1 for s in seq])
        def probs(logits, ctx=ctx):
            x = np.where(ctx | (np.arange(len(ctx)) == 0), logits[0].numpy(), -10000.0)
            p = np.exp(x - x.max())
            p = p / p.sum()
            p[0] = 0.0  # [CLS] cannot be the answer
            return p
        ps, pe = probs(out.start_logits), probs(out.end_logits)
        cands = [(ps[s] * pe[e], s, e) for s in range(len(ids)) for e in range(s, min(len(ids), s + max_answer_len))
                 if ctx[s] and ctx[e]]
        cands.sort(key=lambda c: -c[0])
        e_obj = enc.encodings[span]
        for score, s, e in cands[: top_k * 2 + 10]:
            a = e_obj.word_to_chars(e_obj.token_to_word(s), sequence_index=1)[0]
            b = e_obj.word_to_chars(e_obj.token_to_word(e), sequence_index=1)[1]
            text = context[a:b]
            if text.lower() in answers:
                answers[text.lower()]["score"] += float(score)
            else:
                answers[text.lower()] = {"score": float(score), "start": a, "end": b, "answer": text}
    return sorted(answers.values(), key=lambda x: -x["score"])[:top_k]


def squad_examples(n: int) -> list[dict]:
    squad = json.loads((GUTENBERG.parents[1] / "squad" / "dev-v1.1.json").read_text())
    out = []
    for art in squad["data"]:
        for para in art["paragraphs"]:
            out.append({"question": para["qas"][0]["question"], "context": para["context"]})
            if len(out) == n:
                return out
    return out


def test_qa_matches_pipeline_rules_short_and_chunked(qa_path):
    examples = squad_examples(6)
    examples.append({"question": "What's my name?", "context": "My name is John and I live in Seattle"})
    qa = QuestionAnswerer(QAConfig(model=qa_path, max_seq_len=64, doc_stride=16, batch_size=4))
    res = qa.process([InputRow(i, None, e) for i, e in enumerate(examples)])
    assert res.stats["features"] > len(examples)  # SQuAD paragraphs overflow 64 tokens -> several features
    got = dict(res.json_items)
    for i, ex in enumerate(examples):
        ref = reference_qa(qa_path, ex["question"], ex["context"], max_seq_len=64, doc_stride=16)[0]
        ours = got[i]
        assert (ours["answer"], ours["start"], ours["end"]) == (ref["answer"], ref["start"], ref["end"])
        assert abs(ours["score"] - ref["score"]) < 1e-5
        assert ex["context"][ours["start"]:ours["end"]] == ours["answer"]


def test_qa_top_k_and_file(qa_path, tmp_path):
    req = {"inputs": {"question": ["What's my name?", "Where do I live?"],
                      "context": ["My name is John and I live in Seattle"] * 2}}
    (tmp_path / "q.json").write_text(json.dumps(req))
    cfg = QAConfig(model=qa_path, top_k=3)
    stage = open_output(str(tmp_path / "o"), "qa", cfg.to_dict(), cfg.output_fingerprint())
    m = run_file(QuestionAnswerer(cfg), stage, str(tmp_path / "q.json"), "q")
    assert m["ok_rows"] == 2
    t = pq.read_table(tmp_path / "o" / "q.parquet").to_pylist()
    assert [r["rank"] for r in t] == [1, 2, 3, 1, 2, 3]
    for rid in (0, 1):
        mine = [r for r in t if r["row_id"] == rid]
        ref = reference_qa(qa_path, req["inputs"]["question"][rid], req["inputs"]["context"][rid], top_k=3)
        assert [(r["answer"], r["start"], r["end"]) for r in mine] == [(x["answer"], x["start"], x["end"]) for x in ref]
        assert all(abs(r["score"] - x["score"]) < 1e-5 for r, x in zip(mine, ref, strict=True))


def test_qa_question_too_long_is_an_error_row(qa_path):
    qa = QuestionAnswerer(QAConfig(model=qa_path, max_seq_len=32, doc_stride=8))
    res = qa.process([InputRow(0, 1, {"question": "why " * 40, "context": "because"}),
                      InputRow(1, 2, {"question": "who?", "context": "John did it"})])
    assert [e.reason for e in res.errors] == ["question_too_long"] and res.columns["row_id"] == [1]


@pytest.fixture(scope="module")
def mlm_path(tmp_path_factory, bert_tokenizer_path):
    from tests.infer.test_fill_mask import save_tiny_mlm

    return save_tiny_mlm(tmp_path_factory.mktemp("emb"), "distilbert", bert_tokenizer_path)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_embeddings_match_unbatched_forward(mlm_path, pooling):
    texts = ["a short one", "a somewhat longer sentence with more words in it", "x"]
    emb = Embedder(EmbedConfig(model=mlm_path, pooling=pooling, batch_size=2))
    res = emb.process([InputRow(i, None, {"text": t}) for i, t in enumerate(texts)])
    vecs = np.stack(res.columns["embedding"])
    assert vecs.shape == (3, 32) and res.columns["row_id"] == [0, 1, 2]
    tok = AutoTokenizer.from_pretrained(mlm_path)
    enc_model = AutoModel.from_pretrained(mlm_path).eval()
    for i, t in enumerate(texts):
        with torch.no_grad():
            h = enc_model(**tok(t, return_tensors="pt")).last_hidden_state[0]  # (L, H), no padding
        ref = h.mean(0) if pooling == "mean" else h[0]
        np.testing.assert_allclose(vecs[i], ref.numpy(), atol=1e-5)


def test_embed_file_normalized_truncated(mlm_path, tmp_path):
    (tmp_path / "e.txt").write_text("hello world\n" + "long " * 300 + "\n")
    cfg = EmbedConfig(model=mlm_path, normalize=True)
    stage = open_output(str(tmp_path / "o"), "embed", cfg.to_dict(), cfg.output_fingerprint())
    run_file(Embedder(cfg), stage, str(tmp_path / "e.txt"), "e")
    t = pq.read_table(tmp_path / "o" / "e.parquet")
    typ = t.schema.field("embedding").type
    assert pa.types.is_fixed_size_list(typ) and typ.list_size == 32 and typ.value_type == pa.float32()
    v = np.array(t.column("embedding").to_pylist())
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert t.column("truncated").to_pylist() == [False, True] and t.column("tokens").to_pylist()[1] == 128
    cfg2 = EmbedConfig(model=mlm_path, too_long="error")
    stage2 = open_output(str(tmp_path / "o2"), "embed", cfg2.to_dict(), cfg2.output_fingerprint())
    m = run_file(Embedder(cfg2), stage2, str(tmp_path / "e.txt"), "e")
    assert m["skipped"] == {"too_long": 1} and m["ok_rows"] == 1


def test_qa_and_embed_cli_flows(qa_path, mlm_path, tmp_path, prefect_test_harness_session):
    from distilflow.cli import main

    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "What's my name?", "id": "a",
                                                  "context": "My name is John and I live in Seattle"}) + "\n")
    assert main(["qa", "--input", str(tmp_path / "q.jsonl"), "--output", str(tmp_path / "qa"), "--model", qa_path,
                 "--keep-columns", "id", "--threads", "1"]) == 0
    row = pq.read_table(tmp_path / "qa" / "q.parquet").to_pylist()[0]
    assert row["id"] == "a" and "My name is John and I live in Seattle"[row["start"]:row["end"]] == row["answer"]
    (tmp_path / "t.txt").write_text("one line\nanother line\n")
    assert main(["embed", "--input", str(tmp_path / "t.txt"), "--output", str(tmp_path / "em"), "--model", mlm_path,
                 "--pooling", "cls", "--threads", "1"]) == 0
    manifest = json.loads((tmp_path / "em" / ".distilflow" / "manifest.json").read_text())
    assert manifest["counts"]["ok_rows"] == 2 and manifest["config"]["pooling"] == "cls"
