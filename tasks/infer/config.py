"""Options of the inference commands (``fill-mask``, ``qa``, ``embed``, ``watch``): one declaration each.

Each job has two layers, composed by dataclass inheritance so every option is written once::

    ModelOptions   --model --keep-columns --format --device --threads          (all three jobs)
    TextOptions    --text-column                                               (fill-mask, embed)
    FillMaskConfig / QAConfig / EmbedConfig   the job's own options: the *record* saved in the output's
                   config.json and fingerprinted (what ``FillMasker(cfg)`` etc. take)
    BatchIO        --input --output                       (where to read and write: not in the record)
    BatchRun       --overwrite --workers --dask-address --dask-workers   (how to run: not in the record)
    FillMaskJob / QAJob / EmbedJob = BatchIO + the record + BatchRun: what the command line and the flow take

:meth:`BatchRun.record` cuts a job config back to its record, so the ``config.json`` and fingerprint of an
output folder are the same as before the options moved here (an old folder resumes). ``input`` and
``targets`` also accept one string (a deployment trigger passes ``"{{ event.payload.path }}"``; ``"w1,w2"``
is split on commas).

Light on purpose: ``distilflow fill-mask --help`` imports only this module (no torch, no Prefect).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Any, Literal

from distilflow.tasks.core.config import CommandSpec, Config, option, require


@functools.lru_cache(maxsize=1)
def fast_mode() -> Literal["bf16", "int8"]:
    """What ``--fast`` runs on this machine: bf16 where the CPU computes it natively (AVX512-BF16 or AMX:
    measured 3.0-3.2x float32 on a DistilBERT-size trunk), int8 on ONNX Runtime elsewhere (torch emulates bf16
    there, 4x *slower* than float32). ``DISTILFLOW_FAST_MODE=bf16|int8`` overrides the choice."""
    forced = os.environ.get("DISTILFLOW_FAST_MODE", "")
    if forced in ("bf16", "int8"):
        return forced  # type: ignore[return-value]
    from distilflow.tasks.core.hf import cpu_has_native_bf16

    return "bf16" if cpu_has_native_bf16() else "int8"


# batching, threads and device choice never change an answer: left out of the output fingerprint
# fast_check_rows: the agreement check changes the manifest's counters, not the answers
_NOT_IN_FINGERPRINT = ("batch_size", "window_rows", "threads", "device", "fast_check_rows")


@dataclass(frozen=True, kw_only=True)
class ModelOptions(Config):
    model: str = option(help="model folder (or hub id)", metavar="PATH_OR_HUB_ID")
    keep_columns: tuple[str, ...] = option((), "input columns copied to every output row (empty = none)",
                                           sep=",", metavar="A,B")
    format: Literal["parquet", "json"] = option(
        "parquet", "parquet: one row per prediction; json: what the transformers pipeline returns, one array "
        "element per input row (null for rows in the errors file)")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto = cuda if available, else cpu")
    threads: int = option(0, "torch CPU threads per worker (0 = torch default)", ge=0)

    def check(self) -> None:
        require(bool(self.model), type(self).__name__, "model", "give a model folder or hub id")

    def output_fingerprint(self) -> str:
        """Fields that change the outputs (batching, threads and device choice do not)."""
        return self.fingerprint(exclude=_NOT_IN_FINGERPRINT)


@dataclass(frozen=True, kw_only=True)
class TextOptions(Config):
    text_column: str = option("text", "text field for .jsonl/.csv/.parquet/.json objects")


@dataclass(frozen=True, kw_only=True)
class FillMaskConfig(TextOptions, ModelOptions):
    top_k: int = option(5, "predictions per mask", ge=1)
    targets: str | tuple[str, ...] = option(
        (), "restrict scores to these words, as the pipeline does (empty = whole vocabulary)", sep=",",
        metavar="W1,W2")
    batch_size: int = option(64, "rows per forward pass (length-sorted)", ge=1)
    max_length: int = option(0, "max tokens per text; 0 = the model's limit", ge=0)
    too_long: Literal["truncate", "error"] = option(
        "truncate", "texts over max length: keep a window around the masks, or send to the errors file")
    dtype: Literal["auto", "float32", "bfloat16"] = option("auto", "auto = bf16 autocast on CUDA, float32 on CPU")
    quantize: Literal["none", "bf16", "int8", "auto"] = option(
        "none", "--fast (= --quantize auto): every encoder layer but the last in reduced precision, CPU only: "
        "bf16 (torch autocast) on CPUs with native bf16 (AVX512-BF16 or AMX), else int8 on ONNX Runtime (its "
        "first run on a model exports it once, ~20 s); faster, approximate: top-1 agreement with the exact "
        "mode is measured on the first window and reported", aliases=("--fast",), const="auto")
    fast_check_rows: int = option(
        256, "--fast: rows of the first window also run in the exact mode to measure and report the top-1 "
        "agreement (0 = no check: saves their exact forward pass, the manifest then has no agreement)", ge=0)
    window_rows: int = option(4096, "rows read, length-sorted and written at a time (bounds memory)", ge=1,
                              cli=False)

    def check(self) -> None:
        super().check()
        n = type(self).__name__
        require(self.max_length == 0 or self.max_length >= 3, n, "max_length", "must be 0 (model limit) or >= 3")
        require(self.window_rows >= self.batch_size, n, "window_rows", "must be >= batch_size")
        require(all(t.strip() for t in self.targets), n, "targets", "empty target word")
        require(not (self.quantize != "none" and self.device == "cuda"), n, "quantize",
                "--fast runs on CPU only (on CUDA the exact mode already computes in bf16); use --device cpu")

    def __post_init__(self) -> None:
        # --fast = "auto" is resolved here, so config.json and the fingerprint name the mode that ran
        if self.quantize == "auto":
            object.__setattr__(self, "quantize", fast_mode())
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class QAConfig(ModelOptions):
    question_column: str = option("question", "question field")
    context_column: str = option("context", "context field")
    top_k: int = option(1, "answers per question", ge=1)
    max_seq_len: int = option(384, "tokens per feature (question + context chunk)", ge=8)
    doc_stride: int = option(128, "overlap between context chunks", ge=0)
    max_answer_len: int = option(15, "longest answer in tokens", ge=1)
    handle_impossible_answer: bool = option(False, "allow the empty answer")
    align_to_words: bool = option(True, "answers start and end on word boundaries (the pipeline's default)")
    batch_size: int = option(32, "features per forward pass", ge=1)
    window_rows: int = option(1024, "rows read and written at a time (bounds memory)", ge=1, cli=False)

    def check(self) -> None:
        super().check()
        require(self.doc_stride < self.max_seq_len, type(self).__name__, "doc_stride", "must be in [0, max_seq_len)")


@dataclass(frozen=True, kw_only=True)
class EmbedConfig(TextOptions, ModelOptions):
    pooling: Literal["mean", "cls"] = option("mean", "mean over tokens, or [CLS]")
    normalize: bool = option(False, "L2-normalise the embeddings")
    max_length: int = option(0, "max tokens per text; 0 = the model's limit", ge=0)
    too_long: Literal["truncate", "error"] = option(
        "truncate", "texts over max length: cut the end, or send to the errors file")
    batch_size: int = option(64, "rows per forward pass (length-sorted)", ge=1)
    dtype: Literal["auto", "float32", "bfloat16"] = option("auto", "auto = bf16 autocast on CUDA, float32 on CPU")
    window_rows: int = option(4096, "rows read, length-sorted and written at a time (bounds memory)", ge=1,
                              cli=False)

    def check(self) -> None:
        super().check()
        require(self.max_length == 0 or self.max_length >= 2, type(self).__name__, "max_length", "must be 0 or >= 2")


@dataclass(frozen=True, kw_only=True)
class BatchIO(Config):
    """Where a batch job reads and writes: not part of the output's record."""

    input: str | tuple[str, ...] = option(
        help="input files, folders or globs (any fsspec URL): .txt (one text per line), .jsonl, .csv/.tsv, "
        '.parquet, optionally .gz; .json request files {"input_data": [...]} / {"inputs": {"input_string": '
        "[...]}}", nargs="+", metavar="URL_OR_GLOB")
    output: str = option(help="output folder: <output>/<input stem>.parquet per input file, plus the errors "
                         "files, completion markers and manifest", metavar="URL")


