"""Shared batch-inference machinery: readers (files, requests, URLs), batching, atomic writer, accounting."""

from __future__ import annotations

import gzip
import json
import os

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distilflow.tasks.infer.batch_io import (
    ErrorRow,
    InputRow,
    ParquetStreamWriter,
    WindowResult,
    length_sorted_batches,
    open_output,
    output_stem,
    plan_units,
    run_file,
    write_run_manifest,
)
from distilflow.tasks.infer.batch_io import iter_rows as rows_of


class CharCountJob:
    """A minimal real BatchJob (no model): one output row per input row, length of its text."""

    input_columns = ("text",)

    def __init__(self, fail_on: str | None = None):
        self.fail_on = fail_on
        self.calls = 0

    def schema(self) -> pa.Schema:
        return pa.schema([pa.field("row_id", pa.int64(), nullable=False), pa.field("chars", pa.int32())])

    def process(self, rows: list[InputRow], url: str) -> WindowResult:
        self.calls += 1
        if self.fail_on and any(self.fail_on in r.values["text"] for r in rows):
            raise RuntimeError("simulated crash")
        ok = [r for r in rows if not r.values["text"].startswith("BAD")]
        errors = [ErrorRow(url, r.row_id, r.line, "no_mask") for r in rows if r.values["text"].startswith("BAD")]
        return WindowResult({"row_id": [r.row_id for r in ok], "chars": [len(r.values["text"]) for r in ok]},
                            [r.row_id for r in ok], [(r.row_id, len(r.values["text"])) for r in ok], errors)


def texts(rows):
    return [(r.row_id, r.values.get("text")) if isinstance(r, InputRow) else (r.row_id, r.reason) for r in rows]


def test_text_jsonl_csv_gzip_rows_keep_ids(tmp_path):
    (tmp_path / "a.txt").write_text("one [MASK]\n\nthree\n")
    assert texts(rows_of(str(tmp_path / "a.txt"))) == [(0, "one [MASK]"), (1, "empty_text"), (2, "three")]
    (tmp_path / "b.jsonl").write_text('{"text": "x", "id": 7}\nnot json\n{"other": 1}\n{"text": "y", "id": 8}\n')
    rows = list(rows_of(str(tmp_path / "b.jsonl"), keep_columns=("id",)))
    assert texts(rows) == [(0, "x"), (1, "malformed_json"), (2, "missing_field"), (3, "y")]
    assert rows[0].keep == {"id": 7} and rows[1].line == 2
    (tmp_path / "c.csv").write_text("id,text\n1,hello\n2,world\n")
    assert texts(rows_of(str(tmp_path / "c.csv"))) == [(0, "hello"), (1, "world")]
    with gzip.open(tmp_path / "d.txt.gz", "wt") as f:
        f.write("g1\ng2\n")
    assert texts(rows_of(str(tmp_path / "d.txt.gz"))) == [(0, "g1"), (1, "g2")]
    (tmp_path / "empty.txt").write_text("")
    assert [(r.row_id, r.reason) for r in rows_of(str(tmp_path / "empty.txt"))] == [(None, "empty_file")]


def test_parquet_text_column_and_memory_url():
    fs = fsspec.filesystem("memory")
    table = pa.table({"body": ["p [MASK]", None, "q"], "n": pa.array([1, 2, 3], pa.int16())})
    with fs.open("/bio/in.parquet", "wb") as f:
        pq.write_table(table, f)
    rows = list(rows_of("memory://bio/in.parquet", columns=("body",), keep_columns=("n",)))
    assert texts(rows) == [(0, None), (1, "null_text"), (2, None)]
    assert rows[0].values == {"body": "p [MASK]"} and rows[2].keep == {"n": 3}
    missing = list(rows_of("memory://bio/in.parquet", columns=("text",)))
    assert [(r.row_id, r.reason) for r in missing] == [(None, "missing_column")]


@pytest.mark.parametrize("request_obj", [
    {"input_data": ["a [MASK]", "b [mask]"]},
    {"inputs": {"input_string": ["a [MASK]", "b [mask]"]}},
    {"input_data": {"columns": ["text"], "data": [["a [MASK]"], ["b [mask]"]]}},
    ["a [MASK]", "b [mask]"],
])
def test_json_request_shapes(tmp_path, request_obj):
    p = tmp_path / "req.json"
    p.write_text(json.dumps(request_obj))
    assert texts(rows_of(str(p))) == [(0, "a [MASK]"), (1, "b [mask]")]


def test_qa_request_shapes(tmp_path):
    cols = ("question", "context")
    single = {"question": "What's my name?", "context": "My name is John and I live in Seattle"}
    (tmp_path / "one.json").write_text(json.dumps(single))
    rows = list(rows_of(str(tmp_path / "one.json"), columns=cols))
    assert len(rows) == 1 and rows[0].values == single
    (tmp_path / "many.json").write_text(json.dumps({"inputs": {"question": ["q1", "q2"], "context": ["c1", "c2"]}}))
    assert [r.values for r in rows_of(str(tmp_path / "many.json"), columns=cols)] == [
        {"question": "q1", "context": "c1"}, {"question": "q2", "context": "c2"}]
    (tmp_path / "x.jsonl").write_text(json.dumps(single) + "\n" + json.dumps({"question": "q"}) + "\n")
    got = list(rows_of(str(tmp_path / "x.jsonl"), columns=cols))
    assert got[0].values == single and (got[1].row_id, got[1].reason) == (1, "missing_field")
    (tmp_path / "bad.json").write_text(json.dumps({"data": 1}))
    assert [r.reason for r in rows_of(str(tmp_path / "bad.json"))] == ["malformed_request"]


