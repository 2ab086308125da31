"""Prepare job: ``distilflow prepare`` = shard -> pairs -> mask, each also a flow of its own.

    distilflow prepare --input ../shared/data/corpus/gutenberg/pg*.txt --output runs/prep \\
        --tokenizer ../shared/data/tokenizers/bert-base-uncased --max-seq-len 128 --workers 2

One Prefect task per unit (input file / corpus part); units are keyed by input, so the output is
byte-identical whatever ``--workers`` is, and a rerun skips every unit whose completion marker exists.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import shutil
import tempfile
import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.task_runners import ThreadPoolTaskRunner

from distilflow.flows.common import (
    make_task_runner,
    markdown_table,
    offload,
    publish,
    run_in_subflow,
    wait_with_progress,
    worker_processes,
)
from distilflow.tasks.core.config import ConfigError
from distilflow.tasks.core.io import InputError, exists, expand_inputs, is_local, join, read_json
from distilflow.tasks.core.stage import ResumeError, StageDir, read_manifest
from distilflow.tasks.prepare.mask import MaskStageConfig, mask_part
from distilflow.tasks.prepare.pairs import (
    PairsConfig,
    load_tokenizer,
    merge_token_counts,
    pairs_part,
    tokenizer_sha256,
)
from distilflow.tasks.prepare.shard import ShardConfig, ShardUnit, plan_shard_units, shard_file

# -- tasks (one per unit of work) --------------------------------------------------------------------


@task(name="shard-file", retries=1, retry_delay_seconds=2)
def shard_task(unit: ShardUnit, stage: StageDir, cfg: ShardConfig) -> dict[str, Any]:
    if stage.is_done(unit.key):  # finished by an earlier (killed) run
        return read_json(stage.marker_url(unit.key))
    return offload(shard_file, unit, stage, cfg)


@task(name="pairs-part", retries=1, retry_delay_seconds=2)
def pairs_task(corpus_url: str, key: str, neighbour: str | None, stage: StageDir, cfg: PairsConfig,
               tokenizer_path: str) -> dict[str, Any]:
    if stage.is_done(key):
        return read_json(stage.marker_url(key))
    return offload(pairs_part, corpus_url, key, neighbour, stage, cfg, local_tokenizer(tokenizer_path))


@task(name="mask-part", retries=1, retry_delay_seconds=2)
def mask_task(pairs_url: str, key: str, stage: StageDir, cfg: MaskStageConfig, tokenizer_path: str,
              pairs_stage_url: str) -> dict[str, Any]:
    if stage.is_done(key):
        return read_json(stage.marker_url(key))
    return offload(mask_part, pairs_url, key, stage, cfg, local_tokenizer(tokenizer_path), pairs_stage_url)


# -- helpers -------------------------------------------------------------------------------------------


def local_tokenizer(url: str) -> str:
    """Tokenizers load from local folders; a remote ``DIR/tokenizer`` is copied to a temp cache once."""
    if is_local(url):
        return url
    import fsspec

    digest = hashlib.sha256(url.encode()).hexdigest()[:16]  # stable across processes (unlike hash())
    cache = os.path.join(tempfile.gettempdir(), "distilflow-tok", digest)
    if not os.path.exists(os.path.join(cache, "tokenizer.json")):
        fs, path = fsspec.core.url_to_fs(url)
        tmp = cache + f".tmp{os.getpid()}"
        fs.get(path.rstrip("/") + "/", tmp, recursive=True)
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        if os.path.exists(cache):  # another worker finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, cache)
    return cache


def save_tokenizer(src: str, output: str) -> str:
    """Copy the tokenizer into ``DIR/tokenizer`` (what the training job loads). Returns its URL."""
    dest = join(output, "tokenizer")
    src = local_tokenizer(src)  # an s3:// tokenizer folder is fetched to a local cache first
    if exists(join(dest, "tokenizer.json")):
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
        else:
            import fsspec

            fs, path = fsspec.core.url_to_fs(dest)
            fs.put(tmp.rstrip("/") + "/", path, recursive=True)
    return dest


def _stage_report(title: str, manifest: dict[str, Any], seconds: float, extra_rows: list[dict[str, Any]]) -> str:
    rows = [
        {"metric": "units (tasks)", "value": manifest["units"]},
        {"metric": "output files", "value": len(manifest["files"])},
        {"metric": "rows", "value": manifest["rows"]},
        {"metric": "tokens", "value": manifest["tokens"]},
        {"metric": "wall seconds", "value": round(seconds, 2)},
        *extra_rows,
        *({"metric": f"skipped: {k}", "value": v} for k, v in manifest["skipped"].items()),
        *({"metric": k, "value": v} for k, v in manifest["counts"].items()),
    ]
    return f"## {title}\n\n" + markdown_table(rows, ["metric", "value"])


def _run_units(stage: StageDir, keys: list[str], submit, title: str) -> int:
    """Submit the units that are not done yet; returns how many ran."""
    logger = get_run_logger()
    pending = [k for k in keys if not stage.is_done(k)]
    if len(pending) < len(keys):
        logger.info("%s: %d of %d units already done (resuming)", title, len(keys) - len(pending), len(keys))
    futures = [submit(k) for k in pending]
    wait_with_progress(futures, title)
    return len(pending)


# -- flows ---------------------------------------------------------------------------------------------


def run_shard_stage(inputs: list[str], output: str, format: str = "auto", text_field: str = "text",
               one_sentence_per_line: bool = False, max_line_bytes: int = 1 << 20, part_bytes: int = 16 << 20,
               overwrite: bool = False) -> dict[str, Any]:
    """Input files -> ``output/corpus/part-*.parquet`` (doc_id, source, sentences) + manifest."""
    t0 = time.perf_counter()
    cfg = ShardConfig(format=format, text_field=text_field, one_sentence_per_line=one_sentence_per_line,  # type: ignore[arg-type]
                      max_line_bytes=max_line_bytes, part_bytes=part_bytes)
    files = expand_inputs(inputs)
    units = plan_shard_units(files)
    stage = StageDir(output, "corpus", {**cfg.to_dict(), "inputs": files}, cfg.fingerprint() + _hash(files))
    stage.open(overwrite)
    by_key = {u.key: u for u in units}
    _run_units(stage, list(by_key), lambda k: shard_task.submit(by_key[k], stage, cfg), "shard")
    manifest = stage.write_manifest(list(by_key))
    logger = get_run_logger()
    for bad in manifest["skipped"].items():
        logger.warning("corpus: skipped %s x %d (details in %s/_errors/)", bad[0], bad[1], stage.url)
    mb = manifest["counts"].get("input_bytes", 0) / 1e6
    seconds = time.perf_counter() - t0
    publish(_stage_report("shard", manifest, seconds, [{"metric": "input MB/s", "value": round(mb / seconds, 2)}]),
            key="distilflow-shard", description=f"corpus shards in {stage.url}")
    return manifest


def run_pairs_stage(output: str, tokenizer: str, max_seq_len: int = 512, short_seq_prob: float = 0.1, nsp: bool = True,
               seed: int = 0, bert_exact_nsp: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """``output/corpus`` -> ``output/pairs/part-*.parquet`` (NSP pairs or single segments) + token counts."""
    t0 = time.perf_counter()
    corpus = read_manifest(join(output, "corpus"))
    tok_url = save_tokenizer(tokenizer, output)
    tok_local = local_tokenizer(tok_url)
    cfg = PairsConfig(tokenizer_sha256=tokenizer_sha256(tok_local), max_seq_len=max_seq_len,
                      short_seq_prob=short_seq_prob, nsp=nsp, seed=seed,
                      balance_single_sentence=not bert_exact_nsp)
    stage = StageDir(output, "pairs", {**cfg.to_dict(), "corpus": corpus["fingerprint"]},
                     cfg.fingerprint() + corpus["fingerprint"][:8])
    stage.open(overwrite)
    parts = [f["file"] for f in corpus["files"]]
    keys = [p.removesuffix(".parquet") for p in parts]
    corpus_url = join(output, "corpus")
    neighbour = {k: join(corpus_url, parts[(i + 1) % len(parts)]) if len(parts) > 1 else None
                 for i, k in enumerate(keys)}
    _run_units(stage, keys, lambda k: pairs_task.submit(join(corpus_url, f"{k}.parquet"), k, neighbour[k], stage, cfg,
                                                        tok_url), "pairs")
    vocab_size = len(load_tokenizer(tok_local))
    merge_token_counts(stage.url, keys, vocab_size)
    manifest = stage.write_manifest(keys, {"tokenizer": "tokenizer", "vocab_size": vocab_size})
    c = manifest["counts"]
    n_pairs = c.get("label_0", 0) + c.get("label_1", 0)
    extra = [{"metric": "NSP label 1 (random B) share", "value": round(c.get("label_1", 0) / n_pairs, 4)}] if n_pairs else []
    seconds = time.perf_counter() - t0
    extra.append({"metric": "tokens/s", "value": round(manifest["tokens"] / seconds)})
    publish(_stage_report("pairs", manifest, seconds, extra), key="distilflow-pairs",
            description=f"sentence pairs in {stage.url}")
    return manifest


def run_mask_stage(output: str, mlm_prob: float = 0.15, whole_word_mask: bool = False, mlm_smoothing: float = 0.0,
              max_predictions: int = 0, dupe_factor: int = 1, seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """``output/pairs`` -> ``output/masked/part-*.parquet`` with ``labels`` (static masking)."""
    t0 = time.perf_counter()
    pairs = read_manifest(join(output, "pairs"))
    tok_url = join(output, "tokenizer")
    cfg = MaskStageConfig(tokenizer_sha256=pairs["config"]["tokenizer_sha256"], mlm_prob=mlm_prob,
                          whole_word=whole_word_mask, smoothing=mlm_smoothing, max_predictions=max_predictions,
                          dupe_factor=dupe_factor, seed=seed)
    stage = StageDir(output, "masked", {**cfg.to_dict(), "pairs": pairs["fingerprint"]},
                     cfg.fingerprint() + pairs["fingerprint"][:8])
    stage.open(overwrite)
    pairs_url = join(output, "pairs")
    keys = [f["file"].removesuffix(".parquet") for f in pairs["files"]]
    _run_units(stage, keys, lambda k: mask_task.submit(join(pairs_url, f"{k}.parquet"), k, stage, cfg, tok_url,
                                                       pairs_url), "mask")
    manifest = stage.write_manifest(keys)
    c = manifest["counts"]
    sel = max(c.get("selected", 0), 1)
    extra = [
        {"metric": "selected / candidates", "value": round(c.get("selected", 0) / max(c.get("candidates", 1), 1), 4)},
        {"metric": "[MASK] share of selected", "value": round(c.get("as_mask", 0) / sel, 4)},
        {"metric": "random share of selected", "value": round(c.get("random", 0) / sel, 4)},
        {"metric": "unchanged share of selected", "value": round(c.get("unchanged", 0) / sel, 4)},
    ]
    publish(_stage_report("mask", manifest, time.perf_counter() - t0, extra), key="distilflow-mask",
            description=f"masked sequences in {stage.url}")
    return manifest


def _prepare_stages(inputs: list[str], output: str, tokenizer: str, max_seq_len: int, seed: int, dupe_factor: int,
                    short_seq_prob: float, mlm_prob: float, whole_word_mask: bool, mlm_smoothing: float, nsp: bool,
                    bert_exact_nsp: bool, format: str, text_field: str, one_sentence_per_line: bool, workers: int,
                    overwrite: bool) -> dict[str, Any]:
    """shard -> pairs -> mask; each stage is skipped when its outputs are complete.

    The stages run inside one flow (not three sub-flows) so that the worker pool is started once.
    """
    t0 = time.perf_counter()
    corpus = run_shard_stage(inputs, output, format=format, text_field=text_field,
                             one_sentence_per_line=one_sentence_per_line, overwrite=overwrite)
    pairs = run_pairs_stage(output, tokenizer, max_seq_len=max_seq_len, short_seq_prob=short_seq_prob, nsp=nsp,
                            seed=seed, bert_exact_nsp=bert_exact_nsp, overwrite=overwrite)
    masked = run_mask_stage(output, mlm_prob=mlm_prob, whole_word_mask=whole_word_mask, mlm_smoothing=mlm_smoothing,
                            dupe_factor=dupe_factor, seed=seed, overwrite=overwrite)
    seconds = time.perf_counter() - t0
    in_mb = corpus["counts"].get("input_bytes", 0) / 1e6
    summary = [
        {"stage": "corpus", "files": len(corpus["files"]), "rows": corpus["rows"], "tokens": "",
         "skipped": corpus["skipped_total"]},
        {"stage": "pairs", "files": len(pairs["files"]), "rows": pairs["rows"], "tokens": pairs["tokens"],
         "skipped": pairs["skipped_total"]},
        {"stage": "masked", "files": len(masked["files"]), "rows": masked["rows"], "tokens": masked["tokens"],
         "skipped": masked["skipped_total"]},
    ]
    md = (f"# prepare: {output}\n\n{in_mb:.1f} MB of input in {seconds:.1f} s "
          f"({in_mb / seconds:.2f} MB/s, {workers} worker(s)).\n\n" + markdown_table(summary))
    publish(md, key="distilflow-prepare", description="prepare summary")
    return {"output": output, "seconds": seconds, "input_mb": in_mb, "corpus": corpus["rows"],
            "pairs": pairs["rows"], "masked": masked["rows"], "tokens": pairs["tokens"]}


@flow(name="prepare", log_prints=True)
def prepare_flow(inputs: list[str], output: str, tokenizer: str, max_seq_len: int = 512, seed: int = 0,
                 dupe_factor: int = 1, short_seq_prob: float = 0.1, mlm_prob: float = 0.15,
                 whole_word_mask: bool = False, mlm_smoothing: float = 0.0, nsp: bool = True,
                 bert_exact_nsp: bool = False, format: str = "auto", text_field: str = "text",
                 one_sentence_per_line: bool = False, workers: int = 1, dask_address: str | None = None,
                 dask_workers: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """The prepare job: corpus files -> ``output/{corpus,pairs,masked}`` (see CONTRIBUTING.md contract)."""
    return _run_stages(_prepare_stages, "prepare-stages", workers, dask_address, dask_workers, inputs=inputs,
                      output=output, tokenizer=tokenizer, max_seq_len=max_seq_len, seed=seed, dupe_factor=dupe_factor,
                      short_seq_prob=short_seq_prob, mlm_prob=mlm_prob, whole_word_mask=whole_word_mask,
                      mlm_smoothing=mlm_smoothing, nsp=nsp, bert_exact_nsp=bert_exact_nsp, format=format,
                      text_field=text_field, one_sentence_per_line=one_sentence_per_line, workers=workers,
                      overwrite=overwrite)


@flow(name="shard", log_prints=True)
def shard_flow(inputs: list[str], output: str, format: str = "auto", text_field: str = "text",
               one_sentence_per_line: bool = False, workers: int = 1, dask_address: str | None = None,
               dask_workers: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Stage 1 alone: inputs -> ``output/corpus``."""
    return _run_stages(run_shard_stage, "shard-stage", workers, dask_address, dask_workers, inputs=inputs,
                      output=output, format=format, text_field=text_field,
                      one_sentence_per_line=one_sentence_per_line, overwrite=overwrite)


