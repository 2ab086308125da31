"""State you can trust across reruns and bad files (issue 14), without Prefect: nothing stale, no binary
data in any output, every input record accounted for, one run per output folder."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from distilflow.tasks.core import lock
from distilflow.tasks.core.errors import ResumeError
from distilflow.tasks.core.io import expand_inputs, file_identity, folder_identity, same_file
from distilflow.tasks.core.readers import BadRecord, binary_reason, iter_records
from distilflow.tasks.core.stage import StageDir, read_manifest, remove_stale_temp_files
from distilflow.tasks.prepare.config import PrepareConfig
from distilflow.tasks.prepare.job import run_local
from tests.conftest import BERT_TOKENIZER, GUTENBERG

TEXT = (GUTENBERG / "pg11.txt").read_text(encoding="utf-8")


def _cfg(inputs: list[Path], out: Path, **kw) -> PrepareConfig:
    return PrepareConfig(inputs=tuple(str(i) for i in inputs), output=str(out), tokenizer=str(BERT_TOKENIZER),
                         max_seq_len=64, **kw)


def _data(root: Path) -> dict[str, bytes]:
    """The Parquet data files under root (what a reader sees)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet"))
            if ".distilflow" not in p.parts}


def _sentences(out: Path) -> list[str]:
    return [s for doc in pq.read_table(out / "corpus").column("sentences").to_pylist() for s in doc]


def png_bytes(seed: int = 0) -> bytes:
    img = Image.new("RGB", (64, 48), (seed % 256, 120, 200))
    for x in range(64):
        img.putpixel((x, x % 48), (x * 4 % 256, 0, 255 - x))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# -- 1. nothing stale ----------------------------------------------------------------------------------------
