"""SQuAD v1.1 extractive QA: reader, features (doc stride), post-processing, official scoring.

Pipeline (the recipe of BERT's ``run_squad.py`` / transformers' ``run_qa.py``, on a fast tokenizer):

1. :func:`read_squad` -- the official JSON (``data[].paragraphs[].qas[]``) -> :class:`SquadExample`;
   malformed entries are reported as BadRecord with their JSON path, never fatal.
2. :func:`make_features` -- ``[CLS] question [SEP] context-window [SEP]``: contexts longer than
   ``max_seq_len`` are cut into windows that overlap by ``doc_stride`` tokens; the tokenizer's offset
   mapping ties every context token back to its character span. Training features carry the token
   ``start/end_positions`` of the first gold answer (or 0 = [CLS] when the answer is not inside that
   window, as in BERT).
3. :func:`postprocess` -- for each question, over all its windows, the ``n_best`` start and end logits
   give candidate spans (start <= end, length <= ``max_answer_length``, both inside the context);
   the best ``start_logit + end_logit`` is mapped back to the *original context text* via offsets.
4. :func:`score` -- official EM/F1 (:func:`distilflow.tasks.evaluate.metrics.squad_scores`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distilflow.tasks.core.io import read_bytes
from distilflow.tasks.core.readers import FIXES, BadRecord
from distilflow.tasks.evaluate.metrics import squad_scores

FIXES.setdefault("bad_squad_entry", "each qas entry needs id, question and answers [{text, answer_start}]")
FIXES.setdefault("answer_mismatch", "context[answer_start:][:len(text)] must equal the answer text; "
                                    "the example is kept for evaluation but not used for training")
FIXES.setdefault("not_squad", "the file must be SQuAD v1.1 JSON: {\"version\": \"1.1\", \"data\": [...]}")


@dataclass(frozen=True)
class SquadExample:
    id: str
    title: str
    context: str
    question: str
    answers: tuple[str, ...]
    answer_starts: tuple[int, ...]


@dataclass
class SquadData:
    file: str
    version: str
    examples: list[SquadExample] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)
    # ids whose first answer's answer_start does not point at its text (unusable as a training label)
    misaligned: set[str] = field(default_factory=set)

    def gold(self) -> dict[str, list[str]]:
        return {e.id: list(e.answers) for e in self.examples}


def read_squad(url: str, limit: int | None = None) -> SquadData:
    """Read a SQuAD v1.1 JSON file. ``limit`` keeps the first N questions (in file order)."""
    try:
        doc = json.loads(read_bytes(url))
    except (OSError, ValueError) as e:
        out = SquadData(url, "?")
        out.bad.append(BadRecord(url, None, "not_squad", f"{type(e).__name__}: {e}"))
        return out
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        out = SquadData(url, "?")
        out.bad.append(BadRecord(url, None, "not_squad", "no top-level 'data' list"))
        return out
    out = SquadData(url, str(doc.get("version", "?")))
    for i, article in enumerate(doc["data"]):
        title = str(article.get("title", "")) if isinstance(article, dict) else ""
        paragraphs = article.get("paragraphs", []) if isinstance(article, dict) else []
        for j, para in enumerate(paragraphs):
            context = para.get("context") if isinstance(para, dict) else None
            if not isinstance(context, str):
                out.bad.append(BadRecord(url, None, "bad_squad_entry", f"data[{i}].paragraphs[{j}]: no context"))
                continue
            for k, qa in enumerate(para.get("qas", [])):
                where = f"data[{i}].paragraphs[{j}].qas[{k}]"
                ex = _parse_qa(qa, title, context)
                if isinstance(ex, str):
                    out.bad.append(BadRecord(url, None, "bad_squad_entry", f"{where}: {ex}"))
                    continue
                s, t = ex.answer_starts[0], ex.answers[0]
                if context[s:s + len(t)] != t:
                    out.misaligned.add(ex.id)
                    out.bad.append(BadRecord(url, None, "answer_mismatch", f"{where} id={ex.id}"))
                out.examples.append(ex)
                if limit is not None and len(out.examples) >= limit:
                    return out
    return out


def _parse_qa(qa: Any, title: str, context: str) -> SquadExample | str:
    if not isinstance(qa, dict):
        return "not an object"
    qid, question, answers = qa.get("id"), qa.get("question"), qa.get("answers")
    if not isinstance(qid, str) or not isinstance(question, str) or not question.strip():
        return "missing id or question"
    if not isinstance(answers, list) or not answers:
        return "no answers (SQuAD v1.1 questions all have at least one)"
    texts, starts = [], []
    for a in answers:
        if not isinstance(a, dict) or not isinstance(a.get("text"), str) or not isinstance(a.get("answer_start"), int):
            return "answer without text/answer_start"
        texts.append(a["text"])
        starts.append(a["answer_start"])
    return SquadExample(qid, title, context, question.strip(), tuple(texts), tuple(starts))


def split_by_title(examples: list[SquadExample], frac_train: float, seed: int = 0) -> tuple[list, list]:
    """Demo split of one file into train / held-out by *article*, so no paragraph leaks across."""
    titles = sorted({e.title for e in examples})
    rng = np.random.default_rng(seed)
    rng.shuffle(titles)
    n_train = int(round(frac_train * len(titles)))
    if len(titles) >= 2:
        n_train = min(max(n_train, 1), len(titles) - 1)
    train_titles = set(titles[:n_train])
    return ([e for e in examples if e.title in train_titles], [e for e in examples if e.title not in train_titles])


# -- features ------------------------------------------------------------------------------------------
@dataclass
class Features:
    """Arrays of the tokenised windows (int32 [N, L] each) plus, per window, its example index."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray | None
    example_index: np.ndarray  # [N] index into the examples list
    # int32 [N, L, 2] character span of each token in the context; (-1, -1) for question/special/pad tokens
    offsets: np.ndarray
    start_positions: np.ndarray | None = None  # [N] (training)
    end_positions: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def make_features(examples: list[SquadExample], tokenizer, max_seq_len: int = 384, doc_stride: int = 128,
                  max_query_len: int = 64, train: bool = False) -> Features:
    """Tokenise (question, context) pairs into overlapping windows (see module doc)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("SQuAD features need a fast tokenizer (offset mapping); save tokenizer.json with the model")
    # Questions are truncated to max_query_len tokens first (BERT's rule), then the context gets the rest.
    questions, q_len = [], 0
    for e in examples:
        q_ids = tokenizer(e.question, add_special_tokens=False)["input_ids"]
        questions.append(e.question if len(q_ids) <= max_query_len else tokenizer.decode(q_ids[:max_query_len]))
        q_len = max(q_len, min(len(q_ids), max_query_len))
    # the tokenizer needs room for the overlap next to the longest question and 3 special tokens
    if doc_stride >= max_seq_len - q_len - 3:
        raise ValueError(f"doc_stride={doc_stride} must be < max_seq_len - question tokens ({q_len}) - 3 "
                         f"= {max_seq_len - q_len - 3}, or context windows would not advance; lower --doc-stride "
                         "or raise --squad-max-seq-len")
    enc = tokenizer(
        questions, [e.context for e in examples], truncation="only_second", max_length=max_seq_len,
        stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length",
    )
    sample_map = np.asarray(enc["overflow_to_sample_mapping"], dtype=np.int64)
    n = len(sample_map)
    # context tokens: sequence id 1 (0 = question, None = [CLS]/[SEP]/padding); everything else gets (-1, -1)
    is_ctx = np.array([[sid == 1 for sid in enc.sequence_ids(i)] for i in range(n)], dtype=bool)  # [N, L]
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int32).reshape(n, max_seq_len, 2)
    offsets[~is_ctx] = -1
    starts = np.zeros(n, dtype=np.int64)
    ends = np.zeros(n, dtype=np.int64)
    for i in range(n):
        if train:
            ex = examples[sample_map[i]]
            a_start = ex.answer_starts[0]
            a_end = a_start + len(ex.answers[0])  # exclusive char end
            ctx = np.flatnonzero(offsets[i, :, 0] >= 0)
            if len(ctx) and offsets[i, ctx[0], 0] <= a_start and offsets[i, ctx[-1], 1] >= a_end:
                # first token whose span ends after the answer start; last token starting before its end
                s_tok = ctx[np.searchsorted(offsets[i, ctx, 1], a_start, side="right")]
                e_tok = ctx[np.searchsorted(offsets[i, ctx, 0], a_end, side="left") - 1]
                starts[i], ends[i] = s_tok, e_tok
            # else: answer not fully inside this window -> both point at [CLS] (index 0)
    return Features(
        # int32 keeps a full SQuAD train set (~90k windows x 384) small; batches are cast to int64
        input_ids=np.asarray(enc["input_ids"], dtype=np.int32),
        attention_mask=np.asarray(enc["attention_mask"], dtype=np.int32),
        token_type_ids=np.asarray(enc["token_type_ids"], dtype=np.int32) if "token_type_ids" in enc else None,
        example_index=sample_map,
        offsets=offsets,
        start_positions=starts if train else None,
        end_positions=ends if train else None,
    )


# -- post-processing -----------------------------------------------------------------------------------
def postprocess(examples: list[SquadExample], features: Features, start_logits: np.ndarray,
                end_logits: np.ndarray, n_best: int = 20, max_answer_length: int = 30) -> dict[str, str]:
    """Best span per question over all its windows -> {question id: answer text from the context}.

    start_logits / end_logits: float [N, L], one row per feature (window).
    """
    best: dict[int, tuple[float, str]] = {}
    for i in range(len(features)):
        ex_i = int(features.example_index[i])
        ctx = examples[ex_i].context
        offs = features.offsets[i]
        s_log, e_log = start_logits[i], end_logits[i]
        s_top = np.argsort(s_log)[::-1][:n_best]
        e_top = np.argsort(e_log)[::-1][:n_best]
        for s in s_top:
            if offs[s, 0] < 0:
                continue
            for e in e_top:
                if offs[e, 0] < 0 or e < s or e - s + 1 > max_answer_length:
                    continue
                score = float(s_log[s] + e_log[e])
                if ex_i not in best or score > best[ex_i][0]:
                    best[ex_i] = (score, ctx[offs[s, 0]:offs[e, 1]])
    # a question none of whose windows produced a valid span answers "" (scores 0, like no answer)
    return {e.id: best.get(i, (0.0, ""))[1] for i, e in enumerate(examples)}


def score(examples: list[SquadExample], predictions: dict[str, str]) -> dict[str, float | int]:
    return squad_scores({e.id: list(e.answers) for e in examples}, predictions)
