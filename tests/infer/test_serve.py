"""``distilflow serve``: the catalogue's request shapes at POST /score, answers equal to the batch jobs', 4xx for
bad requests (in-process app), and a real server under bounded concurrent load (integration)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from distilflow.tasks.infer.config import FillMaskConfig, QAConfig, ServeConfig
from distilflow.tasks.infer.fill_mask import FillMasker
from distilflow.tasks.infer.qa import QuestionAnswerer
from distilflow.tasks.infer.serve import create_app, resolve_task
from tests.infer.test_fill_mask import assert_same, gutenberg_texts, save_tiny_mlm

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mlm(tmp_path_factory, bert_tokenizer_path) -> str:
    return save_tiny_mlm(tmp_path_factory.mktemp("serve-mlm"), "distilbert", bert_tokenizer_path)


def test_fill_mask_shapes_answer_as_the_batch_job(mlm):
    texts = gutenberg_texts(12, seed=11)
    ref = FillMasker(FillMaskConfig(model=mlm, device="cpu", format="json"))(texts)
    cfg = ServeConfig(model=mlm, device="cpu", max_wait_ms=20)
    assert resolve_task(cfg) == "fill-mask"
    with TestClient(create_app(cfg)) as client:
        for body in ({"input_data": texts}, {"inputs": {"input_string": texts}},
                     {"input_data": {"columns": ["text"], "data": [[t] for t in texts]}}):
            r = client.post("/score", json=body)
            assert r.status_code == 200, r.text
            for got, want in zip(r.json(), ref, strict=True):
                assert_same(got, want)
        one = client.post("/score", json={"inputs": texts[0]})
        assert_same(one.json()[0], ref[0])
        assert client.get("/health").json()["task"] == "fill-mask"


@pytest.mark.parametrize("body, status, words", [
    (b"not json", 400, "not JSON"),
    (b'{"foo": 1}', 400, "input_data"),
    (b'{"input_data": []}', 400, "no inputs"),
    (b'{"input_data": ["a text without the blank"]}', 400, "[MASK]"),
    (b'{"input_data": [42]}', 400, "not_a_string"),
])
def test_bad_requests_get_400_with_the_fix(mlm, body, status, words):
    with TestClient(create_app(ServeConfig(model=mlm, device="cpu"))) as client:
        r = client.post("/score", content=body)
        assert r.status_code == status and words in r.json()["error"], r.text


def test_qa_card_sample_answers_a_list_of_strings(tmp_path, bert_tokenizer_path):
    from tests.infer.test_qa_embed import save_tiny_qa

    qa = save_tiny_qa(tmp_path / "qa", "distilbert", bert_tokenizer_path)
    sample = {"question": "What's my name?", "context": "My name is John and I live in Seattle"}
    want = QuestionAnswerer(QAConfig(model=qa, device="cpu"))
    from distilflow.tasks.infer.batch_io import InputRow

    ref = want.process([InputRow(0, None, sample)]).json_items[0][1]["answer"]
    cfg = ServeConfig(model=qa, device="cpu")
    assert resolve_task(cfg) == "qa"
    with TestClient(create_app(cfg)) as client:
        r = client.post("/score", json=sample)
        assert r.status_code == 200 and r.json() == [ref] and ref in sample["context"]
        two = client.post("/score", json={"inputs": {"question": [sample["question"]] * 2,
                                                     "context": [sample["context"]] * 2}})
        assert two.json() == [ref, ref]


@pytest.mark.integration
def test_real_server_under_concurrent_load(mlm):
    """200 requests, 16 at a time, through a real HTTP client: every answer equals the batch job's, and
    concurrent requests were scored together (fewer forward windows than requests)."""
    spec = importlib.util.spec_from_file_location("bench_serve", REPO / "scripts" / "bench_serve.py")
    bench = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(bench)  # type: ignore[union-attr]
    texts = gutenberg_texts(200, seed=13)
    port = bench.free_port()
    server = bench.start_server(mlm, port, "--device", "cpu", "--max-wait-ms", "10")
    try:
        import httpx

        answers, latencies, _ = bench.load(f"http://127.0.0.1:{port}/score", [{"input_data": [t]} for t in texts], 16)
        windows = httpx.get(f"http://127.0.0.1:{port}/health").json()["batches"]
        bad = httpx.post(f"http://127.0.0.1:{port}/score", content=b"{")
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert bad.status_code == 400
    ref = FillMasker(FillMaskConfig(model=mlm, device="cpu", format="json"))(texts)
    for a, r in zip(answers, ref, strict=True):
        assert_same(a[0], r)
    assert windows < len(texts), "concurrent requests should share forward passes"
    assert len(latencies) == 200 and json.dumps(answers)