def test_a_grown_input_reruns_its_units_and_what_depends_on_them_only(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for i, name in enumerate(("a.txt", "b.txt", "c.txt")):
        (d / name).write_text(TEXT[i * 15000:(i + 1) * 15000], encoding="utf-8")
    out = tmp_path / "out"
    run_local(_cfg([d], out))
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/part-*.parquet")}

    # touched but unchanged (a re-download, `cp` without -p): nothing is redone
    st = (d / "a.txt").stat()
    os.utime(d / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    run_local(_cfg([d], out))
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/part-*.parquet")} == before

    with open(d / "c.txt", "a", encoding="utf-8") as f:  # the landing file grows
        f.write("\n\nZebras quietly juggled seventeen marmalade teapots. Nobody minded at all.\n")
    manifests = run_local(_cfg([d], out))
    assert "Zebras quietly juggled seventeen marmalade teapots." in _sentences(out)
    assert manifests["corpus"]["inputs"]["00002"]["input"]["size"] == (d / "c.txt").stat().st_size
    after = {p: p.stat().st_mtime_ns for p in out.glob("*/part-*.parquet")}
    redone = sorted(str(p.relative_to(out)) for p in after if after[p] != before.get(p))
    # c's corpus part, its pairs and its masks; b's pairs may borrow random B documents from c's part (its
    # neighbour), so they are redone -- into the same bytes, so b's masks are not; nothing of a's
    assert redone == ["corpus/part-00002-0000.parquet", "masked/part-00002-0000.parquet",
                      "pairs/part-00001-0000.parquet", "pairs/part-00002-0000.parquet"]
    pair_ids = pq.read_table(out / "pairs" / "part-00002-0000.parquet").column("input_ids").to_pylist()
    zebra = 29145  # "zebra" in bert-base-uncased
    assert any(zebra in row for row in pair_ids)
    clean = tmp_path / "clean"
    run_local(_cfg([d], clean))
    assert _data(out) == _data(clean)  # as if the grown file had been there from the start


def test_an_input_that_shrank_leaves_no_stale_part(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text(TEXT[:20000], encoding="utf-8")
    out = tmp_path / "out"
    run_local(_cfg([src], out, part_bytes=4096))
    assert len(list((out / "corpus").glob("*.parquet"))) >= 3
    src.write_text(TEXT[:3000], encoding="utf-8")
    run_local(_cfg([src], out, part_bytes=4096))
    clean = tmp_path / "clean"
    run_local(_cfg([src], clean, part_bytes=4096))
    assert _data(out) == _data(clean)
    assert sorted(f["file"] for f in read_manifest(str(out / "pairs"))["files"]) == sorted(
        p.name for p in (out / "pairs").glob("*.parquet"))


def test_file_identity_sees_appends_rewrites_and_touches(tmp_path):
    from distilflow.tasks.core.io import content_identity

    f = tmp_path / "big.txt"
    f.write_bytes(b"x" * (3 << 20))  # larger than both hashed ends together
    a = content_identity(file_identity(str(f)))  # what a unit records before it reads the file
    time.sleep(0.01)
    with open(f, "r+b") as h:  # same size, a byte changed in the middle: the mtime tells, the content decides
        h.seek(3 << 19)  # 1.5 MiB: between the hashed first and last MiB
        h.write(b"y")
    b = file_identity(str(f))
    assert a["size"] == b["size"] and a["sample"] == b["sample"] and a["mtime"] != b["mtime"]
    assert not same_file(a, b)
    full_b = content_identity(b)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same content, other mtime
    assert same_file(full_b, file_identity(str(f)))
    with open(f, "ab") as h:
        h.write(b"more")
    assert not same_file(full_b, file_identity(str(f)))


def test_model_replaced_in_place_reruns_fill_mask_with_the_new_weights(tmp_path, bert_tokenizer_path):
    from distilflow.tasks.infer import batch_io
    from distilflow.tasks.infer.config import FillMaskConfig, load_job
    from tests.infer.test_fill_mask import save_tiny_mlm

    model = tmp_path / "model"
    save_tiny_mlm(model, "bert", bert_tokenizer_path, seed=0)
    (tmp_path / "q.txt").write_text("Paris is the [MASK] of France.\nThe [MASK] sat on the mat.\n")
    record = FillMaskConfig(model=str(model), top_k=3).to_dict()
    stage = batch_io.open_output(str(tmp_path / "out"), "fill-mask", record, "fp")

    def run() -> dict:
        ident = folder_identity(str(model))
        batch_io.forget_stale_model("fill-mask", str(model), ident)
        _cfg_, job = load_job("fill-mask", record)
        return batch_io.run_file(job, stage, str(tmp_path / "q.txt"), "q", model=ident)

    first = run()
    answers = pq.read_table(tmp_path / "out" / "q.parquet").column("token").to_pylist()
    assert run().get("skipped_done")  # same model, same input: nothing redone
    save_tiny_mlm(model, "bert", bert_tokenizer_path, seed=1)  # new weights, same folder, same sizes
    second = run()
    assert not second.get("skipped_done") and second["deps"]["model"] != first["deps"]["model"]
    assert pq.read_table(tmp_path / "out" / "q.parquet").column("token").to_pylist() != answers


# -- 2. binary files never become training data ------------------------------------------------------------
def test_binary_detection_on_content():
    png = png_bytes()
    assert "NUL" in binary_reason(png)
    assert binary_reason(gzip.compress(png)) is not None
    assert binary_reason(bytes(range(1, 32)) * 200) is not None  # control bytes, no NUL
    assert binary_reason(os.urandom(4096).replace(b"\x00", b"\x01")) is not None  # not UTF-8
    assert "UTF-16" in binary_reason("Hello there.\n".encode("utf-16"))
    assert binary_reason(TEXT[:8192].encode()) is None
    latin1 = "L'\xe9t\xe9 dernier, nous sommes all\xe9s \xe0 la mer pr\xe8s de N\xeemes.\n".encode("latin-1")
    assert binary_reason(latin1 * 100) is None  # 11% not UTF-8: still text (its lines are quarantined)
    assert binary_reason("Grüße aus Köln – “quoted” ✓\n".encode() * 400) is None  # UTF-8, cut mid-character


@pytest.fixture
def binaries(tmp_path) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    png = png_bytes()
    (d / "image.png").write_bytes(png)
    (d / "image_renamed.txt").write_bytes(png)
    (d / "image.txt.gz").write_bytes(gzip.compress(png))  # a gzip-compressed binary behind a text name
    (d / "blob.jsonl.gz").write_bytes(gzip.compress(os.urandom(20000)))
    (d / "table.csv").write_bytes(png)
    return d


def test_binary_files_are_one_quarantine_record_each(binaries):
    for f in sorted(binaries.iterdir()):
        recs = list(iter_records(str(f)))
        assert len(recs) == 1 and isinstance(recs[0], BadRecord) and recs[0].reason == "binary_file", (f, recs)
        assert "not a UTF-8 text file" in recs[0].message()


def test_binary_files_reach_no_output(binaries, tmp_path):
    (binaries / "good.txt").write_text(TEXT[:8000], encoding="utf-8")
    out = tmp_path / "out"
    m = run_local(_cfg([binaries], out))
    corpus = m["corpus"]
    assert corpus["skipped"] == {"binary_file": 5}
    sources = set(pq.read_table(out / "corpus").column("source").to_pylist())
    assert sources == {str(binaries / "good.txt")}
    assert set(pq.read_table(out / "pairs").column("doc_id").to_pylist()) <= {
        d for d in pq.read_table(out / "corpus").column("doc_id").to_pylist()}
    entries = [json.loads(line) for f in corpus["error_files"]
               for line in (out / "corpus" / f).read_text().splitlines()]
    assert sorted(Path(e["file"]).name for e in entries) == sorted(p.name for p in binaries.iterdir()
                                                                   if p.name != "good.txt")
    assert all(e["reason"] == "binary_file" and "fix:" in e["message"] and e["line"] is None for e in entries)


# -- 6. every input record accounted for -------------------------------------------------------------------
@pytest.fixture
def mixed(tmp_path) -> Path:
    """Good and bad records in every format, with the counts they must give."""
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "a.txt").write_bytes(b"First doc. It has [MASK] words.\n\nSecond doc \xff\xfe here.\n\n"
                              b"Third [MASK] doc.\n")
    (d / "b.jsonl").write_text('{"text": "A [MASK] row."}\n{broken\n{"body": 1}\n{"text": 5}\n'
                               '{"text": "Another [MASK] row."}\n', encoding="utf-8")
    (d / "c.jsonl.gz").write_bytes(gzip.compress(b'{"text": "Zipped [MASK] row."}\n{"text": null}\n'))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerows([["id", "text"], ["1", "A [MASK] csv row."], ["2"], ["3", "Last [MASK] csv row."]])
    (d / "d.csv").write_text(buf.getvalue(), encoding="utf-8")
    (d / "e.csv.gz").write_bytes(gzip.compress(buf.getvalue().encode()))
    pq.write_table(pa.table({"text": ["Parquet [MASK] row.", None, "No mask in this one."]}), d / "f.parquet")
    (d / "g.txt").write_bytes(png_bytes())
    (d / "h.txt").write_bytes(b"")
    (d / "i.txt.gz").write_bytes(gzip.compress(b"Truncated [MASK] text.\n" * 50)[:-20])
    return d


def _balanced(acc: dict) -> None:
    assert acc["balanced"], acc
    assert acc["read"] == acc["written"] + acc["quarantined"]
    assert acc["errors_entries"] == acc["by_reason"]


def test_prepare_manifest_accounts_for_every_record(mixed, tmp_path):
    m = run_local(_cfg([mixed], tmp_path / "out"))["corpus"]
    acc = m["accounting"]
    _balanced(acc)
    assert acc["by_reason"] == {"binary_file": 1, "empty_file": 1, "invalid_utf8": 1, "malformed_json": 1,
                                "missing_field": 1, "not_a_string": 2, "null_text": 3, "unreadable_file": 1}
    # documents: a.txt 3, b.jsonl 2, c 1, d/e 2+2, f.parquet 2, i.txt.gz the lines before the damage (1 doc)
    # documents: a.txt 2 (its second is one bad line), b.jsonl 2, c.jsonl.gz 1, d.csv and e.csv.gz 2 each,
    # f.parquet 2; the truncated gzip fails on its first read (one unreadable_file record)
    assert acc["written"] == m["rows"] == 11
    assert acc["read"] == 11 + 11


@pytest.mark.parametrize("job_name", ["fill-mask", "embed"])
def test_inference_manifest_accounts_for_every_row(mixed, tmp_path, bert_tokenizer_path, job_name):
    from distilflow.tasks.infer import batch_io
    from distilflow.tasks.infer.config import EmbedConfig, FillMaskConfig, load_job
    from tests.infer.test_fill_mask import save_tiny_mlm

    model = save_tiny_mlm(tmp_path / "model", "bert", bert_tokenizer_path)
    record = (FillMaskConfig(model=model, top_k=2) if job_name == "fill-mask" else EmbedConfig(model=model)).to_dict()
    _cfg_, job = load_job(job_name, record)
    stage = batch_io.open_output(str(tmp_path / "out"), job_name, record, "fp")
    units = batch_io.plan_units(expand_inputs([str(mixed)]))
    for url, key in units:
        batch_io.run_file(job, stage, url, key)
    acc = batch_io.write_run_manifest(stage, [k for _, k in units])["accounting"]
    _balanced(acc)
    # one row per text line (a.txt's blank lines are empty_text rows), JSONL line, CSV row, Parquet row;
    # "No mask in this one." is a fill-mask error (no_mask) and an embedding like any other row
    no_mask = {"no_mask": 1} if job_name == "fill-mask" else {}
    assert acc["by_reason"] == {"binary_file": 1, "empty_file": 1, "empty_text": 2, "invalid_utf8": 1,
                                "malformed_json": 1, "missing_field": 1, "not_a_string": 2, "null_text": 3,
                                "unreadable_file": 1, **no_mask}
    written = 10 if job_name == "fill-mask" else 11
    assert acc["written"] == written and acc["read"] == written + sum(acc["by_reason"].values()) == 24


# -- 3. one run per output folder --------------------------------------------------------------------------
HOLD = """
import sys, time
from distilflow.tasks.core import lock
with lock.hold(sys.argv[1], "prepare"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(path: Path, seconds: float) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def test_a_second_run_refuses_naming_the_holder_and_a_killed_holder_is_taken_over(tmp_path):
    out = tmp_path / "out"
    p = _holder(out, 60)
    try:
        refused = rf"in use by another distilflow run \(prepare, pid {p.pid} on .*started .* UTC\); wait for it"
        with pytest.raises(ResumeError, match=refused + " to finish, or use another --output"), \
                lock.hold(str(out), "fill-mask"):
            pass
    finally:
        p.kill()  # SIGKILL: no clean-up, the lock file stays behind
        p.wait()
    assert (out / ".distilflow" / "lock").exists()
    with lock.hold(str(out), "prepare"):  # the kernel released the dead holder's lock
        assert json.loads((out / ".distilflow" / "lock").read_text())["pid"] == os.getpid()
        with lock.hold(str(out), "nested"):  # re-entrant in one process
            pass
        assert lock.is_held(str(out))
    assert not (out / ".distilflow").exists()  # nothing left behind in a folder that holds nothing else


def test_overwrite_keeps_the_lock_of_the_run_that_overwrites(tmp_path):
    out = tmp_path / "out"
    with lock.hold(str(out), "fill-mask"):
        StageDir(str(tmp_path), "out", {"a": 1}, "f1").open()
        (out / "old.parquet").write_bytes(b"x")
        StageDir(str(tmp_path), "out", {"a": 2}, "f2").open(overwrite=True)
        assert not (out / "old.parquet").exists() and (out / ".distilflow" / "lock").exists()
        p = subprocess.run([sys.executable, "-c", HOLD, str(out), "0"], capture_output=True, text=True)
        assert p.returncode != 0 and "in use by another distilflow run (fill-mask" in p.stderr


def test_object_store_lease_refuses_a_live_holder_and_takes_over_an_expired_one():
    url = f"memory://lease-{os.getpid()}-{time.time_ns()}/out"
    from distilflow.tasks.core.io import write_json

    lease = f"{url}/.distilflow/lock.json"
    write_json(lease, {"pid": 1, "host": "elsewhere", "what": "prepare", "started": "then", "token": "other",
                       "expires": time.time() + 30})
    with pytest.raises(ResumeError, match="pid 1 on elsewhere.*lease expires at"), lock.hold(url, "prepare"):
        pass
    write_json(lease, {"pid": 1, "host": "elsewhere", "token": "other", "expires": time.time() - 1})
    with lock.hold(url, "prepare", ttl=0.3):
        time.sleep(0.5)  # refreshed while held: never expires under a live run
        from distilflow.tasks.core.io import read_json

        rec = read_json(lease)
        assert rec["pid"] == os.getpid() and rec["expires"] > time.time()
    from distilflow.tasks.core.io import exists

    assert not exists(lease)


def test_two_concurrent_prepare_runs_on_one_output(tmp_path):
    """Two runs started together on one --output: one refuses with the holder's line, the other's output
    is exactly a clean run's."""
    d = tmp_path / "in"
    d.mkdir()
    for i in range(4):
        (d / f"p{i}.txt").write_text(TEXT[i * 10000:(i + 1) * 10000], encoding="utf-8")
    out = tmp_path / "out"
    code = ("import sys; from distilflow.tasks.prepare.job import run_local; "
            "from distilflow.tasks.prepare.config import PrepareConfig; "
            f"run_local(PrepareConfig(inputs=({str(d)!r},), output={str(out)!r}, tokenizer={str(BERT_TOKENIZER)!r}, "
            "max_seq_len=64))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 1], results
    refused = next(err for rc, err in results if rc)
    assert "ResumeError" in refused and "is in use by another distilflow run (prepare, pid" in refused
    clean = tmp_path / "clean"
    run_local(_cfg([d], clean))
    assert _data(out) == _data(clean)


def test_stale_temp_cleanup_never_deletes_a_live_writers_file(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        (tmp_path / f".part.parquet.tmp-{live.pid}-abcd1234").write_bytes(b"in flight")
        (tmp_path / f".part.parquet.tmp-{dead.pid}-abcd1234").write_bytes(b"left by a killed run")
        assert remove_stale_temp_files(str(tmp_path)) == 1
        assert [p.name for p in tmp_path.iterdir()] == [f".part.parquet.tmp-{live.pid}-abcd1234"]
    finally:
        live.kill()
        live.wait()


# -- 5. a bracket in a file name is a file, not a glob ---------------------------------------------------------
def test_a_bracket_in_an_existing_file_name_is_that_file(tmp_path):
    f = tmp_path / "notes[v2].txt"
    f.write_text("Hello there.\n")
    (tmp_path / "notesv.txt").write_text("a glob would match this\n")
    assert expand_inputs([str(f)]) == [str(f)]
    assert expand_inputs([str(tmp_path / "notes[v].txt")]) == [str(tmp_path / "notesv.txt")]  # a real glob