@dataclass(frozen=True, kw_only=True)
class BatchRun(Config):
    """How a batch job runs (never changes an answer) and how its record is cut from it."""

    overwrite: bool = option(False, "delete the output folder first (without it: resume, skipping finished "
                             "files)", affects_output=False)
    workers: int = option(1, "local worker processes, one input file each (1 = in this process)", ge=1,
                          affects_output=False)
    dask_address: str | None = option(None, "run the file tasks on this Dask scheduler (default: local)",
                                      metavar="tcp://HOST:8786", affects_output=False)
    dask_workers: int = option(0, "start a local Dask cluster of N worker processes for the file tasks (0 = no)",
                               ge=0, affects_output=False)

    @property
    def in_process(self) -> bool:
        """The file tasks run in the flow's process (no worker processes, no Dask)."""
        return self.workers == 1 and not self.dask_address and not self.dask_workers

    def record(self) -> Any:
        """The job's record (the options that shape the outputs): saved in config.json, fingerprinted."""
        base = next(c for c in type(self).__mro__[1:] if issubclass(c, ModelOptions) and not issubclass(c, BatchRun))
        names = {f.name for f in dataclasses.fields(base)}
        return base.from_dict({k: v for k, v in self.to_dict().items() if k in names})

    def output_fingerprint(self) -> str:
        return str(self.record().output_fingerprint())


@dataclass(frozen=True, kw_only=True)
class FillMaskJob(BatchRun, FillMaskConfig, BatchIO):
    """``distilflow fill-mask`` / ``fill_mask_flow``."""