@flow(name="pairs", log_prints=True)
def pairs_flow(output: str, tokenizer: str, max_seq_len: int = 512, short_seq_prob: float = 0.1, nsp: bool = True,
               seed: int = 0, bert_exact_nsp: bool = False, workers: int = 1, dask_address: str | None = None,
               dask_workers: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Stage 2 alone: ``output/corpus`` -> ``output/pairs``."""
    return _run_stages(run_pairs_stage, "pairs-stage", workers, dask_address, dask_workers, output=output,
                      tokenizer=tokenizer, max_seq_len=max_seq_len, short_seq_prob=short_seq_prob, nsp=nsp, seed=seed,
                      bert_exact_nsp=bert_exact_nsp, overwrite=overwrite)


@flow(name="mask", log_prints=True)
def mask_flow(output: str, mlm_prob: float = 0.15, whole_word_mask: bool = False, mlm_smoothing: float = 0.0,
              max_predictions: int = 0, dupe_factor: int = 1, seed: int = 0, workers: int = 1,
              dask_address: str | None = None, dask_workers: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Stage 3 alone: ``output/pairs`` -> ``output/masked``."""
    return _run_stages(run_mask_stage, "mask-stage", workers, dask_address, dask_workers, output=output,
                      mlm_prob=mlm_prob, whole_word_mask=whole_word_mask, mlm_smoothing=mlm_smoothing,
                      max_predictions=max_predictions, dupe_factor=dupe_factor, seed=seed, overwrite=overwrite)


def _run_stages(fn: Any, name: str, pool_size: int, dask_address: str | None, dask_workers: int,
                **kwargs: Any) -> Any:
    """Run a stage body as a sub-flow: its tasks on the Dask cluster when one is named, else one task per
    unit on the default thread runner with the work in ``pool_size`` plain processes (``worker_processes``).
    One pool for all the stages of a run: it starts once. One task thread more than there are processes:
    the next unit is already queued in the pool while a task finishes its Prefect bookkeeping, so no
    worker idles between units. ``memory://`` lives inside one process, so a run on it does its work in
    this process instead."""
    if dask_address or dask_workers:
        return run_in_subflow(fn, name, make_task_runner(1, dask_address, dask_workers), **kwargs)
    urls = [kwargs.get("output", ""), *kwargs.get("inputs", [])]
    in_memory = any(str(u).startswith("memory://") for u in urls)
    with worker_processes(0 if in_memory else pool_size):
        return run_in_subflow(fn, name, ThreadPoolTaskRunner(max_workers=pool_size + 1), **kwargs)


def _hash(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:8]


# -- command line --------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="output folder (any fsspec URL); stage folders go inside")
    p.add_argument("--workers", type=int, default=1,
                   help="parallel worker processes, one Prefect task per shard (default 1). Outputs do not "
                   "depend on it")
    p.add_argument("--dask-address", default=None, help="run the shard tasks on this Dask scheduler (prefect-dask)")
    p.add_argument("--dask-workers", type=int, default=0, help="start a local Dask cluster with N worker processes")
    p.add_argument("--overwrite", action="store_true",
                   help="discard existing stage outputs (default: resume; refuse if the config differs)")


def _shard_args(p: argparse.ArgumentParser, with_input: bool = True) -> None:
    if with_input:
        p.add_argument("--input", nargs="+", required=True, metavar="URL",
                       help="files, folders or globs; .txt (blank line = document boundary), .jsonl (text field), "
                       ".csv, .parquet (text column), optionally .gz; any fsspec URL (s3://...)")
    p.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "csv", "parquet"],
                   help="input format (default: from the file suffix)")
    p.add_argument("--text-field", default="text", help="JSON key / column with the text (default: text)")
    p.add_argument("--one-sentence-per-line", action="store_true",
                   help="inputs are already one sentence per line (Google create_pretraining_data.py layout)")


