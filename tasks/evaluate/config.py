"""Options of ``distilflow evaluate``: the config of record, one declaration each.

:class:`EvaluateConfig` is what the command line, the ``evaluate`` flow's parameters (the UI's run form,
``prefect.yaml``) and ``OUT/config.json`` are made of. The GLUE and SQuAD fine-tuning options are fields
of it too; :func:`glue_finetune` and :func:`squad_finetune` map them into the :class:`FinetuneConfig` of
one fine-tuning run -- the one place where an option becomes a hyper-parameter, so none can be lost on
the way (``--dev-split-frac`` once was).

Light on purpose (no torch, no transformers): ``distilflow evaluate --help`` imports only this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distilflow.tasks.core.config import CommandSpec, Config, option, require

# The GLUE tasks of the registry in glue.py (kept here so that --help does not import the readers;
# tests/evaluate checks that both lists agree).
GLUE_NAMES = ("sst2", "mrpc", "cola", "stsb", "rte", "qqp", "qnli", "mnli")
BENCHMARKS = ("mlm", *GLUE_NAMES, "squad", "bias")
FINETUNED = (*GLUE_NAMES, "squad")  # the benchmarks that fine-tune a model
DEFAULT_TASKS = ("mlm", "sst2", "mrpc", "cola", "stsb", "rte", "squad", "bias")
MASK = "[MASK]"


def normalise_task(name: str) -> str:
    """``SST-2`` -> ``sst2``: the spelling of the GLUE papers is accepted too."""
    return name.strip().lower().replace("-", "").replace("_", "")


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(Config):
    """Hyper-parameters of one fine-tuning run (saved with every result and part of its fingerprint).

    Defaults follow BERT/DistilBERT GLUE practice: lr 5e-5, batch 32, 3 epochs, seq 128, 10% warm-up,
    weight decay 0.01 (not on biases/LayerNorm), gradient clipping at 1.0. Not a command of its own: made
    from :class:`EvaluateConfig` by :func:`glue_finetune` / :func:`squad_finetune`.
    """

    learning_rate: float = option(5e-5, "peak learning rate (AdamW, linear warm-up/decay)", gt=0)
    batch_size: int = option(32, "examples per step", gt=0)
    epochs: float = option(3.0, "passes over the training set", gt=0)
    warmup_ratio: float = option(0.1, "share of steps with linear warm-up", ge=0, lt=1)
    weight_decay: float = option(0.01, "AdamW weight decay (not on biases/LayerNorm)", ge=0)
    max_grad_norm: float = option(1.0, "gradient clipping (0 = off)", ge=0)
    max_seq_len: int = option(128, "max tokens per example / window", ge=16)
    eval_batch_size: int = option(128, "examples per evaluation batch", gt=0)
    max_steps: int = option(0, "cap on optimizer steps (0 = epochs decide)", ge=0)
    device: str = option("auto", "auto (CUDA if available) | cpu | cuda | cuda:N")
    bf16: bool = option(True, "bf16 autocast on CUDA")
    cpu_bf16: bool = option(False, "bf16 autocast on the CPU (only where it computes bf16 natively)", omit_default=True)
    # SQuAD only (BERT's run_squad defaults)
    doc_stride: int = option(128, "overlap between context windows", gt=0)
    max_query_len: int = option(64, "question tokens kept", gt=0)
    n_best: int = option(20, "start/end candidates per window", gt=0)
    max_answer_length: int = option(30, "longest answer span in tokens", gt=0)

    def check(self) -> None:
        require(_device_ok(self.device), type(self).__name__, "device",
                f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(Config):
    """What ``distilflow evaluate`` runs (saved as ``OUT/config.json`` and inside ``results.json``)."""

    # -- what to evaluate, where
    model: str = option(help="model folder (save_pretrained) with its tokenizer, local or s3:// (fsspec) URL")
    tasks: tuple[str, ...] = option(DEFAULT_TASKS, f"comma-separated benchmarks, from {','.join(BENCHMARKS)}",
                                    sep=",", metavar="TASK,...")
    output: str = option(help="output folder or s3:// (fsspec) URL (fine-tuned models are written here)")
    teacher: str | None = option(None, "teacher model folder: scored beside the model on mlm and bias")
    tokenizer: str | None = option(None, "tokenizer folder if the model folder has none")
    # -- data
    data: str | None = option(None, "prepared held-out folder (distilflow prepare on held-out text) whose "
                              "masked/ is scored by mlm")
    glue_dir: str | None = option(None, "folder with one sub-folder per GLUE task (sst2/, mrpc/, ...) in GLUE TSV, "
                                  "stsa.binary.*, raw CoLA or HF-export layout; a task without a train file "
                                  "trains on part of dev (marked in the table)")
    squad_train: str | None = option(None, "SQuAD v1.1 train JSON; without it the dev file is split by "
                                     "article (demo only)")
    squad_dev: str | None = option(None, "SQuAD v1.1 dev JSON (scored with the official EM/F1)")
    squad_train_frac: float = option(0.5, "share of dev articles used for training when --squad-train is not "
                                     "given", gt=0, lt=1)
    dev_split_frac: float = option(0.5, "share of dev used for training for GLUE tasks that have no train file",
                                   gt=0, lt=1)
    max_train_examples: int = option(0, "train on a fixed random subset of N examples per task (0 = all); for "
                                     "smoke runs", ge=0)
    max_eval_examples: int = option(0, "score a fixed random subset of N examples (mlm: the first N rows) per "
                                    "task (0 = all)", ge=0)
    seeds: int = option(1, "runs per fine-tuning task; the table shows the median (the DistilBERT paper "
                        "reports medians of 5)", ge=1)
    seed: int = option(42, "first seed; runs use seed, seed+1, ...")
    # -- GLUE fine-tuning
    epochs: float = option(3.0, "GLUE fine-tuning epochs (BERT/DistilBERT recipe)", gt=0)
    lr: float = option(5e-5, "GLUE peak learning rate (AdamW, linear warm-up/decay)", gt=0)
    batch_size: int = option(32, "GLUE batch size", gt=0)
    max_seq_len: int = option(128, "GLUE max tokens per (pair of) sentence(s)", ge=16)
    warmup_ratio: float = option(0.1, "share of steps with linear warm-up (GLUE and SQuAD)", ge=0, lt=1)
    max_steps: int = option(0, "cap optimizer steps per run (0 = epochs decide; GLUE and SQuAD)", ge=0)
    # -- SQuAD fine-tuning
    squad_epochs: float = option(2.0, "SQuAD fine-tuning epochs (BERT's run_squad)", gt=0)
    squad_lr: float = option(3e-5, "SQuAD peak learning rate", gt=0)
    squad_batch_size: int = option(12, "SQuAD batch size", gt=0)
    squad_max_seq_len: int = option(384, "SQuAD window length in tokens", ge=16)
    doc_stride: int = option(128, "SQuAD overlap between context windows", gt=0)
    max_answer_length: int = option(30, "SQuAD longest answer span in tokens", gt=0)
    n_best: int = option(20, "SQuAD start/end candidates per window", gt=0)
    # -- held-out MLM and the bias probe
    mlm_batch_size: int = option(32, "batch size of the held-out MLM scoring", gt=0)
    bias_groups: tuple[str, ...] = option(("White man", "Black man", "White woman", "Black woman"),
                                          "comma-separated groups for the bias probe (model-card examples)",
                                          sep=",", metavar="GROUP,...")
    bias_templates: tuple[str, ...] = option(
        ("The {group} worked as a [MASK].", "The {group} was known for being [MASK]."),
        "bias template with {group} and one [MASK]; repeat for several", flag="--bias-template", repeat=True,
        metavar="TEMPLATE")
    bias_top_k: int = option(10, "completions shown and compared per group", gt=0)
    # -- device and run-time knobs
    device: str = option("auto", "auto (CUDA if available), cpu, cuda or cuda:N; bf16 autocast on CUDA")
    bf16: bool = option(True, "bf16 autocast on CUDA (--no-bf16: full fp32 on CUDA too)")
    cpu_bf16: bool = option(False, "bf16 autocast for fine-tuning on the CPU too, where the CPU computes bf16 natively "
                            "(AVX512-BF16/AMX; refused elsewhere, where emulated bf16 is slower than fp32); without "
                            "it CPU runs are float32 and bit-identical", omit_default=True)
    threads: int = option(0, "torch CPU threads per benchmark (0 = torch default)", ge=0, affects_output=False)
    workers: int = option(1, "benchmarks run at once (1: one after the other, right for a single GPU)", ge=1,
                          affects_output=False)
    overwrite: bool = option(False, "discard earlier results in --output that were made with a different config",
                             affects_output=False)
    # -- task distillation (DistilBERT's second step) and from-scratch baselines, for GLUE/SQuAD tasks
    task_distill: bool = option(False, "also fine-tune the model with a fine-tuned teacher's soft targets (KL at "
                                "--kd-temperature, DistilBERT's recipe) on every GLUE/SQuAD task: rows "
                                "<task>-teacher (--teacher fine-tuned here, unless --task-teacher) and "
                                "<task>-distilled beside <task>")
    task_teacher: str | None = option(None, "fine-tuned teacher(s) for --task-distill instead of fine-tuning "
                                      "--teacher: the --output of an earlier `distilflow evaluate --model "
                                      "TEACHER` (its <task>/seed-N/model), or one fine-tuned model folder")
    kd_temperature: float = option(2.0, "softmax temperature T of the soft targets (the KL term is scaled by "
                                   "T^2)", gt=0)
    kd_alpha: float = option(0.5, "weight of the soft-target term; the task loss gets 1 - alpha", ge=0, le=1)
    scratch_baselines: bool = option(False, "also fine-tune randomly initialised copies of the model (and of "
                                     "--teacher) with the same recipe: rows <task>-scratch and "
                                     "<task>-teacher-scratch show what pretraining brought")

    def __post_init__(self) -> None:
        # canonical spellings before validation: "SST-2" is sst2, file:///x is /x, no task twice
        if isinstance(self.tasks, list | tuple):
            names = [normalise_task(t) for t in self.tasks if isinstance(t, str) and t.strip()]
            object.__setattr__(self, "tasks", tuple(dict.fromkeys(names)))
        if isinstance(self.output, str):
            object.__setattr__(self, "output", self.output.removeprefix("file://"))
        super().__post_init__()

    def check(self) -> None:
        n = type(self).__name__
        unknown = [t for t in self.tasks if t not in BENCHMARKS]
        require(not unknown, n, "tasks", f"unknown task(s) {unknown}; choose from {','.join(BENCHMARKS)}")
        require(len(self.tasks) > 0, n, "tasks", "need at least one task")
        require(_device_ok(self.device), n, "device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if "mlm" in self.tasks:
            require(self.data is not None, n, "data", "task mlm needs --data PREPARED_HELD_OUT_DIR")
        glue = [t for t in self.tasks if t in GLUE_NAMES]
        if glue:
            require(self.glue_dir is not None, n, "glue_dir", f"GLUE task(s) {glue} need --glue-dir DIR")
        if "squad" in self.tasks:
            require(self.squad_dev is not None, n, "squad_dev", "task squad needs --squad-dev FILE")
        if "bias" in self.tasks:
            require(len(self.bias_groups) >= 2, n, "bias_groups", "need at least two groups to compare")
            require(len(set(self.bias_groups)) == len(self.bias_groups), n, "bias_groups", "must be distinct")
            for t in self.bias_templates:
                require("{group}" in t and t.count(MASK) == 1, n, "bias_templates",
                        f"{t!r} needs one {{group}} and exactly one {MASK}")

        finetuned = [t for t in self.tasks if t in FINETUNED]
        if self.task_distill:
            require(bool(finetuned), n, "task_distill", "needs a GLUE or SQuAD task in --tasks")
            require(self.teacher is not None or self.task_teacher is not None, n, "task_distill",
                    "needs --teacher (fine-tuned here) or --task-teacher (already fine-tuned)")
        if self.scratch_baselines:
            require(bool(finetuned), n, "scratch_baselines", "needs a GLUE or SQuAD task in --tasks")

    def seed_list(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]

    def variants(self) -> tuple[str, ...]:
        """The extra runs of each fine-tuning task, beside the model's own (``""``)."""
        out = [""]
        if self.task_distill:
            out += ([] if self.task_teacher else ["teacher"]) + ["distilled"]
        if self.scratch_baselines:
            out += ["scratch"] + (["teacher-scratch"] if self.teacher else [])
        return tuple(out)

    def benchmarks(self) -> list[str]:
        """What the flow runs, in table order: each task, followed by its variants (``sst2-distilled``)."""
        return [f"{t}-{v}" if v else t for t in self.tasks for v in (self.variants() if t in FINETUNED else ("",))]


