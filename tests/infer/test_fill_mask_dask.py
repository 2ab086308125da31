"""fill-mask on a Dask cluster (prefect-dask, 2 worker processes) gives the same output as locally."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from tests.infer.test_fill_mask import save_tiny_mlm


@pytest.mark.integration  # starts a local Dask cluster
def test_fill_mask_on_dask_matches_local(prefect_test_harness_session, tmp_path, bert_tokenizer_path):
    from distilflow.flows.inference import fill_mask_flow

    model = save_tiny_mlm(tmp_path / "model", "bert", bert_tokenizer_path)
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.txt").write_text("Paris is the [MASK] of France.\nNo mask here.\nThe [MASK] sat on the [mask].\n")
    (inputs / "b.jsonl").write_text('{"text": "A [MASK] day."}\n{"text": "It was [MASK] and [MASK]."}\n')
    local = fill_mask_flow(input=str(inputs), output=str(tmp_path / "local"), model=model, top_k=3)
    dask = fill_mask_flow(input=str(inputs), output=str(tmp_path / "dask"), model=model, top_k=3, dask_workers=2)
    assert local["rows"] == dask["rows"] > 0
    for name in ("a.parquet", "b.parquet"):
        a, b = pq.read_table(tmp_path / "local" / name), pq.read_table(tmp_path / "dask" / name)
        assert a.num_rows > 0 and a.equals(b)
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "dask" / name).read_bytes()