def _pairs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", required=True, help="local tokenizer folder (tokenizer.json), e.g. bert-base-uncased")
    p.add_argument("--max-seq-len", type=int, default=512,
                   help="max tokens per sequence incl. [CLS]/[SEP] (default 512, BERT's phase-2 length)")
    p.add_argument("--short-seq-prob", type=float, default=0.1,
                   help="probability of a shorter random target length (default 0.1, as BERT)")
    p.add_argument("--no-nsp", dest="nsp", action="store_false",
                   help="DistilBERT/RoBERTa style: single contiguous segments, no next-sentence pairs")
    p.add_argument("--bert-exact-nsp", action="store_true",
                   help="BERT's exact rule: a one-sentence chunk always gets a random B (label 1). Default: split "
                   "such a sentence half of the time so NSP labels stay ~50/50 on short documents")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed + input = same bytes")


def _mask_args(p: argparse.ArgumentParser, with_seed: bool = False) -> None:
    p.add_argument("--mlm-prob", type=float, default=0.15, help="share of non-special tokens to predict (default 0.15)")
    p.add_argument("--whole-word-mask", action="store_true", help="mask all pieces of a word together")
    p.add_argument("--mlm-smoothing", type=float, default=0.0,
                   help="select tokens with weight count^-s (DistilBERT uses 0.7; default 0 = uniform)")
    p.add_argument("--dupe-factor", type=int, default=1,
                   help="number of differently masked copies of every sequence (default 1; BERT used 10)")
    if with_seed:
        p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="shard -> NSP pairs -> masking, as one flow",
                       description="Corpus files -> sentence shards -> BERT sequence pairs -> static MLM masks "
                       "(Parquet + manifests under --output).")
    _shard_args(p)
    _pairs_args(p)
    _mask_args(p)
    _common(p)
    p.set_defaults(func=_run_prepare)

    p = sub.add_parser("shard", help="stage 1: inputs -> corpus/ sentence shards")
    _shard_args(p)
    _common(p)
    p.set_defaults(func=_run_shard)

    p = sub.add_parser("pairs", help="stage 2: corpus/ -> pairs/ tokenized NSP pairs")
    _pairs_args(p)
    _common(p)
    p.set_defaults(func=_run_pairs)

    p = sub.add_parser("mask", help="stage 3: pairs/ -> masked/ static masks")
    _mask_args(p, with_seed=True)
    _common(p)
    p.set_defaults(func=_run_mask)