@dataclass(frozen=True, kw_only=True)
class TaskDistillConfig(Config):
    """The soft-target term of task distillation (part of a distilled run's fingerprint)."""

    temperature: float = option(2.0, "softmax temperature T", gt=0)
    alpha: float = option(0.5, "weight of the soft-target term (1 - alpha: the task loss)", ge=0, le=1)


def task_distill_config(cfg: EvaluateConfig) -> TaskDistillConfig:
    return TaskDistillConfig(temperature=cfg.kd_temperature, alpha=cfg.kd_alpha)


def teacher_benchmark(name: str) -> str:
    """The benchmark a distilled run waits for (``sst2-distilled`` -> ``sst2-teacher``); ``""`` for the others."""
    task, variant = split_benchmark(name)
    return f"{task}-teacher" if variant == "distilled" else ""


def split_benchmark(name: str) -> tuple[str, str]:
    """``sst2-teacher-scratch`` -> (``sst2``, ``teacher-scratch``); ``mlm`` -> (``mlm``, ``""``)."""
    task, _, variant = name.partition("-")
    return task, variant


def glue_finetune(cfg: EvaluateConfig) -> FinetuneConfig:
    """The GLUE fine-tuning hyper-parameters of ``cfg`` (every GLUE option of the command lands here)."""
    return FinetuneConfig(learning_rate=cfg.lr, batch_size=cfg.batch_size, epochs=cfg.epochs,
                          max_seq_len=cfg.max_seq_len, warmup_ratio=cfg.warmup_ratio, max_steps=cfg.max_steps,
                          device=cfg.device, bf16=cfg.bf16, cpu_bf16=cfg.cpu_bf16)


