"""Options of ``distilflow pipeline`` and its presets: the config of record, one declaration each.

Light on purpose (no torch, no Prefect): ``distilflow pipeline --help`` imports only this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from distilflow.tasks.core.config import CommandSpec, Config, option, require

# What a preset decides: sizes, steps and learning rates of the stages. Options that are set (non-empty)
# win over the preset's value of the same name (--vocab-size, --teacher-config).
PRESETS: dict[str, dict[str, Any]] = {
    # debug: the README's first command -- under a minute on 2 idle CPU cores, tiny models, demo corpus
    "debug": {"max_seq_len": 64, "vocab_size": 2000, "teacher_config": "debug", "pretrain_steps": 300,
              "distill_steps": 200, "batch_size": 16, "pretrain_lr": 1e-3, "distill_lr": 1e-3,
              "eval_sequences": 2000, "fill_mask_rows": 200},
    # small: real text on one GPU, or ~2 h on 2 CPU cores (pretrain 25-48 min, distill ~70 min measured)
    "small": {"max_seq_len": 128, "vocab_size": 30000, "teacher_config": "mini", "pretrain_steps": 3000,
              "distill_steps": 2000, "batch_size": 32, "pretrain_lr": 5e-4, "distill_lr": 5e-4,
              "eval_sequences": 5000, "fill_mask_rows": 1000},
    # base: BERT-base teacher at seq 512 -- meant for a GPU pool
    "base": {"max_seq_len": 512, "vocab_size": 30000, "teacher_config": "base", "pretrain_steps": 100000,
             "distill_steps": 100000, "batch_size": 32, "pretrain_lr": 1e-4, "distill_lr": 5e-4,
             "eval_sequences": 20000, "fill_mask_rows": 5000},
    # replicate: DistilBERT's claims at the scale of 2 CPU cores in <= 2 h (docs/replication.md; the sizes and
    # steps come from measured short runs, scripts/replicate_estimate.py). A corpus vocabulary of 8k keeps the
    # embeddings small beside the layers, so halving the layers removes >= 30% of the parameters.
    "replicate": {"max_seq_len": 128, "vocab_size": 8192, "teacher_config": "replicate", "pretrain_steps": 5000,
                  "distill_steps": 1500, "batch_size": 32, "pretrain_lr": 5e-4, "distill_lr": 5e-4,
                  "eval_sequences": 2000, "fill_mask_rows": 1000, **{
                      "glue_tasks": ("sst2", "mrpc"), "eval_seeds": 3, "task_distill": True, "scratch_baselines": True,
                      # lr 3e-4, not BERT's 1e-4: at 1e-4 the pretrained models under-fit SST-2 in 2 epochs (docs/replication.md)
                      "finetune": {"lr": 3e-4, "epochs": 2.0, "batch_size": 32, "max_seq_len": 128},
                      "replication": True, "speed_batch": 32,
                      # idle 2-core wall seconds: training and the small stages estimated by
                      # scripts/replicate_estimate.py (0.458 s per pretraining step); fine-tuning from the idle runs
                      # of the lr follow-up (SST-2: teacher 180 s, student 88 s per run; MRPC scaled from the first
                      # run of record), which the script's 1.7-core assumption over-estimated by ~35%
                      "estimate_seconds": {"vocab": 2, "prepare": 25, "pretrain": 2288, "distill": 769,
                                           "finetune": 3290, "evaluate-other (mlm, bias, speed, fill-mask)": 120}}},
    # replicate-tiny: the same recipe at toy sizes (tests, CI): every stage and both report files in minutes
    "replicate-tiny": {"max_seq_len": 64, "vocab_size": 1000, "teacher_config": "replicate-tiny", "pretrain_steps": 20,
                       "distill_steps": 20, "batch_size": 8, "pretrain_lr": 1e-3, "distill_lr": 1e-3,
                       "eval_sequences": 64, "fill_mask_rows": 20, **{
                           "glue_tasks": ("sst2", "mrpc"), "eval_seeds": 3, "task_distill": True,
                           "scratch_baselines": True,
                           "finetune": {"lr": 1e-3, "epochs": 1.0, "batch_size": 8, "max_seq_len": 64,
                                        "max_train_examples": 32, "max_eval_examples": 32},
                           "replication": True, "speed_batch": 8, "speed_rows": 64}},
}
PresetName = Literal["debug", "small", "base", "replicate", "replicate-tiny"]

# The debug teacher: 2 layers x 128 (smaller than the `tiny`..`base` presets of the training job would allow
# for a few-minute CPU demo while still learning the demo corpus).
DEBUG_TEACHER = {"model_type": "bert", "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "intermediate_size": 512, "max_position_embeddings": 128}
# Teacher sizes written by the pipeline itself (the other names are the training job's presets).
TEACHERS: dict[str, dict[str, Any]] = {
    "debug": DEBUG_TEACHER,
    # 6 x 256 (4 heads, FFN 1024): the student keeps 3 of its layers
    "replicate": {"model_type": "bert", "hidden_size": 256, "num_hidden_layers": 6, "num_attention_heads": 4,
                  "intermediate_size": 1024, "max_position_embeddings": 128},
    "replicate-tiny": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "intermediate_size": 64, "max_position_embeddings": 64},
}


@dataclass(frozen=True, kw_only=True)
class PipelineConfig(Config):
    """``distilflow pipeline``: corpus -> tokenizer -> teacher -> student -> evaluation -> fill-mask -> report."""

    output: str = option(help="output folder or s3:// (fsspec) URL; every stage writes a sub-folder")
    inputs: tuple[str, ...] = option((), "corpus files/folders/globs (default: the embedded demo corpus)",
                                     flag="--input", nargs="*", metavar="URL")
    heldout: tuple[str, ...] = option((), "held-out files for evaluation (default: the last input file in sorted "
                                      "order)", nargs="*", metavar="URL")
    tokenizer: str | None = option(None, "tokenizer folder (default: train a WordPiece vocabulary)")
    vocab_size: int = option(0, "vocabulary size to train (0: the preset's)", ge=0)
    cased: bool = option(False, "keep case and accents in the trained vocabulary (--uncased, the default: "
                         "lower-case and strip accents, as bert-base-uncased)", false_flags=("--uncased",))
    teacher: str | None = option(None, "a BERT model folder (default: pretrain one)")
    teacher_config: str = option("", "teacher size when pretraining: tiny|mini|base|PATH (default: the preset's)")
    preset: PresetName = option("debug", "debug (minutes on a CPU), small (real text, CPU), base (GPU), replicate "
                                "(DistilBERT's claims on 2 CPU cores, docs/replication.md), replicate-tiny (the "
                                "same at toy sizes)")
    glue_dir: str | None = option(None, "GLUE data folder (e.g. ../shared/data/glue) to fine-tune on")
    glue_tasks: tuple[str, ...] = option((), "comma list, e.g. sst2,mrpc (ignored without --glue-dir)", sep=",",
                                         metavar="TASK,...")
    squad_dev: str | None = option(None, "SQuAD v1.1 dev json (split by article for train/dev)")
    workers: int = option(1, "worker processes for the data stages", ge=1, affects_output=False)
    seed: int = option(0, "random seed")
    precision: Literal["auto", "bf16", "fp32"] = option(
        "auto", "training and fine-tuning: auto (bf16 autocast on CUDA, float32 on CPUs), bf16 (on CPUs too, where "
        "they compute bf16 natively: AVX512-BF16/AMX, ~1.7x faster training steps; refused elsewhere) or fp32",
        omit_default=True)

    def check(self) -> None:
        n = type(self).__name__
        require(bool(self.output), n, "output", "is required")
        require(not (self.heldout and not self.inputs), n, "heldout", "needs --input as well")

    def p(self, key: str, default: Any = None) -> Any:
        """A preset value, unless overridden by a non-empty field of the same name (``default``: presets
        without that key)."""
        own = getattr(self, key, None)
        return own if own else PRESETS[self.preset].get(key, default)


PIPELINE = CommandSpec(
    PipelineConfig, run="distilflow.flows.pipeline:run_pipeline",
    description="""The whole job on one command:

    distilflow pipeline --output runs/demo                     # embedded demo corpus, ~a minute
    distilflow pipeline --input ../shared/data/corpus/gutenberg --output runs/gutenberg --preset small

One parent flow; each stage is a sub-flow whose result is recorded in OUT/_pipeline/<stage>.json with the
fingerprint of its config, so a rerun skips finished stages (and a stage whose config changed runs again,
with everything downstream of it). Stages: vocab (when no --tokenizer) -> prepare (+ held-out) -> pretrain
(when no --teacher) -> distill -> evaluate -> fill-mask -> OUT/report.md.

    python scripts/replicate.py --output runs/replicate          # --preset replicate on the shared text

--preset replicate reproduces DistilBERT's claims at the scale of 2 CPU cores (~2 h): with --glue-dir it also
fine-tunes teacher, student, both from scratch and the task-distilled student on SST-2 and MRPC (3 seeds) and
writes OUT/replication.md and OUT/replication.json (docs/replication.md).""")
