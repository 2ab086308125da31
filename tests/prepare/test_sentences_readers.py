"""Sentence splitting and the streaming readers' handling of bad input."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distilflow.tasks.core.readers import BadRecord, Record, iter_records
from distilflow.tasks.prepare.sentences import split_sentences


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Mr. Bennet came. He sat down.", ["Mr. Bennet came.", "He sat down."]),
        ('"Who are you?" said the Caterpillar. Alice replied.', ['"Who are you?" said the Caterpillar.', "Alice replied."]),
        ("J. R. R. Tolkien wrote it. It sold.", ["J. R. R. Tolkien wrote it.", "It sold."]),
        ("It cost $3.50 in 1900. Fine!  Really?", ["It cost $3.50 in 1900.", "Fine!", "Really?"]),
        ("no final punctuation", ["no final punctuation"]),
        ("  \r\n ", []),
        ("A line\r\nwrapped here. Next one.", ["A line wrapped here.", "Next one."]),
        # version 2: abbreviations keep their case, so these ordinary words end sentences (issue 13)
        ("I said no. Then I left.", ["I said no.", "Then I left."]),
        ("She sat. He stood.", ["She sat.", "He stood."]),
        ("They watched the sun. Then it set.", ["They watched the sun.", "Then it set."]),
        ("It was I. Then he came.", ["It was I.", "Then he came."]),
        # ... and the abbreviations still do not
        ("See No. 5 on the list. It is red.", ["See No. 5 on the list.", "It is red."]),
        ("Dr. Watson met MR. HOLMES. They talked.", ["Dr. Watson met MR. HOLMES.", "They talked."]),
        ("On Sat. Nov. 3 we met. E.g. this. Fine.", ["On Sat. Nov. 3 we met.", "E.g. this.", "Fine."]),
        ("The U.S. Army came. Vol. 2 is here.", ["The U.S. Army came.", "Vol. 2 is here."]),
    ],
)
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


def _collect(url, **kw):
    good, bad = [], []
    for r in iter_records(url, **kw):
        (bad if isinstance(r, BadRecord) else good).append(r)
    return good, bad


def test_text_reader_reports_bad_lines_and_keeps_the_rest(tmp_path):
    p = tmp_path / "mixed.txt"
    p.write_bytes(b"good line one\n\xff\xfe broken utf8\n" + b"x" * 5000 + b"\nlast good line\r\n")
    good, bad = _collect(str(p), max_line_bytes=1024)
    assert [g.text for g in good] == ["good line one", "last good line"]
    assert [(b.line, b.reason) for b in bad] == [(2, "invalid_utf8"), (3, "line_too_long")]
    msg = bad[0].message()
    assert str(p) in msg and ":2" in msg and "UTF-8" in msg  # names file, line and the fix


def test_ten_megabyte_line_is_skipped_without_holding_it(tmp_path):
    p = tmp_path / "huge.txt"
    with open(p, "wb") as f:
        f.write(b"before\n")
        f.write(b"y" * (10 * 1024 * 1024))
        f.write(b"\nafter\n")
    good, bad = _collect(str(p))
    assert [g.text for g in good] == ["before", "after"]
    assert bad[0].reason == "line_too_long" and bad[0].line == 2 and "10,485,760" in bad[0].detail


def test_empty_and_binary_files(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "bin.txt").write_bytes(b"\x7fELF\x00\x00\x01binary")
    assert _collect(str(tmp_path / "empty.txt"))[1][0].reason == "empty_file"
    good, bad = _collect(str(tmp_path / "bin.txt"))
    assert good == [] and bad[0].reason == "binary_file"


def test_jsonl_reader_malformed_and_missing(tmp_path):
    p = tmp_path / "d.jsonl.gz"
    lines = [json.dumps({"text": "ok one"}), "{not json", json.dumps({"body": "x"}), json.dumps([1]),
             json.dumps({"text": 5}), "", json.dumps({"text": "ok two", "id": 7})]
    p.write_bytes(gzip.compress("\n".join(lines).encode()))
    good, bad = _collect(str(p), keep_fields=("id",))
    assert [(g.text, g.line) for g in good] == [("ok one", 1), ("ok two", 7)]
    assert good[1].fields == {"id": 7}
    assert [(b.line, b.reason) for b in bad] == [(2, "malformed_json"), (3, "missing_field"),
                                                 (4, "malformed_json"), (5, "not_a_string")]


def test_parquet_and_csv_readers(tmp_path):
    pq.write_table(pa.table({"text": ["a b", None, "c d"], "k": [1, 2, 3]}), tmp_path / "t.parquet")
    good, bad = _collect(str(tmp_path / "t.parquet"), keep_fields=("k",))
    assert [(g.text, g.line, g.fields["k"]) for g in good] == [("a b", 0, 1), ("c d", 2, 3)]
    assert bad[0].reason == "null_text" and bad[0].line == 1
    good, bad = _collect(str(tmp_path / "t.parquet"), text_field="missing")
    assert bad[0].reason == "missing_column"
    (tmp_path / "t.csv").write_text('text,k\n"hello, world",1\nsecond,2\n')
    good, _ = _collect(str(tmp_path / "t.csv"), keep_fields=("k",))
    assert [(g.text, g.fields["k"]) for g in good] == [("hello, world", "1"), ("second", "2")]


def test_truncated_gzip_is_reported_not_raised(tmp_path):
    p = tmp_path / "cut.txt.gz"
    p.write_bytes(gzip.compress(b"line one\n" * 10000)[:200])
    records = list(iter_records(str(p)))
    assert isinstance(records[-1], BadRecord) and records[-1].reason == "unreadable_file"
    assert all(isinstance(r, Record) for r in records[:-1])
