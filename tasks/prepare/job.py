"""The prepare job around its units of work: planning, tokenizer copy, stage reports. No Prefect here.

``flows/prepare.py`` only submits the units these functions plan (one Prefect task each) and publishes the
reports they render; everything a stage decides -- which units exist, which folder and record it writes,
what its report says -- is here, unit-tested without Prefect.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from distilflow.tasks.core import remote
from distilflow.tasks.core.errors import InputError, ResumeError
from distilflow.tasks.core.io import (
    exists,
    expand_inputs,
    file_identity,
    is_local,
    join,
    read_json,
    sha256_file,
)
from distilflow.tasks.core.lock import hold
from distilflow.tasks.core.stage import StageDir, complete_deps, read_manifest, token_counts_url
from distilflow.tasks.prepare.config import (
    MaskOptions,
    PairsOptions,
    ShardOptions,
    mask_record,
    pairs_record,
    shard_record,
)


@dataclass
class StagePlan:
    """One stage of a run: its opened output folder, the stage record, and its units (key -> arguments of
    the unit function after ``stage, record``), with each unit's size for the progress bar."""

    stage: StageDir
    record: Any
    units: dict[str, tuple[Any, ...]]
    sizes: dict[str, float] = field(default_factory=dict)
    unit: str = "MB"  # what ``sizes`` count (the progress bar's rate: MB/s or tokens/s)
    tokenizer: str = ""  # local tokenizer folder the units load (pairs, mask)
    # what each unit's output is made from (input file identity, upstream part sha256): a unit is done only
    # when its marker records the same; stale units lose their outputs and run again (tasks/core/stage.py)
    deps: dict[str, dict[str, Any]] = field(default_factory=dict)

    def pending(self) -> list[str]:
        if not self.deps:
            return [k for k in self.units if not self.stage.is_done(k)]
        return self.stage.pending({k: self.deps[k] for k in self.units})

    def run_unit(self, key: str, fn: Any, *args: Any) -> dict[str, Any]:
        """``fn(*args)`` (writes the unit's outputs, then its marker) with the stage argument replaced by
        one whose marker records the unit's deps (inputs' content hashes taken before they are read)."""
        if key in self.deps:
            unit = self.stage.for_unit(key, complete_deps(self.deps[key]))
            args = tuple(unit if a is self.stage else a for a in args)
        return fn(*args)


# -- tokenizer ---------------------------------------------------------------------------------------------
def local_tokenizer(url: str) -> str:
    """Tokenizers load from local folders: a remote ``DIR/tokenizer`` is mirrored into the verified cache
    (:func:`~distilflow.tasks.core.remote.local_copy`: listed on every call, changed files fetched again)."""
    return remote.local_copy(url)


_WARMING: threading.Thread | None = None


def warm_tokenizer(src: str) -> None:
    """Start loading ``src`` into the per-process tokenizer cache in a thread (~1 s, most of it importing
    transformers), while the flow runs start and the shard stage works; :func:`save_tokenizer` waits for
    it. Any error is left for the pairs stage to report, as it would be without this."""
    global _WARMING
    from distilflow.tasks.prepare.pairs import load_tokenizer

    def load() -> None:
        with contextlib.suppress(Exception):
            load_tokenizer(local_tokenizer(src))

    _WARMING = threading.Thread(target=load, name="warm-tokenizer", daemon=True)
    _WARMING.start()


def save_tokenizer(src: str, output: str) -> str:
    """Copy the tokenizer into ``DIR/tokenizer`` (what the training job loads). Returns its URL."""
    from distilflow.tasks.prepare.pairs import load_tokenizer, tokenizer_sha256

    if _WARMING is not None:
        _WARMING.join()

    dest = join(output, "tokenizer")
    src = local_tokenizer(src)  # an s3:// tokenizer folder is fetched to a local cache first
    # a bucket folder is complete once its manifest is there (upload_folder writes it last)
    if exists(join(dest, "tokenizer.json" if is_local(dest) else remote.MANIFEST)):
        if tokenizer_sha256(local_tokenizer(dest)) != tokenizer_sha256(src):
            raise ResumeError(f"{dest} holds a different tokenizer than {src}; use a new --output or --overwrite")
        return dest
    tok = load_tokenizer(src)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        if is_local(dest):
            os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
            for stale in glob.glob(dest + ".tmp*"):  # left by a killed run
                shutil.rmtree(stale, ignore_errors=True)
            staged = dest + f".tmp{os.getpid()}"
            shutil.copytree(tmp, staged)
            os.replace(staged, dest)
        else:  # file by file, each atomic, the manifest last
            remote.upload_folder(tmp, dest)
    return dest