def _preflight(a: argparse.Namespace) -> None:
    """Fail fast, before any flow run starts: inputs exist, option values valid, tokenizer loads."""
    if getattr(a, "input", None):
        expand_inputs(a.input)
        ShardConfig(format=a.format, text_field=a.text_field, one_sentence_per_line=a.one_sentence_per_line)
    if getattr(a, "tokenizer", None):
        if not os.path.isdir(a.tokenizer) and is_local(a.tokenizer):
            raise InputError(f"--tokenizer {a.tokenizer}: no such folder (expected a folder with tokenizer.json)")
        PairsConfig(tokenizer_sha256="-", max_seq_len=a.max_seq_len, short_seq_prob=a.short_seq_prob)
    if getattr(a, "mlm_prob", None) is not None:
        MaskStageConfig(tokenizer_sha256="-", mlm_prob=a.mlm_prob, whole_word=a.whole_word_mask,
                        smoothing=a.mlm_smoothing, dupe_factor=a.dupe_factor)
    if a.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {a.workers}")


def _guard(fn):
    """Turn expected user errors into one clear line and exit code 2 (no traceback)."""

    def run(args: argparse.Namespace) -> int:
        try:
            _preflight(args)
            fn(args)
            return 0
        except (InputError, ConfigError, ResumeError, FileNotFoundError) as e:
            import sys

            print(f"distilflow {args.command}: error: {e}", file=sys.stderr)
            return 2

    return run


