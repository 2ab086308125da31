"""Options of the prepare job (``distilflow prepare`` / ``shard`` / ``pairs`` / ``mask``): one declaration each.

Each option is declared once, in the mixin of the stage that reads it; a command's config is the union of
the mixins it needs (dataclass inheritance), so ``prepare`` = shard + pairs + mask + run options, and
``--seed`` (read by pairs and mask) is still written once::

    StageOptions   --output
    ShardOptions   --input --format --text-field --one-sentence-per-line (+ record-only size limits)
    PairsOptions   --tokenizer --max-seq-len --short-seq-prob --nsp/--no-nsp --bert-exact-nsp --seed
    MaskOptions    --mlm-prob --whole-word-mask --mlm-smoothing --max-predictions --dupe-factor --seed
    RunOptions     --workers --dask-address --dask-workers --overwrite   (never change the output bytes)

The stage *records* saved in ``config.json`` and fingerprinted (:class:`~distilflow.tasks.prepare.shard.ShardConfig`,
:class:`~distilflow.tasks.prepare.pairs.PairsConfig`, :class:`~distilflow.tasks.prepare.mask.MaskStageConfig`)
are derived from these by :func:`shard_record`, :func:`pairs_record` and :func:`mask_record`, so an output
folder written before the options moved here resumes as before.

Light on purpose: ``distilflow prepare --help`` imports this module only (no pyarrow, no tokenizers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from distilflow.tasks.core.config import CommandSpec, Config, option

if TYPE_CHECKING:
    from distilflow.tasks.prepare.mask import MaskStageConfig
    from distilflow.tasks.prepare.pairs import PairsConfig
    from distilflow.tasks.prepare.shard import ShardConfig


@dataclass(frozen=True, kw_only=True)
class StageOptions(Config):
    output: str = option(help="output folder (any fsspec URL); stage folders go inside")


@dataclass(frozen=True, kw_only=True)
class SeedOption(Config):
    seed: int = option(0, "random seed; same seed + input = same bytes")


@dataclass(frozen=True, kw_only=True)
class ShardOptions(StageOptions):
    inputs: tuple[str, ...] = option(
        help="files, folders or globs; .txt (blank line = document boundary), .jsonl (text field), .csv, "
        ".parquet (text column), optionally .gz/.bz2/.xz/.zst; any fsspec URL (s3://...)",
        flag="--input", nargs="+", metavar="URL")
    format: Literal["auto", "text", "jsonl", "csv", "parquet"] = option(
        "auto", "input format (auto: from the file suffix)")
    text_field: str = option("text", "JSON key / column with the text")
    one_sentence_per_line: bool = option(
        False, "inputs are already one sentence per line (Google create_pretraining_data.py layout)")
    # Size limits: part of the shard record (they decide where parts and documents are cut), not on the
    # command line; a flow run or a deployment may still set them.
    max_line_bytes: int = option(1 << 20, "longer input lines are quarantined, never held in memory",
                                 ge=1024, cli=False)
    max_doc_bytes: int = option(4 << 20, "a longer document is cut into several (counted)", ge=1024, cli=False)
    part_bytes: int = option(16 << 20, "text per corpus part: bounds the memory of shard and pairs",
                             ge=1024, cli=False)


@dataclass(frozen=True, kw_only=True)
class PairsOptions(SeedOption, StageOptions):
    tokenizer: str = option(help="tokenizer folder (tokenizer.json), e.g. ../shared/data/tokenizers/bert-base-uncased")
    max_seq_len: int = option(512, "max tokens per sequence incl. [CLS]/[SEP] (BERT's phase-2 length)",
                              ge=8, le=65536)
    short_seq_prob: float = option(0.1, "probability of a shorter random target length (as BERT)", ge=0, le=1)
    nsp: bool = option(True, "next-sentence pairs [CLS] A [SEP] B [SEP] (--no-nsp: DistilBERT/RoBERTa style "
                       "single contiguous segments)")
    bert_exact_nsp: bool = option(
        False, "BERT's exact rule: a one-sentence chunk always gets a random B (label 1). Default: split such a "
        "sentence half of the time so NSP labels stay ~50/50 on short documents")


@dataclass(frozen=True, kw_only=True)
class MaskOptions(SeedOption, StageOptions):
    mlm_prob: float = option(0.15, "share of non-special tokens to predict", gt=0, lt=1)
    whole_word_mask: bool = option(False, "mask all pieces of a word together")
    mlm_smoothing: float = option(0.0, "select tokens with weight count^-s (DistilBERT uses 0.7; 0 = uniform)",
                                  ge=0, le=2)
    max_predictions: int = option(0, "at most this many predicted tokens per sequence (0 = no cap; BERT: 20 "
                                  "at seq 128)", ge=0)
    dupe_factor: int = option(1, "number of differently masked copies of every sequence (BERT used 10)",
                              ge=1, le=100)


@dataclass(frozen=True, kw_only=True)
class RunOptions(Config):
    workers: int = option(1, "parallel worker processes, one Prefect task per unit; outputs do not depend on it",
                          ge=1, affects_output=False)
    dask_address: str | None = option(None, "run the tasks on this Dask scheduler (prefect-dask), e.g. "
                                      "tcp://HOST:8786", affects_output=False)
    dask_workers: int = option(0, "start a local Dask cluster with N worker processes", ge=0,
                               affects_output=False)
    overwrite: bool = option(False, "discard existing stage outputs (default: resume; refuse if the config "
                             "differs)", affects_output=False)


# Commands. Base order = reverse field order: options are listed shard, pairs, mask, run in --help.
@dataclass(frozen=True, kw_only=True)
class PrepareConfig(RunOptions, MaskOptions, PairsOptions, ShardOptions):
    """``distilflow prepare``: shard -> pairs -> mask."""


@dataclass(frozen=True, kw_only=True)
class ShardJobConfig(RunOptions, ShardOptions):
    """``distilflow shard``: inputs -> DIR/corpus."""


@dataclass(frozen=True, kw_only=True)
class PairsJobConfig(RunOptions, PairsOptions):
    """``distilflow pairs``: DIR/corpus -> DIR/pairs."""


@dataclass(frozen=True, kw_only=True)
class MaskJobConfig(RunOptions, MaskOptions):
    """``distilflow mask``: DIR/pairs -> DIR/masked."""


# -- the stage records (saved in config.json, fingerprinted) ------------------------------------------
def shard_record(cfg: ShardOptions) -> ShardConfig:
    from distilflow.tasks.prepare.shard import ShardConfig

    return ShardConfig(format=cfg.format, text_field=cfg.text_field, one_sentence_per_line=cfg.one_sentence_per_line,
                       max_line_bytes=cfg.max_line_bytes, max_doc_bytes=cfg.max_doc_bytes, part_bytes=cfg.part_bytes)


def pairs_record(cfg: PairsOptions, tokenizer_sha256: str) -> PairsConfig:
    from distilflow.tasks.prepare.pairs import PairsConfig

    return PairsConfig(tokenizer_sha256=tokenizer_sha256, max_seq_len=cfg.max_seq_len,
                       short_seq_prob=cfg.short_seq_prob, nsp=cfg.nsp, seed=cfg.seed,
                       balance_single_sentence=not cfg.bert_exact_nsp)


def mask_record(cfg: MaskOptions, tokenizer_sha256: str) -> MaskStageConfig:
    from distilflow.tasks.prepare.mask import MaskStageConfig

    return MaskStageConfig(tokenizer_sha256=tokenizer_sha256, mlm_prob=cfg.mlm_prob, whole_word=cfg.whole_word_mask,
                           smoothing=cfg.mlm_smoothing, max_predictions=cfg.max_predictions,
                           dupe_factor=cfg.dupe_factor, seed=cfg.seed)


_FLOWS = "distilflow.flows.prepare"
PREPARE = CommandSpec(
    PrepareConfig, run=f"{_FLOWS}:run_prepare",
    description="Corpus files -> sentence shards -> BERT sequence pairs -> static MLM masks: Parquet datasets in "
    "OUTPUT/{corpus,pairs,masked} (each opens with pyarrow, datasets, duckdb), a dataset card OUTPUT/README.md, "
    "the tokenizer in OUTPUT/tokenizer.")
SHARD = CommandSpec(ShardJobConfig, run=f"{_FLOWS}:run_shard",
                    description="Stage 1 of prepare: input files -> sentence-split documents in OUTPUT/corpus.")
PAIRS = CommandSpec(PairsJobConfig, run=f"{_FLOWS}:run_pairs",
                    description="Stage 2 of prepare: OUTPUT/corpus -> tokenized NSP pairs (or single segments) in "
                    "OUTPUT/pairs, token counts in OUTPUT/token_counts.")
MASK = CommandSpec(MaskJobConfig, run=f"{_FLOWS}:run_mask",
                   description="Stage 3 of prepare: OUTPUT/pairs -> static MLM masks in OUTPUT/masked.")
