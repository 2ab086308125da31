"""Shared fixtures: paths to ../shared/data, a tiny Prefect setup, markers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DISTILFLOW_PROGRESS", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DISTILFLOW_SHARED", REPO.parent / "shared" / "data"))
BERT_TOKENIZER = SHARED / "tokenizers" / "bert-base-uncased"
GUTENBERG = SHARED / "corpus" / "gutenberg"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bert_tokenizer_path() -> Path:
    if not (BERT_TOKENIZER / "tokenizer.json").exists():
        pytest.fail(f"shared tokenizer missing at {BERT_TOKENIZER}; CI needs ../shared beside the repo")
    return BERT_TOKENIZER


@pytest.fixture(scope="session")
def bert_tokenizer(bert_tokenizer_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bert_tokenizer_path))


@pytest.fixture(scope="session")
def prefect_test_harness_session():
    """One temporary Prefect server (SQLite) for the whole test session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
