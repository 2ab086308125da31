"""Errors inside a run reach the command line's one error boundary: one line, exit 2, no traceback, and
nothing written that would make the corrected rerun refuse (issue 14 item 5). In-process ``main([...])``;
these are all found before a flow run starts, so no Prefect server is needed."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from distilflow.cli import main
from tests.conftest import BERT_TOKENIZER


@pytest.fixture(autouse=True)
def _no_server(monkeypatch):
    monkeypatch.setenv("DISTILFLOW_TEMP_SERVER", "0")  # a flow would start Prefect's own; none should run


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    from tests.infer.test_fill_mask import save_tiny_mlm

    return save_tiny_mlm(tmp_path_factory.mktemp("model"), "bert", BERT_TOKENIZER)


@pytest.fixture
def query(tmp_path) -> str:
    (tmp_path / "q.txt").write_text("Paris is the [MASK] of France.\n")
    return str(tmp_path / "q.txt")


def _one_line_error(capsys, code: int, *expected: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("distilflow ") and ": error: " in lines[0], err
    for e in expected:
        assert e in lines[0], err
    return lines[0]


def test_output_path_is_a_file(tmp_path, capsys, model, query):
    (tmp_path / "out").write_text("a file\n")
    _one_line_error(capsys, main(["fill-mask", "--input", query, "--output", str(tmp_path / "out"), "--model", model]),
                    "a file is in the way", str(tmp_path / "out"))
    _one_line_error(capsys, main(["prepare", "--input", query, "--output", str(tmp_path / "out" / "sub"),
                                  "--tokenizer", str(BERT_TOKENIZER)]), "a file is in the way")
    assert (tmp_path / "out").read_text() == "a file\n"


@contextlib.contextmanager
def read_only_folder(tmp_path: Path):
    """A folder this process cannot write: a read-only tmpfs for root (who ignores file modes), else 0555."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        try:
            yield d
        finally:
            d.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("running as root without permission to mount a read-only tmpfs")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


def test_read_only_output_folder(tmp_path, capsys, model, query):
    with read_only_folder(tmp_path) as ro:
        _one_line_error(capsys, main(["fill-mask", "--input", query, "--output", str(ro / "preds"), "--model", model]),
                        "cannot write there", "--output")
        _one_line_error(capsys, main(["prepare", "--input", query, "--output", str(ro), "--tokenizer",
                                      str(BERT_TOKENIZER)]), "cannot write there")
        # the lock is where a run inside the flow meets it first (a deployment: no command line)
        from distilflow.tasks.core import lock
        from distilflow.tasks.core.errors import InputError

        with pytest.raises(InputError, match="cannot write there"), lock.hold(str(ro / "preds"), "fill-mask"):
            pass


def test_corrupt_tokenizer_json(tmp_path, capsys, model, query):
    tok = tmp_path / "tok"
    shutil.copytree(BERT_TOKENIZER, tok)
    (tok / "tokenizer.json").write_text('{"broken')
    _one_line_error(capsys, main(["prepare", "--input", query, "--output", str(tmp_path / "p"), "--tokenizer", str(tok)]),
                    "tokenizer.json: not a valid tokenizer file", "re-save it")
    bad_model = tmp_path / "m"
    shutil.copytree(model, bad_model)
    (bad_model / "tokenizer.json").write_text('{"broken')
    _one_line_error(capsys, main(["fill-mask", "--input", query, "--output", str(tmp_path / "o"), "--model",
                                  str(bad_model)]), "tokenizer.json: not a valid tokenizer file")
    assert not (tmp_path / "p").exists() and not (tmp_path / "o").exists()


def test_top_k_zero(tmp_path, capsys, model, query):
    _one_line_error(capsys, main(["fill-mask", "--input", query, "--output", str(tmp_path / "o"), "--model", model,
                                  "--top-k", "0"]), "top_k", ">= 1")


def test_model_path_that_does_not_exist_and_no_poisoned_output(tmp_path, capsys, query):
    missing = tmp_path / "studnt"
    for workers in ("1", "2"):  # in-process jobs preload the model, worker runs check it first too
        _one_line_error(capsys, main(["fill-mask", "--input", query, "--output", str(tmp_path / "o"), "--model",
                                      str(missing), "--workers", workers]), "no such model folder", str(missing))
    assert not (tmp_path / "o").exists()  # nothing that would make the corrected rerun refuse


def test_pickle_only_model_is_refused(tmp_path, capsys, query, model):
    m = tmp_path / "pickled"
    m.mkdir()
    shutil.copy(Path(model) / "config.json", m)
    (m / "pytorch_model.bin").write_bytes(b"not loaded")
    _one_line_error(capsys, main(["fill-mask", "--input", query, "--output", str(tmp_path / "o"), "--model", str(m)]),
                    "pickle weights only", "save_pretrained")
