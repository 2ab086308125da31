"""Remote folders without a server: fsspec's ``memory://`` store stands in for a bucket (the S3 paths --
streaming multipart, aborts, bucket errors -- run against the local S3-API server in tests/ops/test_s3.py)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import fsspec
import pytest

from distilflow.tasks.core import io, remote
from distilflow.tasks.core.errors import DataError, InputError


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILFLOW_CACHE", str(tmp_path / "cache"))
    url = f"memory://bucket-{uuid.uuid4().hex[:8]}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_atomic_open_remote_publishes_only_complete_objects(bucket):
    target = io.join(bucket, "out", "a.jsonl")
    with pytest.raises(RuntimeError, match="boom"), io.atomic_open(target, "w") as f:
        f.write("half a file\n")
        raise RuntimeError("boom")
    assert not io.exists(target)
    assert fsspec.filesystem("memory").find(bucket) == [], "the temp object must be gone too"
    with io.atomic_open(target, "w") as f:
        f.write("héllo\n")
    assert io.read_bytes(target) == "héllo\n".encode()
    assert [p.rsplit("/", 1)[-1] for p in fsspec.filesystem("memory").find(bucket)] == ["a.jsonl"]


def test_upload_then_local_copy_round_trip_and_cache(bucket, tmp_path):
    src = _folder(tmp_path / "model", {"config.json": b"{}", "model.safetensors": os.urandom(3000),
                                       "tok/vocab.txt": b"[PAD]\n[UNK]\n"})
    manifest = remote.upload_folder(src, io.join(bucket, "model"))
    assert set(manifest) == {"config.json", "model.safetensors", "tok/vocab.txt"}
    assert manifest["config.json"]["sha256"] == remote.sha256_file(src / "config.json")

    copy = Path(remote.local_copy(io.join(bucket, "model")))
    for rel in manifest:
        assert (copy / rel).read_bytes() == (src / rel).read_bytes()
    assert copy == remote.cache_dir_for(io.join(bucket, "model"))
    stamps = {rel: (copy / rel).stat().st_mtime_ns for rel in manifest}

    # a second call downloads nothing ...
    assert remote.local_copy(io.join(bucket, "model")) == str(copy)
    assert {rel: (copy / rel).stat().st_mtime_ns for rel in manifest} == stamps
    # ... but never serves stale files: a changed file is fetched again, a deleted one disappears
    (src / "config.json").write_bytes(b'{"v": 2}')
    (src / "tok" / "vocab.txt").unlink()
    remote.upload_folder(src, io.join(bucket, "model"))
    remote.local_copy(io.join(bucket, "model"))
    assert (copy / "config.json").read_bytes() == b'{"v": 2}'
    assert not (copy / "tok" / "vocab.txt").exists()
    assert (copy / "model.safetensors").stat().st_mtime_ns == stamps["model.safetensors"]


def test_upload_skips_unchanged_files(bucket, tmp_path, monkeypatch):
    src = _folder(tmp_path / "f", {"a.bin": b"a" * 100, "b.bin": b"b" * 100})
    remote.upload_folder(src, io.join(bucket, "f"))
    sent = []
    real = remote.upload_file
    monkeypatch.setattr(remote, "upload_file", lambda p, u: sent.append(Path(p).name) or real(p, u))
    (src / "b.bin").write_bytes(b"B" * 100)  # same size, other bytes
    remote.upload_folder(src, io.join(bucket, "f"))
    assert sent == ["b.bin"]


def test_corrupt_remote_file_is_refused(bucket, tmp_path):
    src = _folder(tmp_path / "m", {"weights.bin": b"x" * 64})
    remote.upload_folder(src, io.join(bucket, "m"))
    io.write_bytes(io.join(bucket, "m", "weights.bin"), b"y" * 64)  # changed behind the manifest's back
    with pytest.raises(DataError, match=r"weights.bin: downloaded 64 bytes.*expected sha256"):
        remote.local_copy(io.join(bucket, "m"))
    copy = remote.cache_dir_for(io.join(bucket, "m"))
    assert not (copy / "weights.bin").exists(), "a file that failed its check is never left in the cache"
    assert not [p for p in copy.iterdir() if ".part-" in p.name]


def test_missing_file_of_the_manifest_is_refused(bucket, tmp_path):
    src = _folder(tmp_path / "m", {"a.bin": b"1", "b.bin": b"2"})
    remote.upload_folder(src, io.join(bucket, "m"))
    io.remove(io.join(bucket, "m", "b.bin"))
    with pytest.raises(DataError, match="missing from the bucket .first: b.bin"):
        remote.local_copy(io.join(bucket, "m"))


def test_local_copy_of_nothing_and_of_local_paths(bucket, tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        remote.local_copy(io.join(bucket, "nothing-here"))
    assert remote.local_copy(str(tmp_path)) == str(tmp_path)


def test_local_copy_of_a_single_file_and_folder_without_manifest(bucket):
    io.write_bytes(io.join(bucket, "plain", "data.txt"), b"hello")  # written by another tool: no manifest
    copy = Path(remote.local_copy(io.join(bucket, "plain")))
    assert (copy / "data.txt").read_bytes() == b"hello"
    single = Path(remote.local_copy(io.join(bucket, "plain", "data.txt")))
    assert single.name == "data.txt" and single.read_bytes() == b"hello"


def test_staged_output_push_pull_resume_on_a_clean_disk(bucket, tmp_path):
    url = io.join(bucket, "run")
    with remote.staged_output(url, work_dir=tmp_path / "work1") as stage:
        _folder(stage.local, {"checkpoints/step-1/model.bin": b"1" * 10})
        stage.push("checkpoints")
        entry = remote.read_manifest(url)["checkpoints/step-1/model.bin"]
        assert (entry["size"], entry["sha256"]) == (10, remote.sha256_file(stage.local / "checkpoints/step-1/model.bin"))
        _folder(stage.local, {"checkpoints/step-2/model.bin": b"2" * 10})
        (stage.local / "checkpoints/step-1/model.bin").unlink()  # keep_checkpoints pruned it
        stage.push("checkpoints")
        assert set(remote.read_manifest(url)) == {"checkpoints/step-2/model.bin"}
        _folder(stage.local, {"model/config.json": b"{}"})
    # leaving the block pushed the rest
    assert set(remote.read_manifest(url)) == {"checkpoints/step-2/model.bin", "model/config.json"}

    # the first machine is gone; another one resumes from the bucket
    fresh = remote.Staged(url, tmp_path / "work2")
    assert fresh.pull("checkpoints") is True
    assert (fresh.local / "checkpoints/step-2/model.bin").read_bytes() == b"2" * 10
    assert not (fresh.local / "model").exists(), "pull(sub) brings only that sub-folder"
    assert remote.Staged(url, tmp_path / "work3").pull("nothing") is False


def test_staged_output_local_is_the_folder_itself(tmp_path):
    with remote.staged_output(str(tmp_path / "out")) as stage:
        assert stage.local == tmp_path / "out" and not stage.remote
        stage.push()
        assert stage.pull() is True
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("exc, words", [
    (FileNotFoundError("An error occurred (NoSuchBucket) when calling the PutObject operation"), "does not exist"),
    (PermissionError("Access Denied"), "access denied"),
    (OSError("An error occurred (AccessDenied) when calling the ListObjectsV2 operation: Forbidden"),
     "access denied"),
    (OSError("Unable to locate credentials"), "no credentials"),
])
def test_storage_errors_are_one_line_naming_the_url(exc, words):
    err = io.storage_error("s3://b/run", exc)
    assert err is not None and str(err).startswith("s3://b/run: ") and words in str(err) and "\n" not in str(err)


def test_other_errors_keep_their_traceback():
    assert io.storage_error("s3://b/run", OSError("connection reset by peer")) is None
    with pytest.raises(OSError, match="reset"), io.remote_errors("s3://b/run"):
        raise OSError("connection reset by peer")


def test_local_model_maps_urls_to_the_cache_and_leaves_paths(bucket, tmp_path):
    from distilflow.tasks.core.hf import local_model

    src = _folder(tmp_path / "m", {"config.json": b"{}"})
    remote.upload_folder(src, io.join(bucket, "m"))
    assert local_model(io.join(bucket, "m")) == str(remote.cache_dir_for(io.join(bucket, "m")))
    assert local_model(str(src)) == str(src)
    assert local_model("bert-base-uncased") == "bert-base-uncased"


def test_an_interrupted_upload_leaves_a_readable_folder(bucket, tmp_path, monkeypatch):
    """Killed after the new manifest but before old files were deleted, or after a file was replaced but
    before the manifest: the folder still reads back (no false corruption error)."""
    url = io.join(bucket, "run")
    src = _folder(tmp_path / "run", {"ckpt/step-1/w.bin": b"1" * 8, "metrics.jsonl": b"a\n"})
    remote.upload_folder(src, url)
    (src / "ckpt/step-1/w.bin").unlink()
    _folder(src, {"ckpt/step-2/w.bin": b"2" * 8})
    monkeypatch.setattr(io, "remove", lambda u: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        remote.upload_folder(src, url)
    monkeypatch.undo()
    copy = Path(remote.local_copy(url, cache=tmp_path / "c1"))
    assert (copy / "ckpt/step-2/w.bin").read_bytes() == b"2" * 8

    # an object replaced after its manifest entry (killed before the manifest write) is checked by size
    fs = fsspec.filesystem("memory")
    manifest = remote.read_manifest(url)
    manifest["metrics.jsonl"]["etag"] = "an-older-version"
    io.write_json(io.join(url, remote.MANIFEST), {"files": manifest})
    io.write_bytes(io.join(url, "metrics.jsonl"), b"b\n")
    assert fs.exists(url.removeprefix("memory://") + "/metrics.jsonl")
    copy = Path(remote.local_copy(url, cache=tmp_path / "c2"))
    assert (copy / "metrics.jsonl").read_bytes() == b"b\n"


def test_an_object_replaced_while_it_is_read_is_read_again(monkeypatch, tmp_path):
    """s3fs raises FileExpired when another writer replaced the object between its look-up and the read
    (seen while a test polled a training run's manifest): the reader reads the new version."""
    import fsspec
    from s3fs.utils import FileExpired

    from distilflow.tasks.core import io as dio

    f = tmp_path / "manifest.json"
    f.write_bytes(b'{"files": {}}\n')
    real, calls = fsspec.open, []

    def replaced_once(url, mode="rb", **kw):
        calls.append(url)
        if len(calls) == 1:
            raise FileExpired(url, '"etag-of-the-old-version"')
        return real(url, mode, **kw)

    monkeypatch.setattr(dio.fsspec, "open", replaced_once)
    assert dio.read_json(str(f)) == {"files": {}} and len(calls) == 2
    calls.clear()
    monkeypatch.setattr(dio.fsspec, "open", lambda url, mode="rb", **kw: (_ for _ in ()).throw(FileExpired(url, "e")))
    with pytest.raises(FileExpired):  # replaced on every look: not hidden forever
        dio.read_bytes(str(f))