def test_json_suffix_with_jsonl_content(tmp_path):
    (tmp_path / "l.json").write_text('{"text": "a"}\n{"text": "b"}\n')
    assert texts(rows_of(str(tmp_path / "l.json"))) == [(0, "a"), (1, "b")]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 300), max_size=200), st.integers(1, 17), st.sampled_from([0, 64, 500]))
def test_length_sorted_batches_cover_everything_once(lengths, batch_size, max_tokens):
    batches = length_sorted_batches(lengths, batch_size, max_tokens)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    for b in batches:
        assert 1 <= len(b) <= batch_size
        if max_tokens and len(b) > 1:
            assert len(b) * max(lengths[i] for i in b) <= max_tokens
    # sorted: lengths never increase along the flattened order
    assert all(lengths[a] >= lengths[b] for a, b in zip(flat, flat[1:], strict=False))


def test_parquet_writer_is_atomic(tmp_path):
    schema = pa.schema([pa.field("row_id", pa.int64())])
    url = str(tmp_path / "o.parquet")
    with pytest.raises(RuntimeError), ParquetStreamWriter(url, schema) as w:
        w.write({"row_id": [1, 2]})
        raise RuntimeError("crash mid-file")
    assert os.listdir(tmp_path) == []  # neither the file nor a temp file
    with ParquetStreamWriter(url, schema) as w:
        w.write({"row_id": [1, 2]})
        w.write({"row_id": [3]})
    assert pq.read_table(url).column("row_id").to_pylist() == [1, 2, 3]


def test_output_stem_and_unique_keys():
    assert output_stem("s3://b/in/day-01.jsonl.gz") == "day-01"
    assert output_stem("/x/.hidden") == ".hidden"
    assert [k for _, k in plan_units(["/a/x.txt", "/b/x.csv", "/c/y.txt"])] == ["x", "x-2", "y"]


def test_run_file_accounts_for_every_row_and_resumes(tmp_path):
    src = tmp_path / "in.jsonl"
    lines = [{"text": f"t{i}", "k": i} for i in range(10)] + [{"text": "BAD one", "k": 10}, {"nope": 1}]
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\nbroken\n")
    out = str(tmp_path / "out")
    stage = open_output(out, "count", {"v": 1}, "fp1")
    job = CharCountJob()
    m = run_file(job, stage, str(src), "in", keep_columns=("k",), window_rows=4)
    assert (m["input_rows"], m["ok_rows"], m["error_rows"]) == (13, 10, 3)
    assert m["skipped"] == {"malformed_json": 1, "missing_field": 1, "no_mask": 1}
    t = pq.read_table(tmp_path / "out" / "in.parquet")
    assert t.column_names == ["row_id", "chars", "k"] and t.schema.field("k").type == pa.string()
    assert t.column("row_id").to_pylist() == list(range(10)) and t.column("k").to_pylist()[3] == "3"
    errs = [json.loads(x) for x in (tmp_path / "out" / ".distilflow" / "errors" / "in.jsonl").read_text().splitlines()]
    assert [e["row_id"] for e in errs] == [10, 11, 12]
    manifest = write_run_manifest(stage, ["in"])
    assert manifest["counts"]["input_rows"] == 13 and manifest["rows"] == 10
    calls = job.calls
    again = run_file(job, stage, str(src), "in", keep_columns=("k",), window_rows=4)
    assert again.get("skipped_done") and job.calls == calls
    # the same name with new content is processed again
    src.write_text(json.dumps({"text": "new"}) + "\n")
    m2 = run_file(job, stage, str(src), "in", keep_columns=("k",))
    assert not m2.get("skipped_done") and m2["input_rows"] == 1


def test_crash_leaves_no_output_and_no_marker(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("a\nb\nboom\nc\n")
    stage = open_output(str(tmp_path / "out"), "count", {}, "fp")
    with pytest.raises(RuntimeError, match="simulated"):
        run_file(CharCountJob(fail_on="boom"), stage, str(src), "in", window_rows=2)
    assert not (tmp_path / "out" / "in.parquet").exists() and not stage.is_done("in")
    m = run_file(CharCountJob(), stage, str(src), "in", window_rows=2)  # rerun after the crash
    assert m["ok_rows"] == 4


def test_parquet_keep_column_type_and_json_output(tmp_path):
    pq.write_table(pa.table({"text": ["a", "BAD", "ccc"], "n": pa.array([5, 6, 7], pa.int64())}), tmp_path / "p.parquet")
    stage = open_output(str(tmp_path / "o"), "count", {}, "fp")
    run_file(CharCountJob(), stage, str(tmp_path / "p.parquet"), "p", keep_columns=("n",))
    t = pq.read_table(tmp_path / "o" / "p.parquet")
    assert t.schema.field("n").type == pa.int64() and t.column("n").to_pylist() == [5, 7]
    run_file(CharCountJob(), stage, str(tmp_path / "p.parquet"), "pj", fmt="json")
    assert json.loads((tmp_path / "o" / "pj.json").read_text()) == [1, None, 3]