def preflight(cfg: Any) -> None:
    """Fail fast, before any flow run starts: inputs exist, the tokenizer folder exists."""
    if isinstance(cfg, ShardOptions):
        expand_inputs(list(cfg.inputs))
    if isinstance(cfg, PairsOptions) and is_local(cfg.tokenizer) and not os.path.isdir(cfg.tokenizer):
        raise InputError(f"--tokenizer {cfg.tokenizer}: no such folder (expected a folder with tokenizer.json)")
    if isinstance(cfg, PairsOptions) and is_local(cfg.tokenizer):
        from distilflow.tasks.core.hf import check_tokenizer_folder

        check_tokenizer_folder(cfg.tokenizer)  # a corrupt tokenizer.json: one line before any output


# -- planning ----------------------------------------------------------------------------------------------
def _hash(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:8]


def run_unit(stage: StageDir, key: str, deps: dict[str, Any] | None, call: Callable[..., dict[str, Any]],
             fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """One unit: its marker's record when an earlier (killed) run finished it from the same inputs, else
    ``call(fn, *args)`` (the flow's worker pool) with ``stage`` swapped for a view whose marker records what
    the unit was made from (inputs' content hashes taken now)."""
    if stage.is_done(key, deps):
        return read_json(stage.marker_url(key))
    if deps is not None:
        unit = stage.for_unit(key, complete_deps(deps))
        args = tuple(unit if a is stage else a for a in args)
    return call(fn, *args)


def plan_shard(cfg: ShardOptions, overwrite: bool = False) -> StagePlan:
    """Input files -> one unit per file (keyed by its position in the sorted input list)."""
    from distilflow.tasks.prepare.shard import plan_shard_units

    record = shard_record(cfg)
    files = expand_inputs(list(cfg.inputs))
    stage = StageDir(cfg.output, "corpus", {**record.to_dict(), "inputs": files}, record.fingerprint() + _hash(files))
    stage.open(overwrite)
    units = plan_shard_units(files)
    idents = {u.key: file_identity(u.url) for u in units}  # size, mtime, content hash: a grown file reruns
    return StagePlan(stage, record, {u.key: (u,) for u in units},
                     sizes={k: i["size"] / 1e6 for k, i in idents.items()}, unit="MB",
                     deps={k: {"input": i} for k, i in idents.items()})


def _part_sha(stage_url: str, f: dict[str, Any]) -> str:
    """sha256 of an upstream part (recorded in its manifest; computed for folders written before that)."""
    return f.get("sha256") or sha256_file(join(stage_url, f["file"]))


def plan_pairs(cfg: PairsOptions, overwrite: bool = False) -> StagePlan:
    """``corpus`` parts -> one unit per part; the tokenizer is copied into ``DIR/tokenizer`` first."""
    from distilflow.tasks.prepare.pairs import tokenizer_sha256

    corpus = read_manifest(join(cfg.output, "corpus"))
    tok_url = save_tokenizer(cfg.tokenizer, cfg.output)
    record = pairs_record(cfg, tokenizer_sha256(local_tokenizer(tok_url)))
    stage = StageDir(cfg.output, "pairs", {**record.to_dict(), "corpus": corpus["fingerprint"]},
                     record.fingerprint() + corpus["fingerprint"][:8])
    stage.open(overwrite)
    corpus_url = join(cfg.output, "corpus")
    parts = [f["file"] for f in corpus["files"]]
    shas = [_part_sha(corpus_url, f) for f in corpus["files"]]
    info = tokenizer_info(tok_url)
    units: dict[str, tuple[Any, ...]] = {}
    deps: dict[str, dict[str, Any]] = {}
    for i, p in enumerate(parts):
        # a part holding a single document borrows its random B documents from the next part
        j = (i + 1) % len(parts)
        neighbour = join(corpus_url, parts[j]) if len(parts) > 1 else None
        units[p.removesuffix(".parquet")] = (join(corpus_url, p), neighbour, info)
        deps[p.removesuffix(".parquet")] = {"corpus": shas[i], "neighbour": shas[j] if neighbour else None}
    stage.prune(list(units))  # pairs of corpus parts that are gone (an input that shrank)
    sizes = {f["file"].removesuffix(".parquet"): f.get("chars", 0) / 1e6 for f in corpus["files"]}
    return StagePlan(stage, record, units, sizes=sizes, unit="MB", tokenizer=tok_url, deps=deps)


def plan_mask(cfg: MaskOptions, overwrite: bool = False) -> StagePlan:
    """``pairs`` parts -> one unit per part."""
    pairs = read_manifest(join(cfg.output, "pairs"))
    tok_url = join(cfg.output, "tokenizer")
    record = mask_record(cfg, pairs["config"]["tokenizer_sha256"])
    stage = StageDir(cfg.output, "masked", {**record.to_dict(), "pairs": pairs["fingerprint"]},
                     record.fingerprint() + pairs["fingerprint"][:8])
    stage.open(overwrite)
    pairs_url = join(cfg.output, "pairs")
    info = tokenizer_info(tok_url)
    units = {f["file"].removesuffix(".parquet"): (join(pairs_url, f["file"]), info) for f in pairs["files"]}
    # frequency-smoothed masking reads the token counts of *all* parts: then every unit depends on them
    counts = {"token_counts": sha256_file(token_counts_url(cfg.output))} if record.smoothing > 0 else {}
    deps = {f["file"].removesuffix(".parquet"): {"pairs": _part_sha(pairs_url, f), **counts} for f in pairs["files"]}
    stage.prune(list(units))
    sizes = {f["file"].removesuffix(".parquet"): float(f.get("tokens", 0)) for f in pairs["files"]}
    return StagePlan(stage, record, units, sizes=sizes, unit="tok", tokenizer=tok_url, deps=deps)


def tokenizer_info(url: str) -> Any:
    """The :class:`~distilflow.tasks.prepare.pairs.TokenizerInfo` sent to the workers (``path`` = the URL;
    :func:`localize` turns it into a local folder where the unit runs)."""
    from distilflow.tasks.prepare.pairs import TokenizerInfo

    return TokenizerInfo.load(local_tokenizer(url)).at(url)


def localize(info: Any) -> Any:
    return info.at(local_tokenizer(info.path))


def tokenizer_backend(url: str) -> tuple[str, str]:
    """(the encoder the pairs units use: ``nanotoken`` or ``tokenizers``, why not nanotoken)."""
    from distilflow.tasks.prepare.pairs import encoder_for

    enc = encoder_for(local_tokenizer(url))
    return enc.backend, enc.reason


def finish_stage(plan: StagePlan) -> dict[str, Any]:
    """After the units: the manifest (pairs: the token counts first), then the dataset card ``DIR/README.md``."""
    from distilflow.tasks.prepare.card import write_dataset_card

    keys = list(plan.units)
    extra = None
    if plan.stage.stage == "pairs":
        from distilflow.tasks.prepare.pairs import load_tokenizer, merge_token_counts

        vocab_size = len(load_tokenizer(local_tokenizer(plan.tokenizer)))
        merge_token_counts(plan.stage, keys, vocab_size)
        extra = {"tokenizer": "tokenizer", "vocab_size": vocab_size,
                 "tokenizer_backend": tokenizer_backend(plan.tokenizer)[0]}
    manifest = plan.stage.write_manifest(keys, extra)
    write_dataset_card(plan.stage.root)
    return manifest


# -- reports -----------------------------------------------------------------------------------------------
def stage_report(stage: str, manifest: dict[str, Any], seconds: float) -> list[dict[str, Any]]:
    """The rows of a stage's report (metric, value): sizes, speed and the stage's own shares."""
    c = manifest["counts"]
    rows: list[dict[str, Any]] = [
        {"metric": "units (tasks)", "value": manifest["units"]},
        {"metric": "output files", "value": len(manifest["files"])},
        {"metric": "rows", "value": manifest["rows"]},
        {"metric": "tokens", "value": manifest["tokens"]},
        {"metric": "wall seconds", "value": round(seconds, 2)},
    ]
    secs = max(seconds, 1e-9)
    if stage == "corpus":
        rows.append({"metric": "input MB/s", "value": round(c.get("input_bytes", 0) / 1e6 / secs, 2)})
    elif stage == "pairs":
        n_pairs = c.get("label_0", 0) + c.get("label_1", 0)
        if n_pairs:
            rows.append({"metric": "NSP label 1 (random B) share", "value": round(c.get("label_1", 0) / n_pairs, 4)})
        rows.append({"metric": "tokens/s", "value": round(manifest["tokens"] / secs)})
    elif stage == "masked":
        sel = max(c.get("selected", 0), 1)
        rows += [
            {"metric": "selected / candidates", "value": round(c.get("selected", 0) / max(c.get("candidates", 1), 1), 4)},
            {"metric": "[MASK] share of selected", "value": round(c.get("as_mask", 0) / sel, 4)},
            {"metric": "random share of selected", "value": round(c.get("random", 0) / sel, 4)},
            {"metric": "unchanged share of selected", "value": round(c.get("unchanged", 0) / sel, 4)},
        ]
    rows += [{"metric": f"skipped: {k}", "value": v} for k, v in manifest["skipped"].items()]
    rows += [{"metric": k, "value": v} for k, v in c.items()]
    return rows


def prepare_summary(output: str, manifests: dict[str, dict[str, Any]], seconds: float,
                    workers: int) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    """(the flow's result, the summary table's rows, its headline) of a whole prepare run."""
    corpus, pairs, masked = manifests["corpus"], manifests["pairs"], manifests["masked"]
    in_mb = corpus["counts"].get("input_bytes", 0) / 1e6
    rows = [{"stage": name, "files": len(m["files"]), "rows": m["rows"], "tokens": m["tokens"] if name != "corpus" else "",
             "skipped": m["skipped_total"]} for name, m in manifests.items()]
    headline = (f"{in_mb:.1f} MB of input in {seconds:.1f} s ({in_mb / max(seconds, 1e-9):.2f} MB/s, "
                f"{workers} worker(s)).")
    result = {"output": output, "seconds": seconds, "input_mb": in_mb, "corpus": corpus["rows"],
              "pairs": pairs["rows"], "masked": masked["rows"], "tokens": pairs["tokens"]}
    return result, rows, headline


def result_line(command: str, result: dict[str, Any], output: str) -> str:
    """The one line a command prints when it is done."""
    if command == "prepare":
        r = result
        return (f"prepared {r['input_mb']:.1f} MB -> {r['corpus']} documents, {r['pairs']} sequences, "
                f"{r['tokens']:,} tokens in {r['seconds']:.1f} s; datasets in {output}/{{corpus,pairs,masked}} "
                f"(described in {output}/README.md)")
    m = result
    if command == "shard":
        return f"{m['rows']} documents in {len(m['files'])} parts; skipped {m['skipped']}"
    if command == "pairs":
        return f"{m['rows']} sequences, {m['tokens']:,} tokens in {len(m['files'])} parts"
    return f"{m['rows']} masked sequences in {len(m['files'])} parts"


# -- without Prefect ---------------------------------------------------------------------------------------
def run_local(cfg: Any) -> dict[str, dict[str, Any]]:
    """All stages of ``cfg`` (a PrepareConfig) in this process, without Prefect: the same units, records and
    outputs as the flow (tests, profiling, notebooks). Returns the manifests by stage."""
    from distilflow.tasks.prepare.mask import mask_part
    from distilflow.tasks.prepare.pairs import pairs_part
    from distilflow.tasks.prepare.shard import shard_file

    out = {}
    with hold(cfg.output, "prepare"):
        plan = plan_shard(cfg, cfg.overwrite)
        for key in plan.pending():
            plan.run_unit(key, shard_file, *plan.units[key], plan.stage, plan.record)
        out["corpus"] = finish_stage(plan)
        plan = plan_pairs(cfg, cfg.overwrite)
        for key in plan.pending():
            corpus_url, neighbour, info = plan.units[key]
            plan.run_unit(key, pairs_part, corpus_url, key, neighbour, plan.stage, plan.record, localize(info))
        out["pairs"] = finish_stage(plan)
        plan = plan_mask(cfg, cfg.overwrite)
        for key in plan.pending():
            pairs_url, info = plan.units[key]
            plan.run_unit(key, mask_part, pairs_url, key, plan.stage, plan.record, localize(info))
        out["masked"] = finish_stage(plan)
    return out
