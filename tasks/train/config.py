"""Options of ``distilflow pretrain`` and ``distilflow distill``: the config of record, one declaration each.

One :class:`TrainConfig` covers both jobs (``mode``); it is what ``OUT/train_config.json`` holds, what the
torchrun workers read back and what the resume fingerprint is taken over. The two commands differ only
in which fields they show and in DistilBERT's defaults for distillation (:data:`DISTILL_DEFAULTS`, used by
both the ``distill`` command and ``distill_flow``).

Light on purpose (no torch, no transformers): ``distilflow pretrain --help`` imports only this module.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal

from distilflow.tasks.core.config import CommandSpec, Config, option, require

# name -> (layers, hidden, heads, ffn). Widths follow Turc et al. 2019 ("Well-Read Students") names.
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (2, 64, 2, 256),
    "mini": (4, 256, 4, 1024),
    "small": (4, 512, 8, 2048),
    "base": (12, 768, 12, 3072),
}
_PRESET_HELP = ", ".join(f"{k}={v[0]}x{v[1]}" for k, v in PRESETS.items())


@dataclass(frozen=True, kw_only=True)
class TrainConfig(Config):
    mode: Literal["pretrain", "distill"] = option("pretrain", "pretrain a BERT teacher or distil a student",
                                                  cli=False)
    data: str = option(help="prepared folder or URL (from `distilflow prepare`)")
    output: str = option(help="output folder or s3:// (fsspec) URL: model, checkpoints, metrics")
    # -- models
    model: str = option("mini", f"model size: a preset ({_PRESET_HELP}) or a BertConfig .json path",
                        flag="--config")
    dropout: float = option(0.1, "hidden/attention dropout of the new model", ge=0, lt=1)
    teacher: str = option("", "teacher BERT folder (e.g. a `distilflow pretrain` output) or a hub id where a "
                              "model hub is reachable")
    student_layers: tuple[int, ...] = option((), "teacher layers copied into the student, e.g. 0,2,4,7,9,11 "
                                             "(default: that for a 12-layer teacher, every other layer "
                                             "otherwise)", sep=",", metavar="I,J,...")
    # -- data and masking
    mask_source: Literal["auto", "dynamic", "static"] = option(
        "auto", "dynamic: mask DIR/pairs afresh per batch; static: DIR/masked as stored; auto: dynamic if "
        "DIR/pairs exists")
    mlm_prob: float = option(0.15, "dynamic masking rate", gt=0, lt=1)
    whole_word: bool = option(False, "dynamic whole-word masking")
    mlm_smoothing: float = option(0.0, "frequency smoothing of dynamic masks from DIR/token_counts/token_counts.parquet "
                                       "(DistilBERT used 0.7; 0 = uniform)", ge=0, le=2)
    max_seq_len: int = option(0, "drop longer rows (0: the model's max positions)", ge=0)
    group_batches: int = option(64, "length grouping: sort by length within groups of this many batches", ge=1)
    # -- optimisation
    batch_size: int = option(32, "sequences per process per micro-batch", gt=0)
    grad_accum: int = option(1, "micro-batches per optimizer step", gt=0)
    max_steps: int = option(0, "optimizer steps (0: use --epochs)", ge=0)
    epochs: float = option(1.0, "passes over the data if --max-steps is 0", ge=0)
    lr: float = option(1e-4, "peak learning rate", gt=0)
    weight_decay: float = option(0.01, "AdamW weight decay", ge=0)
    adam_betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas", cli=False)
    adam_eps: float = option(1e-6, "AdamW epsilon", gt=0)
    warmup_steps: int = option(-1, "linear warmup steps (-1: --warmup-ratio of the steps)", ge=-1)
    warmup_ratio: float = option(0.05, "warmup as a fraction of the steps", ge=0, lt=1)
    max_grad_norm: float = option(1.0, "gradient clipping (0 = off)", ge=0)
    # -- distillation loss (DistilBERT's weights and temperature)
    temperature: float = option(2.0, "softmax temperature T", gt=0)
    alpha_ce: float = option(5.0, "weight of the KL term", ge=0)
    alpha_mlm: float = option(2.0, "weight of the MLM cross-entropy term", ge=0)
    alpha_cos: float = option(1.0, "weight of the cosine term", ge=0)
    restrict_ce_to_mask: bool = option(False, "KL term on masked positions only (default: all non-padding "
                                              "tokens)")
    # -- numerics
    seed: int = option(0, "seed of init, data order, masks, dropout")
    precision: Literal["auto", "bf16", "fp32"] = option(
        "auto", "auto: bf16 autocast on CUDA, fp32 on CPU; bf16: autocast also on a CPU with native bf16 "
        "(AVX512-BF16/AMX; ~1.7x faster steps, not bit-identical to fp32)")
    # -- run-time knobs: they never change the trained weights, so a --resume may change them
    compile: bool = option(False, "torch.compile the encoders", affects_output=False)
    log_every: int = option(10, "steps per metrics line", gt=0, affects_output=False)
    save_every: int = option(0, "checkpoint every N steps (0: at the end)", ge=0, affects_output=False)
    keep_checkpoints: int = option(2, "checkpoints kept", ge=1, affects_output=False)
    eval_data: str = option("", "held-out prepared folder: masked-token accuracy", affects_output=False)
    eval_every: int = option(0, "evaluate every N steps (0: at the end)", ge=0, affects_output=False)
    eval_sequences: int = option(2000, "held-out sequences used", ge=0, affects_output=False)
    tensorboard: bool = option(False, "also write OUT/tensorboard (if installed)", affects_output=False)
    threads: int = option(0, "torch CPU threads (0: torch's choice)", ge=0, affects_output=False)
    peak_tflops: float = option(0.0, "accelerator peak TFLOP/s for MFU (0: from the GPU name; no MFU on CPU)",
                                ge=0, affects_output=False)
    resume: bool = option(False, "continue from the last checkpoint in OUT (exact)", affects_output=False)
    launcher: Literal["auto", "inprocess", "torchrun", "subprocess"] = option(
        "auto", "auto: torchrun subprocess on CUDA hosts, in this process on CPU; subprocess: one plain "
        "process (logs streamed)", affects_output=False)
    nproc_per_node: int = option(0, "training processes on this host (0: one per visible GPU, 1 on CPU)", ge=0,
                                 affects_output=False)

    def check(self) -> None:
        n = type(self).__name__
        require(bool(self.data), n, "data", "is required (a prepared folder)")
        require(bool(self.output), n, "output", "is required")
        if self.mode == "distill":
            require(bool(self.teacher), n, "teacher", "is required for distill (a BERT model folder)")
            looks_local = self.teacher.startswith(("/", "./", "../", "~")) or os.path.exists(self.teacher)
            require(not looks_local or os.path.isfile(os.path.join(os.path.expanduser(self.teacher), "config.json")),
                    n, "teacher", f"{self.teacher}: no config.json there; give a saved model folder "
                    "(e.g. a `distilflow pretrain` output)")
        else:
            require(self.model in PRESETS or self.model.endswith(".json") or os.path.isdir(self.model), n,
                    "model", f"must be one of {sorted(PRESETS)} or a config .json path, got {self.model!r}")
        require(self.max_steps > 0 or self.epochs > 0, n, "epochs", "must be > 0 when max_steps is 0")
        require(self.alpha_ce + self.alpha_mlm + self.alpha_cos > 0, n, "alpha_ce", "some alpha must be > 0")

    def fingerprint_for_resume(self) -> str:
        """What a checkpoint must match to be resumed: every field that changes the trained weights."""
        return self.fingerprint(exclude=self.run_only_fields())


# Fields one command has and the other does not.
PRETRAIN_ONLY = ("model", "dropout")
DISTILL_ONLY = ("teacher", "student_layers", "temperature", "alpha_ce", "alpha_mlm", "alpha_cos",
                "restrict_ce_to_mask")
# DistilBERT's settings where they differ from the TrainConfig defaults (``distill`` and ``distill_flow``);
# the teacher is required there.
DISTILL_DEFAULTS: dict[str, Any] = {"lr": 5e-4, "mlm_smoothing": 0.7, "max_grad_norm": 5.0,
                                    "teacher": dataclasses.MISSING}

PRETRAIN = CommandSpec(
    TrainConfig, run="distilflow.flows.train:run_pretrain", fixed={"mode": "pretrain"}, skip=DISTILL_ONLY,
    description="BERT pretraining (BertForPreTraining: MLM + NSP) from `distilflow prepare` output. The final "
    "model in --output loads with transformers.pipeline('fill-mask') and has a model card (README.md).")
DISTILL = CommandSpec(
    TrainConfig, run="distilflow.flows.train:run_distill", fixed={"mode": "distill"}, skip=PRETRAIN_ONLY,
    defaults=DISTILL_DEFAULTS,
    description="DistilBERT distillation: student initialised from teacher layers, loss = "
    "a_ce*KL*T^2 + a_mlm*CE + a_cos*(1-cos). The student in --output loads with "
    "transformers.pipeline('fill-mask') and has a model card (README.md).")
