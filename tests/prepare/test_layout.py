"""Prepared folders open as datasets: every data folder holds only its Parquet files, the bookkeeping is in a
hidden ``.distilflow/``, a dataset card makes ``load_dataset(DIR, "pairs")`` work; old folders are migrated
by writers and refused by readers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

from distilflow.tasks.core.errors import DataError
from distilflow.tasks.core.stage import StageDir, read_manifest
from distilflow.tasks.prepare.config import PrepareConfig
from distilflow.tasks.prepare.job import run_local
from distilflow.tasks.prepare.mask import MASKED_SCHEMA
from distilflow.tasks.prepare.pairs import COUNTS_SCHEMA, PAIRS_SCHEMA
from distilflow.tasks.prepare.shard import CORPUS_SCHEMA
from tests.conftest import BERT_TOKENIZER, GUTENBERG

SCHEMAS = {"corpus": CORPUS_SCHEMA, "pairs": PAIRS_SCHEMA, "masked": MASKED_SCHEMA, "token_counts": COUNTS_SCHEMA}


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _inputs(d: Path) -> list[str]:
    d.mkdir(parents=True, exist_ok=True)
    text = (GUTENBERG / "pg11.txt").read_text(encoding="utf-8")
    files = {"a.txt": text[:30000], "b.txt": text[30000:50000],
             "c.jsonl": '{"text": "One sentence here. And another one."}\n{broken\n'}
    for name, content in files.items():  # written once: the markers record each input's mtime (issue 14)
        if not (d / name).exists() or (d / name).read_text(encoding="utf-8") != content:
            (d / name).write_text(content, encoding="utf-8")
    return [str(d)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("layout")
    out = root / "prep"
    run_local(_cfg(root, out))
    return out


def _cfg(root: Path, out: Path) -> PrepareConfig:
    return PrepareConfig(inputs=tuple(_inputs(root / "in")), output=str(out), tokenizer=str(BERT_TOKENIZER),
                         max_seq_len=64, dupe_factor=2)


def test_data_folders_hold_only_their_parquet_files(prepared):
    for name, schema in SCHEMAS.items():
        visible = [p.name for p in (prepared / name).iterdir() if not p.name.startswith(".")]
        assert visible and all(v.endswith(".parquet") for v in visible), (name, visible)
        assert pq.read_table(prepared / name).schema.remove_metadata() == schema  # the folder as one table
        ds = pds.dataset(prepared / name, format="parquet")
        assert ds.schema.remove_metadata() == schema and ds.count_rows() > 0
    manifest = read_manifest(str(prepared / "masked"))
    assert pq.read_table(prepared / "masked").num_rows == manifest["rows"] == 2 * read_manifest(str(prepared / "pairs"))["rows"]
    # the quarantined record and the manifest are in the hidden bookkeeping folder
    corpus = read_manifest(str(prepared / "corpus"))
    assert corpus["skipped"] == {"malformed_json": 1}
    assert (prepared / "corpus" / corpus["error_files"][0]).is_file()
    assert sorted(p.name for p in (prepared / "corpus" / ".distilflow").iterdir()) == \
        ["config.json", "done", "errors", "manifest.json"]


def test_load_dataset_by_folder_and_by_card(prepared, tmp_path):
    datasets = pytest.importorskip("datasets")
    cache = str(tmp_path / "hf-cache")
    for name in ("pairs", "masked", "corpus"):
        by_dir = datasets.load_dataset("parquet", data_dir=str(prepared / name), split="train", cache_dir=cache)
        by_card = datasets.load_dataset(str(prepared), name, split="train", cache_dir=cache)
        assert by_dir.num_rows == by_card.num_rows == read_manifest(str(prepared / name))["rows"]
        assert set(by_card.column_names) == set(SCHEMAS[name].names)
    card = (prepared / "README.md").read_text()
    assert "config_name: pairs" in card and "tokenizer" in card and "seed 0" in card
    assert f"{read_manifest(str(prepared / 'pairs'))['rows']:,}" in card


def test_duckdb_reads_the_folders(prepared):
    duckdb = pytest.importorskip("duckdb")
    for name in ("pairs", "masked", "corpus"):
        n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{prepared / name}/*.parquet')").fetchall()[0][0]
        assert n == read_manifest(str(prepared / name))["rows"]


def test_inference_style_output_folder_opens_as_one_table(tmp_path):
    """A fill-mask/qa/embed output is the folder the user named (``--output preds.parquet``): results and
    bookkeeping share it, and read_table still opens it."""
    import pyarrow as pa

    from distilflow.tasks.core.io import write_parquet
    from distilflow.tasks.infer.batch_io import open_output

    out = tmp_path / "preds.parquet"
    stage = open_output(str(out), "fill-mask", {"k": 1}, "fp")
    write_parquet(pa.table({"row_id": [0, 1]}), str(out / "in.parquet"))
    stage.write_errors("in", [{"line": 3, "reason": "bad"}])
    stage.mark_done("in", {"files": [{"file": "in.parquet", "rows": 2}]})
    stage.write_manifest(["in"])
    assert pq.read_table(out).num_rows == 2
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == ["in.parquet"]


def _to_old_layout(folder: Path) -> None:
    """What distilflow wrote before the hidden bookkeeping folder (commit 9e18364)."""
    for stage in ("corpus", "pairs", "masked"):
        meta = folder / stage / ".distilflow"
        for new, old in (("config.json", "config.json"), ("manifest.json", "manifest.json"), ("done", "_done"),
                         ("errors", "_errors"), ("counts", "_counts")):
            if (meta / new).exists():
                (meta / new).rename(folder / stage / old)
        meta.rmdir()
        for marker in (folder / stage / "_done").glob("*.json"):
            m = json.loads(marker.read_text())
            if m.get("errors_file"):
                m["errors_file"] = m["errors_file"].replace(".distilflow/errors/", "_errors/")
                marker.write_text(json.dumps(m, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    (folder / "token_counts" / "token_counts.parquet").rename(folder / "pairs" / "token_counts.parquet")
    (folder / "token_counts").rmdir()
    (folder / "README.md").unlink()


def test_old_folders_are_refused_by_readers_and_migrated_by_writers(prepared, tmp_path):
    from distilflow.tasks.train.data import load_examples

    old = tmp_path / "old"
    shutil.copytree(prepared, old)
    _to_old_layout(old)
    with pytest.raises(DataError, match="older distilflow.*rerun the same command"):
        load_examples(str(old), "pairs")
    data_mtimes = {p: p.stat().st_mtime_ns for p in old.glob("*/part-*.parquet")}
    run_local(_cfg(prepared.parent, old))
    assert {p: p.stat().st_mtime_ns for p in old.glob("*/part-*.parquet")} == data_mtimes  # nothing redone
    assert _tree(old) == _tree(prepared)  # exactly the new layout
    assert len(load_examples(str(old), "pairs")) == read_manifest(str(prepared / "pairs"))["rows"]


def test_a_stage_folder_in_use_by_another_config_is_refused(tmp_path):
    from distilflow.tasks.core.errors import ResumeError

    StageDir(str(tmp_path), "s", {"a": 1}, "f1").open()
    with pytest.raises(ResumeError, match="fields \\['a'\\] differ"):
        StageDir(str(tmp_path), "s", {"a": 2}, "f2").open()


def test_a_foreign_config_json_is_not_taken_for_an_old_layout(tmp_path):
    """An output folder the user named may hold someone else's config.json (a model's): it stays put."""
    from distilflow.tasks.core.stage import is_legacy

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text('{"model_type": "bert"}')
    assert not is_legacy(str(tmp_path / "out"))
    StageDir(str(tmp_path), "out", {"a": 1}, "f1").open()
    assert (tmp_path / "out" / "config.json").read_text() == '{"model_type": "bert"}'
    assert (tmp_path / "out" / ".distilflow" / "config.json").exists()


def test_migrating_in_place_keeps_every_file(prepared, tmp_path):
    """migrate_legacy alone (what a rerun of prepare does first; scripts/compare_with_commit.py uses it on
    data an earlier commit prepared): the old folder becomes exactly the new layout, minus the card."""
    from distilflow.tasks.core.stage import migrate_legacy
    from distilflow.tasks.train.data import load_token_weights

    old = tmp_path / "old"
    shutil.copytree(prepared, old)
    _to_old_layout(old)
    assert all(migrate_legacy(str(old / s)) for s in ("corpus", "pairs", "masked"))
    assert _tree(old) == {k: v for k, v in _tree(prepared).items() if k != "README.md"}
    assert load_token_weights(str(old), 30522, 0.7) is not None
