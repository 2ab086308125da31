"""WordPiece vocabulary training from the corpus (pipeline without a given tokenizer)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, pipeline

from distilflow.tasks.core.config import ConfigError
from distilflow.tasks.prepare.vocab import VocabConfig, corpus_texts, train_wordpiece
from tests.conftest import GUTENBERG


def test_train_uncased_vocab_loads_with_autotokenizer(tmp_path):
    texts = list(corpus_texts([str(GUTENBERG / "pg11.txt")]))
    assert len(texts) > 500
    train_wordpiece(texts, str(tmp_path / "tok"), VocabConfig(vocab_size=2000))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert 1900 <= len(tok) <= 2000
    enc = tok("Alice was Beginning", "to get VERY tired")
    toks = tok.convert_ids_to_tokens(enc["input_ids"])
    assert toks[0] == "[CLS]" and toks.count("[SEP]") == 2 and toks[-1] == "[SEP]"
    assert "alice" in toks and all(t == t.lower() for t in toks if not t.startswith("["))  # uncased
    assert enc["token_type_ids"][-1] == 1 and enc["token_type_ids"][0] == 0
    assert tok("Café")["input_ids"] == tok("cafe")["input_ids"]  # accents stripped (uncased)
    assert any(t.startswith("##") for t in tok.tokenize("unbelievably rabbit-holes"))
    assert tok.mask_token == "[MASK]" and tok.pad_token_id == 0


def test_cased_vocab_keeps_case(tmp_path):
    texts = list(corpus_texts([str(GUTENBERG / "pg11.txt")]))[:400]
    tok = train_wordpiece(texts, str(tmp_path / "tok"), VocabConfig(vocab_size=1000, lowercase=False))
    assert tok.tokenize("Alice")[0] != tok.tokenize("alice")[0]


def test_vocab_config_validation():
    with pytest.raises(ConfigError, match="vocab_size"):
        VocabConfig(vocab_size=10)


def test_trained_tokenizer_works_with_a_tiny_model(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    texts = list(corpus_texts([str(GUTENBERG / "pg11.txt")]))[:300]
    tok = train_wordpiece(texts, str(tmp_path / "m"), VocabConfig(vocab_size=500))
    model = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32))
    model.save_pretrained(tmp_path / "m")
    out = pipeline("fill-mask", model=str(tmp_path / "m"), top_k=3)("Alice went down the [MASK] hole.")
    assert len(out) == 3 and all("sequence" in o for o in out)
