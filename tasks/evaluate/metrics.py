"""Evaluation metrics, written from their definitions (numpy only).

GLUE's official metrics: accuracy, binary F1 (MRPC, QQP), Matthews correlation (CoLA), Pearson and
Spearman correlation (STS-B); masked-LM perplexity; and the official SQuAD v1.1 exact match / F1
(the normalisation and "max over gold answers" rules of ``evaluate-v1.1.py``).

Every function returns a plain ``float`` (fractions in [0, 1] or correlations in [-1, 1]; the result
tables multiply by 100 as the papers do). Degenerate inputs follow the usual conventions and are
documented per function (e.g. Matthews correlation is 0 when a row or column of the confusion matrix
is empty, as scikit-learn does), so a constant predictor never produces a NaN in a results table.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Iterable, Mapping, Sequence

import numpy as np


def _pair(preds: Sequence | np.ndarray, labels: Sequence | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(preds), np.asarray(labels)
    if p.shape != y.shape:
        raise ValueError(f"predictions and labels differ in shape: {p.shape} vs {y.shape}")
    if p.ndim != 1:
        raise ValueError(f"expected 1-D predictions and labels, got shape {p.shape}")
    if len(p) == 0:
        raise ValueError("no examples to score")
    return p, y


# -- classification ---------------------------------------------------------------------------------
def accuracy(preds: Sequence | np.ndarray, labels: Sequence | np.ndarray) -> float:
    p, y = _pair(preds, labels)
    return float(np.mean(p == y))


def f1_binary(preds: Sequence | np.ndarray, labels: Sequence | np.ndarray, positive: int = 1) -> float:
    """F1 of the ``positive`` class: 2·TP / (2·TP + FP + FN); 0.0 when there is no positive at all."""
    p, y = _pair(preds, labels)
    tp = int(np.sum((p == positive) & (y == positive)))
    fp = int(np.sum((p == positive) & (y != positive)))
    fn = int(np.sum((p != positive) & (y == positive)))
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2.0 * tp / denom


def matthews_corrcoef(preds: Sequence | np.ndarray, labels: Sequence | np.ndarray) -> float:
    """Matthews correlation (multi-class form of Gorodkin 2004; binary MCC as a special case).

    MCC = (c·s − Σ_k p_k·t_k) / sqrt((s² − Σ p_k²)(s² − Σ t_k²)) with c correct predictions, s samples,
    p_k / t_k the predicted / true count of class k. 0.0 when the denominator is 0 (constant predictor).
    """
    p, y = _pair(preds, labels)
    classes = np.union1d(p, y)
    p_idx, y_idx = np.searchsorted(classes, p), np.searchsorted(classes, y)
    k = len(classes)
    conf = np.zeros((k, k), dtype=np.float64)  # [true, pred]
    np.add.at(conf, (y_idx, p_idx), 1.0)
    t_k, p_k = conf.sum(axis=1), conf.sum(axis=0)
    c, s = np.trace(conf), conf.sum()
    cov_ytyp = c * s - float(t_k @ p_k)
    cov_ypyp = s * s - float(p_k @ p_k)
    cov_ytyt = s * s - float(t_k @ t_k)
    denom = math.sqrt(cov_ypyp * cov_ytyt)
    return 0.0 if denom == 0.0 else float(cov_ytyp / denom)


# -- regression -----------------------------------------------------------------------------------
def pearson(x: Sequence | np.ndarray, y: Sequence | np.ndarray) -> float:
    """Pearson r = cov(x, y) / (σx σy); NaN when either input is constant (r is undefined there)."""
    a, b = _pair(x, y)
    a, b = a.astype(np.float64), b.astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return float("nan") if denom == 0.0 else float(a @ b) / denom


def rankdata(x: Sequence | np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties get the average of the ranks they span (scipy's ``method="average"``)."""
    a = np.asarray(x, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    # group boundaries of equal values in sorted order
    new_group = np.concatenate(([True], sorted_a[1:] != sorted_a[:-1]))
    group = np.cumsum(new_group) - 1  # [n] group id per sorted position
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], len(a))  # exclusive
    avg_rank = (starts + 1 + ends) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = avg_rank[group]
    return ranks


def spearman(x: Sequence | np.ndarray, y: Sequence | np.ndarray) -> float:
    """Spearman ρ: Pearson correlation of the (tie-averaged) ranks."""
    a, b = _pair(x, y)
    return pearson(rankdata(a), rankdata(b))


# -- language modelling -----------------------------------------------------------------------------
def perplexity(total_nll: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood in nats) over ``n_tokens`` predicted tokens."""
    if n_tokens <= 0:
        raise ValueError("perplexity needs at least one predicted token")
    return float(math.exp(total_nll / n_tokens))


# -- SQuAD v1.1 (official definition) ---------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace.

    The order matters and is the official one: punctuation is removed *before* articles, so
    "the-end" -> "theend" keeps its "the", while "(the) end" -> "end".
    """
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def squad_exact_match(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def squad_f1(prediction: str, ground_truth: str) -> float:
    """Token-level F1 over normalised whitespace tokens (bag of tokens, counted with multiplicity)."""
    pred_toks = normalize_answer(prediction).split()
    gold_toks = normalize_answer(ground_truth).split()
    common = collections.Counter(pred_toks) & collections.Counter(gold_toks)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_toks)
    recall = same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def max_over_ground_truths(metric, prediction: str, ground_truths: Iterable[str]) -> float:
    scores = [metric(prediction, gt) for gt in ground_truths]
    if not scores:
        raise ValueError("a question without gold answers cannot be scored")
    return max(scores)


def squad_scores(gold: Mapping[str, Sequence[str]], predictions: Mapping[str, str]) -> dict[str, float | int]:
    """Official SQuAD v1.1 scoring: EM and F1 (×100) averaged over *all* questions in ``gold``.

    gold: question id -> list of gold answer texts; predictions: question id -> answer text.
    A question with no prediction scores 0 (counted in ``missing``), as in ``evaluate-v1.1.py``.
    """
    if not gold:
        raise ValueError("no gold questions to score")
    em = f1 = 0.0
    missing = 0
    for qid, answers in gold.items():
        if qid not in predictions:
            missing += 1
            continue
        em += max_over_ground_truths(squad_exact_match, predictions[qid], answers)
        f1 += max_over_ground_truths(squad_f1, predictions[qid], answers)
    n = len(gold)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n, "questions": n, "missing": missing}