def _runner_args(a: argparse.Namespace) -> dict[str, Any]:
    return {"workers": a.workers, "dask_address": a.dask_address, "dask_workers": a.dask_workers,
            "overwrite": a.overwrite}


@_guard
def _run_prepare(a: argparse.Namespace) -> None:
    r = prepare_flow(a.input, a.output, a.tokenizer, max_seq_len=a.max_seq_len, seed=a.seed,
                     dupe_factor=a.dupe_factor, short_seq_prob=a.short_seq_prob, mlm_prob=a.mlm_prob,
                     whole_word_mask=a.whole_word_mask, mlm_smoothing=a.mlm_smoothing, nsp=a.nsp,
                     bert_exact_nsp=a.bert_exact_nsp, format=a.format,
                     text_field=a.text_field, one_sentence_per_line=a.one_sentence_per_line, workers=a.workers,
                     dask_address=a.dask_address, dask_workers=a.dask_workers, overwrite=a.overwrite)
    print(f"prepared {r['input_mb']:.1f} MB -> {r['corpus']} documents, {r['pairs']} sequences, {r['tokens']:,} tokens "
          f"in {r['seconds']:.1f} s; outputs in {a.output}/{{corpus,pairs,masked}} (see manifest.json in each)")


@_guard
def _run_shard(a: argparse.Namespace) -> None:
    m = shard_flow(a.input, a.output, format=a.format, text_field=a.text_field,
                   one_sentence_per_line=a.one_sentence_per_line, **_runner_args(a))
    print(f"{m['rows']} documents in {len(m['files'])} parts; skipped {m['skipped']}")


@_guard
def _run_pairs(a: argparse.Namespace) -> None:
    m = pairs_flow(a.output, a.tokenizer, max_seq_len=a.max_seq_len, short_seq_prob=a.short_seq_prob, nsp=a.nsp,
                   seed=a.seed, bert_exact_nsp=a.bert_exact_nsp, **_runner_args(a))
    print(f"{m['rows']} sequences, {m['tokens']:,} tokens in {len(m['files'])} parts")


@_guard
def _run_mask(a: argparse.Namespace) -> None:
    m = mask_flow(a.output, mlm_prob=a.mlm_prob, whole_word_mask=a.whole_word_mask, mlm_smoothing=a.mlm_smoothing,
                  dupe_factor=a.dupe_factor, seed=a.seed, **_runner_args(a))
    print(f"{m['rows']} masked sequences in {len(m['files'])} parts")