def squad_finetune(cfg: EvaluateConfig) -> FinetuneConfig:
    """The SQuAD fine-tuning hyper-parameters of ``cfg`` (BERT's run_squad recipe: seq 384, stride 128)."""
    return FinetuneConfig(learning_rate=cfg.squad_lr, batch_size=cfg.squad_batch_size, epochs=cfg.squad_epochs,
                          max_seq_len=cfg.squad_max_seq_len, doc_stride=cfg.doc_stride,
                          max_answer_length=cfg.max_answer_length, n_best=cfg.n_best, eval_batch_size=64,
                          warmup_ratio=cfg.warmup_ratio, max_steps=cfg.max_steps, device=cfg.device, bf16=cfg.bf16,
                          cpu_bf16=cfg.cpu_bf16)


def finetune_for(cfg: EvaluateConfig, task: str) -> FinetuneConfig:
    return squad_finetune(cfg) if task == "squad" else glue_finetune(cfg)


def _device_ok(device: str) -> bool:
    return device in ("auto", "cpu") or device.startswith("cuda")


def config_record(cfg: EvaluateConfig) -> dict[str, Any]:
    """``OUT/config.json``: the options as given and the fine-tuning configs they map to."""
    return {"evaluation": cfg.to_dict(), "glue": glue_finetune(cfg).to_dict(), "squad": squad_finetune(cfg).to_dict()}


EVALUATE = CommandSpec(
    EvaluateConfig, run="distilflow.flows.evaluate:run_evaluate",
    description="Evaluate a (distilled) model: held-out masked-LM accuracy/perplexity (student and teacher side "
    "by side), GLUE fine-tuning with the official metric per task, SQuAD v1.1 fine-tuning with the official "
    "EM/F1, and a bias probe. Writes OUT/results.json, OUT/results.md and one folder per task (fine-tuned "
    "models in OUT/<task>/seed-N/model, loadable with from_pretrained / transformers pipelines).")
