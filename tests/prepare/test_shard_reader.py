"""The block reader of plain text gives exactly the documents of the per-line reference reader."""

from __future__ import annotations

import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distilflow.tasks.core.readers import BadRecord
from distilflow.tasks.prepare import shard
from distilflow.tasks.prepare.shard import ShardConfig, _line_documents, _text_documents, to_sentences
from tests.conftest import GUTENBERG


def _docs(reader, data: bytes, cfg: ShardConfig) -> list:
    """Documents as their sentences (what is stored), bad records as (line, reason)."""
    out = []
    for item in reader("f.txt", io.BytesIO(data), cfg):
        out.append((item.line, item.reason) if isinstance(item, BadRecord) else to_sentences(item[0], cfg))
    return out


def _same(data: bytes, cfg: ShardConfig) -> None:
    assert _docs(_text_documents, data, cfg) == _docs(_line_documents, data, cfg)


LINES = st.sampled_from(["", " ", "\t", "\r", " \u3000 ", "\x1c", "\xa0", "\u2028", "Hello there.", "Mr. Smith went.",
                         "caf\u00e9 au lait", "\ufeffBOM", "a" * 40, "Who? Me! Yes.", "x\x00y", "  indented line"])
RAW = st.sampled_from([b"\xff\xfe bad", b"\xc3", b"z" * 300])


@pytest.mark.parametrize("block", [7, 64, 4096])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.one_of(LINES.map(lambda s: s.encode()), RAW), max_size=40),
       crlf=st.booleans(), ospl=st.booleans(), final_newline=st.booleans())
def test_block_reader_equals_line_reader(monkeypatch, block, parts, crlf, ospl, final_newline):
    monkeypatch.setattr(shard, "BLOCK_BYTES", block)
    nl = b"\r\n" if crlf else b"\n"
    data = nl.join(parts) + (nl if final_newline and parts else b"")
    _same(data, ShardConfig(max_line_bytes=1024, max_doc_bytes=1024 if not ospl else 2048, one_sentence_per_line=ospl))
    _same(data, ShardConfig(max_line_bytes=1024, max_doc_bytes=1024, one_sentence_per_line=ospl))


@pytest.mark.parametrize("book", ["pg11.txt", "pg1342.txt"])
def test_real_books_give_the_same_documents(monkeypatch, book):
    data = (GUTENBERG / book).read_bytes()
    monkeypatch.setattr(shard, "BLOCK_BYTES", 100_000)
    _same(data, ShardConfig())
    _same(data[:200_000], ShardConfig(max_doc_bytes=1024, max_line_bytes=1024))  # cut documents, CRLF


def test_long_lines_and_binary_and_empty_files_are_handed_to_the_reference(monkeypatch):
    monkeypatch.setattr(shard, "BLOCK_BYTES", 4096)
    cfg = ShardConfig(max_line_bytes=1024)
    _same(b"before\n\n" + b"y" * 50_000 + b"\n\nafter the long line.\n", cfg)
    _same(b"\x7fELF\x00\x00binary", cfg)
    _same(b"", cfg)
    _same(b"ok.\n\nbad \xff here\n\nfine again.\n" * 500, cfg)