@dataclass(frozen=True, kw_only=True)
class QAJob(BatchRun, QAConfig, BatchIO):
    """``distilflow qa`` / ``qa_flow``."""


@dataclass(frozen=True, kw_only=True)
class EmbedJob(BatchRun, EmbedConfig, BatchIO):
    """``distilflow embed`` / ``embed_flow``."""


@dataclass(frozen=True, kw_only=True)
class WatchConfig(Config):
    dir: str = option(help="folder to watch (any fsspec URL)", positional=True, metavar="DIR")
    state: str | None = option(None, "JSON file recording emitted files (default: ~/.distilflow/watch-<DIR>.json)")
    interval: float = option(2.0, "seconds between polls", ge=0)
    stable_polls: int = option(2, "a file is ready when its size and mtime are unchanged over this many polls",
                               ge=1)
    include: tuple[str, ...] = option(("*",), "file name patterns to watch", sep=",", metavar="GLOB,GLOB")
    recursive: bool = option(False, "also watch sub-folders")
    reprocess_changed: bool = option(False, "emit again when an emitted file's size/mtime changes (without it: "
                                     "each path once)")
    max_polls: int = option(0, "stop after this many polls (0 = forever)", ge=0)


@dataclass(frozen=True, kw_only=True)
class ServeConfig(Config):
    model: str = option(help="model folder: a masked-LM (fill-mask, embed) or question-answering model",
                        metavar="DIR")
    task: Literal["auto", "fill-mask", "qa", "embed"] = option(
        "auto", "what POST /score answers (auto: qa for a question-answering model, else fill-mask)")
    host: str = option("127.0.0.1", "address to bind; the endpoint has no authentication, so keep 127.0.0.1 "
                       "unless behind a proxy")
    port: int = option(8000, "port", ge=1, le=65535)
    max_batch: int = option(64, "most rows scored together (requests arriving together share a batch)", ge=1)
    max_wait_ms: float = option(5.0, "after the first request of a batch, wait at most this long for more", ge=0)
    top_k: int | None = option(None, "fill-mask predictions per mask / qa answers per question (default: the "
                               "batch jobs' 5 / 1)", ge=1)
    threads: int = option(0, "torch CPU threads (0 = torch default)", ge=0)
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto = cuda if available, else cpu")

    def check(self) -> None:
        require(bool(self.model), "ServeConfig", "model", "give a model folder")


_RESUME = ("Results go to <output>/<input stem>.parquet (one file per input file, written atomically); bad rows "
           "go to the errors file with the reason, the manifest accounts for every input row, and a rerun skips "
           "finished files.")

FILL_MASK = CommandSpec(
    FillMaskJob, run="distilflow.flows.inference:run_fill_mask",
    description="Fill-mask predictions for every row of --input: the same top-k, scores and sequences as "
    "transformers.pipeline('fill-mask'), in length-sorted batches with the last layer computed only at the "
    "masks. " + _RESUME)
QA = CommandSpec(
    QAJob, run="distilflow.flows.inference:run_qa",
    description="Extractive question answering (answer, score, start, end) for every (question, context) row, "
    "with the transformers question-answering pipeline's rules. " + _RESUME)
EMBED = CommandSpec(
    EmbedJob, run="distilflow.flows.inference:run_embed",
    description="Mean-pooled or [CLS] embeddings for every row of --input. " + _RESUME)
WATCH = CommandSpec(
    WatchConfig, run="distilflow.flows.inference:run_watch",
    description="Emit a Prefect event (distilflow.file.ready) for each completely written file in DIR; the "
    "fill-mask deployment's trigger runs the flow on it. Needs PREFECT_API_URL (a real server).")
SERVE = CommandSpec(
    ServeConfig, run="distilflow.tasks.infer.serve:run_serve",
    description="Serve fill-mask, QA or embeddings over HTTP at POST /score with the hosted catalogue's request "
    'shapes ({"input_data": [...]}, {"inputs": {"input_string": [...]}}, {"question": ..., "context": ...}); '
    "concurrent requests are batched together; answers equal the batch jobs' --format json. GET /health.")


# job name -> (record class, "module:class" of the model job); the model code is imported only when used
_JOBS: dict[str, tuple[type[ModelOptions], str]] = {
    "fill-mask": (FillMaskConfig, "distilflow.tasks.infer.fill_mask:FillMasker"),
    "qa": (QAConfig, "distilflow.tasks.infer.qa:QuestionAnswerer"),
    "embed": (EmbedConfig, "distilflow.tasks.infer.embed:Embedder"),
}


def load_job(name: str, record: dict[str, Any]) -> tuple[Any, Any]:
    """(record config, model job) for ``name`` ("fill-mask", "qa", "embed"); loads the model (cached)."""
    import importlib

    cls, ref = _JOBS[name]
    cfg = cls.from_dict(record)
    module, _, attr = ref.partition(":")
    return cfg, getattr(importlib.import_module(module), attr)(cfg)
