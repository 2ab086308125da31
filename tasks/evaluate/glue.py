"""GLUE tasks: file readers for the layouts found in the wild, and the task registry.

Every reader returns a :class:`GlueData` -- a list of uniform :class:`Example` (``text_a``,
``text_b`` or None, ``label``: int class id or float score) plus the bad rows as
:class:`~distilflow.tasks.core.readers.BadRecord` (file:line, reason, how to fix). One bad row never
stops the read; the caller decides how many are acceptable.

Layouts (auto-detected from the file name and the first line):

* GLUE TSV with a header (``train.tsv``/``dev.tsv``): columns found by name -- ``sentence``,
  ``sentence1``/``sentence2``, ``question``/``question1``/``question2``, ``#1 String``/``#2 String``
  (MRPC, also the MSR ``msr_paraphrase_{train,test}.txt`` files), ``label``/``Quality``/``score``/
  ``gold_label``/``is_duplicate``. Covers SST-2, MRPC, STS-B, QQP, QNLI, MNLI, RTE (GLUE's
  ``index sentence1 sentence2 label`` with string labels, and the HF export ``sentence1 sentence2
  label idx`` with 0 = entailment).
* CoLA without a header: ``source  label  original_mark  sentence`` (GLUE ``CoLA/dev.tsv`` and the
  raw ``in_domain_*.tsv`` / ``out_of_domain_dev.tsv`` files of CoLA 1.1). Files inside the official
  zip are read with an fsspec chained URL: ``zip://cola_public/raw/in_domain_train.tsv::PATH.zip``.
* SST ``stsa.binary.{train,dev,test}``: ``<0|1> <tokenised sentence>`` per line.
* STS Benchmark original ``sts-*.tsv`` without a header: ``genre file year id score s1 s2 [...]``.

Quotes are data, not CSV quoting (MRPC has unbalanced ``"``): rows are split on tabs only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import fsspec

from distilflow.tasks.core.io import exists, join, split_compression
from distilflow.tasks.core.readers import FIXES, BadRecord, iter_lines

# How to fix each kind of bad GLUE row (BadRecord.message() appends it).
FIXES.setdefault("bad_columns", "the row has the wrong number of tab-separated columns for this layout "
                                "(a tab inside a sentence?); fix or delete the row")
FIXES.setdefault("bad_label", "the label is not one of the task's labels (see the task registry)")
FIXES.setdefault("empty_text", "the sentence is empty; fix or delete the row")
FIXES.setdefault("missing_column", "the header lacks a needed column; check the file is the right task/layout")
FIXES.setdefault("unknown_layout", "use a GLUE TSV with a header, raw CoLA, stsa.binary.* or STS-B sts-*.tsv")


@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: str | None
    label: int | float
    line: int = 0  # 1-based line in the source file (for error messages and de-duplication)


@dataclass
class GlueData:
    file: str
    layout: str
    examples: list[Example] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)


@dataclass(frozen=True)
class GlueTask:
    name: str
    metrics: tuple[str, ...]  # official metric(s), first one is the headline
    num_labels: int  # 1 = regression
    labels: tuple[str, ...]  # class names in id order (id2label); () for regression
    reference: float | None  # DistilBERT model card, GLUE dev, x100
    pair: bool
    # strings found in files -> label id (GLUE's string labels; HF exports already use ids)
    label_aliases: tuple[tuple[str, int], ...] = ()
    train_files: tuple[str, ...] = ("train.tsv",)
    dev_files: tuple[str, ...] = ("dev.tsv",)

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def score_name(self) -> str:
        """What the headline number is (the model card reports the mean for MRPC/STS-B pairs)."""
        return "/".join(self.metrics)


# Reference numbers: DistilBERT model card (distilbert-base-uncased), GLUE dev.
TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in [
        GlueTask("cola", ("matthews",), 2, ("unacceptable", "acceptable"), 51.3, False,
                 train_files=("train.tsv", "in_domain_train.tsv",
                              "zip://cola_public/raw/in_domain_train.tsv::cola_public_1.1.zip"),
                 dev_files=("dev.tsv", "dev_glue_style.tsv")),
        GlueTask("sst2", ("accuracy",), 2, ("negative", "positive"), 91.3, False,
                 train_files=("train.tsv", "stsa.binary.train"),
                 dev_files=("dev.tsv", "dev_glue_style.tsv", "stsa.binary.dev")),
        GlueTask("mrpc", ("f1", "accuracy"), 2, ("not_equivalent", "equivalent"), 87.5, True,
                 train_files=("train.tsv", "msr_paraphrase_train.txt")),
        GlueTask("stsb", ("pearson", "spearman"), 1, (), 85.8, True),
        GlueTask("qqp", ("accuracy", "f1"), 2, ("not_duplicate", "duplicate"), 88.5, True),
        GlueTask("mnli", ("accuracy",), 3, ("entailment", "neutral", "contradiction"), 82.2, True,
                 label_aliases=(("entailment", 0), ("neutral", 1), ("contradiction", 2)),
                 dev_files=("dev_matched.tsv", "dev.tsv")),
        GlueTask("qnli", ("accuracy",), 2, ("entailment", "not_entailment"), 89.2, True,
                 label_aliases=(("entailment", 0), ("not_entailment", 1))),
        GlueTask("rte", ("accuracy",), 2, ("entailment", "not_entailment"), 59.9, True,
                 label_aliases=(("entailment", 0), ("not_entailment", 1))),
    ]
}

# (first, second) text columns by layout; single-sentence tasks use "sentence" (SST-2, CoLA with header)
PAIR_COLUMNS = (("sentence1", "sentence2"), ("#1 String", "#2 String"), ("question1", "question2"),
                ("question", "sentence"))  # the last one is QNLI
TEXT_A = ("sentence", "sentence1", "#1 String", "question", "question1")
LABEL = ("label", "Quality", "score", "gold_label", "is_duplicate")

Layout = Literal["auto", "glue_tsv", "cola_raw", "sst_binary", "stsb_raw"]


def get_task(name: str) -> GlueTask:
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise KeyError(f"unknown GLUE task {name!r}; known: {sorted(TASKS)}")
    return TASKS[key]


def detect_layout(url: str, first_line: str) -> str:
    name = url.rsplit("/", 1)[-1].split("::")[0]
    cols = first_line.split("\t")
    if name.startswith("stsa.binary") or (len(cols) == 1 and first_line[:2] in ("0 ", "1 ")):
        return "sst_binary"
    if any(c in cols for c in TEXT_A):
        return "glue_tsv"
    if len(cols) == 4 and cols[1] in ("0", "1"):
        return "cola_raw"
    if len(cols) >= 7 and _is_float(cols[4]):
        return "stsb_raw"
    return "unknown"


def read_glue_file(url: str, task: str | GlueTask, layout: Layout = "auto", limit: int | None = None) -> GlueData:
    """Read one GLUE-style file for ``task`` into uniform examples (+ bad rows with file:line)."""
    t = task if isinstance(task, GlueTask) else get_task(task)
    lines = _lines(url)
    data = GlueData(url, layout)
    first = next(lines, None)
    if first is None:
        data.bad.append(BadRecord(url, None, "empty_file"))
        return data
    if isinstance(first, BadRecord):
        data.bad.append(first)
        return data
    if layout == "auto":
        data.layout = detect_layout(url, first[1])
    if data.layout == "unknown":
        data.bad.append(BadRecord(url, 1, "unknown_layout", f"first line {first[1][:80]!r}"))
        return data

    def rows():
        yield first
        yield from lines

    if data.layout == "glue_tsv":
        header = first[1].split("\t")
        col_a, col_b = _text_columns(header, t.pair)
        col_y = _find(header, LABEL)
        missing = [n for n, c in (("text", col_a), ("label", col_y)) if c is None]
        if t.pair and col_b is None:
            missing.append("second sentence")
        if missing:
            data.bad.append(BadRecord(url, 1, "missing_column", f"no {missing} column in header {header}"))
            return data
        assert col_a is not None and col_y is not None  # checked above
        body = lines  # the header is consumed
        parse = _glue_tsv_parser(len(header), col_a, col_b, col_y)
    elif data.layout == "cola_raw":
        body, parse = rows(), _positional_parser(4, 3, None, 1)
    elif data.layout == "stsb_raw":
        body, parse = rows(), _positional_parser(7, 5, 6, 4, min_cols=True)
    else:  # sst_binary
        body, parse = rows(), _sst_binary_parser

    for item in body:
        if isinstance(item, BadRecord):
            data.bad.append(item)
            continue
        line_no, text = item
        if not text.strip():
            continue
        got = parse(text)
        if isinstance(got, _Bad):
            data.bad.append(BadRecord(url, line_no, got.reason, got.detail))
            continue
        a, b, raw_label = got
        label = _convert_label(raw_label, t)
        if isinstance(label, str):
            data.bad.append(BadRecord(url, line_no, "bad_label", label))
            continue
        a, b = a.strip(), (b.strip() if b is not None else None)
        if not a or (t.pair and not b):
            data.bad.append(BadRecord(url, line_no, "empty_text"))
            continue
        data.examples.append(Example(a, b if t.pair else None, label, line_no))
        if limit is not None and len(data.examples) >= limit:
            break
    return data


def _lines(url: str):
    """(line_no, text) / BadRecord per line; the file stays open while the generator lives.

    Opened through ``fsspec.open`` in a ``with`` block (not ``open_input``) because chained URLs
    such as ``zip://member::archive.zip`` close the archive when the OpenFile is garbage collected.
    """
    _, comp = split_compression(url)
    try:
        of = fsspec.open(url, "rb", compression=comp)
        f = of.__enter__()
    except (OSError, ValueError, KeyError) as e:
        yield BadRecord(url, None, "unreadable_file", f"{type(e).__name__}: {e}")
        return
    try:
        yield from iter_lines(f, url, 1 << 20)
    finally:
        of.__exit__(None, None, None)


@dataclass(frozen=True)
class _Bad:
    reason: str
    detail: str


def _text_columns(header: list[str], pair: bool) -> tuple[int | None, int | None]:
    if pair:
        for a, b in PAIR_COLUMNS:
            if a in header and b in header:
                return header.index(a), header.index(b)
        return _find(header, TEXT_A), None
    return _find(header, TEXT_A), None


def _find(header: list[str], names: tuple[str, ...]) -> int | None:
    for n in names:
        if n in header:
            return header.index(n)
    return None


def _glue_tsv_parser(n_cols: int, a: int, b: int | None, y: int):
    need = max(i for i in (a, b, y) if i is not None) + 1

    def parse(text: str):
        cols = text.split("\t")
        if len(cols) < need:
            return _Bad("bad_columns", f"{len(cols)} columns, header has {n_cols}")
        return cols[a], (cols[b] if b is not None else None), cols[y]
    return parse


def _positional_parser(n_cols: int, a: int, b: int | None, y: int, min_cols: bool = False):
    def parse(text: str):
        cols = text.split("\t")
        if len(cols) != n_cols and not (min_cols and len(cols) >= n_cols):
            return _Bad("bad_columns", f"{len(cols)} columns, expected {n_cols}")
        return cols[a], (cols[b] if b is not None else None), cols[y]
    return parse


def _sst_binary_parser(text: str):
    label, _, sentence = text.partition(" ")
    return sentence, None, label


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _convert_label(raw: str, t: GlueTask) -> int | float | str:
    """-> label id / score, or an error message (str) for a bad label."""
    raw = raw.strip()
    if t.is_regression:
        try:
            v = float(raw)
        except ValueError:
            return f"score {raw!r} is not a number"
        return v if v == v else f"score {raw!r} is NaN"
    aliases = dict(t.label_aliases)
    if raw in aliases:
        return aliases[raw]
    try:
        v = int(raw)
    except ValueError:
        return f"label {raw!r} is not one of {sorted(aliases) or list(range(t.num_labels))}"
    if not 0 <= v < t.num_labels:
        return f"label {v} out of range 0..{t.num_labels - 1}"
    return v


# -- finding a task's files in a GLUE folder ----------------------------------------------------------
@dataclass(frozen=True)
class TaskFiles:
    train: str | None
    dev: str


def find_task_files(glue_dir: str, task: str) -> TaskFiles:
    """``DIR/<task>/`` (or ``DIR/<TASK>/``, GLUE's upper case) -> the first existing train/dev file."""
    t = get_task(task)
    folder = None
    for name in (t.name, t.name.upper(), {"sst2": "SST-2", "stsb": "STS-B"}.get(t.name, t.name)):
        if exists(join(glue_dir, name)):
            folder = join(glue_dir, name)
            break
    if folder is None:
        raise FileNotFoundError(f"{glue_dir}: no folder for task {t.name!r} (expected {t.name}/ or "
                                f"{t.name.upper()}/ with {t.dev_files[0]})")

    def first(names: tuple[str, ...]) -> str | None:
        for n in names:
            if n.startswith("zip://"):
                member, _, zip_name = n[len("zip://"):].partition("::")
                if exists(join(folder, zip_name)):
                    return f"zip://{member}::{join(folder, zip_name)}"
            elif exists(join(folder, n)):
                return join(folder, n)
        return None

    dev = first(t.dev_files)
    if dev is None:
        raise FileNotFoundError(f"{folder}: no dev file for {t.name} (looked for {list(t.dev_files)})")
    return TaskFiles(first(t.train_files), dev)


def remove_overlap(train: list[Example], held_out: list[Example]) -> tuple[list[Example], int]:
    """Drop train examples whose text (pair) also occurs in ``held_out``; returns (kept, dropped).

    MRPC's ``msr_paraphrase_train.txt`` *contains* the GLUE dev pairs (GLUE's own script removes
    them by id); comparing texts does the same for any layout, and guards every task against leaks.
    """
    seen = {(e.text_a, e.text_b) for e in held_out}
    kept = [e for e in train if (e.text_a, e.text_b) not in seen]
    return kept, len(train) - len(kept)


def split_examples(examples: list[Example], frac_train: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic split by a hash of the text (stable under re-ordering and slicing of the file)."""
    import hashlib

    def h(e: Example) -> float:
        d = hashlib.sha256(f"{seed}\x00{e.text_a}\x00{e.text_b}".encode()).digest()
        return int.from_bytes(d[:8], "little") / 2**64

    train = [e for e in examples if h(e) < frac_train]
    held = [e for e in examples if h(e) >= frac_train]
    return train, held

