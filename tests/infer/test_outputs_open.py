"""``--output preds.parquet`` (issue 13's note): the output folder of fill-mask/qa/embed, whatever its name,
opens as one table with the tools users read Parquet with -- the bookkeeping is hidden, the data files are
the only files a reader finds."""

from __future__ import annotations

import pyarrow.dataset as ds
import pyarrow.parquet as pq

from distilflow.tasks.infer.batch_io import open_output, run_file, write_run_manifest
from tests.infer.test_batch_io import CharCountJob


def test_output_named_like_a_file_opens_as_one_table(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\nBAD row\n")
    (tmp_path / "b.jsonl").write_text('{"text": "three"}\n{"text": "four"}\n')
    out = tmp_path / "preds.parquet"
    stage = open_output(str(out), "count", {"v": 1}, "fp1")
    keys = []
    for name in ("a.txt", "b.jsonl"):
        key = name.split(".")[0]
        run_file(CharCountJob(), stage, str(tmp_path / name), key)
        keys.append(key)
    write_run_manifest(stage, keys)  # bookkeeping (config, markers, errors, manifest) is in the folder too

    table = pq.read_table(out)
    assert sorted(table.column("chars").to_pylist()) == sorted(len(t) for t in ("one", "two", "three", "four"))
    assert ds.dataset(out, format="parquet").to_table().num_rows == 4
    import datasets

    loaded = datasets.load_dataset("parquet", data_dir=str(out), split="train")
    assert len(loaded) == 4 and set(loaded.column_names) == {"row_id", "chars"}
