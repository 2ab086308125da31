"""Metric functions against hand-computed cases and against their definitions (hypothesis)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distilflow.tasks.evaluate import metrics as M


# -- classification -------------------------------------------------------------------------------------
def test_accuracy_and_f1_by_hand():
    preds = [1, 0, 1, 1, 0, 0]
    labels = [1, 1, 1, 0, 0, 0]
    assert M.accuracy(preds, labels) == pytest.approx(4 / 6)
    # TP=2 FP=1 FN=1 -> 2*2 / (4 + 1 + 1)
    assert M.f1_binary(preds, labels) == pytest.approx(4 / 6)
    # class 0 as positive: TP=2 (idx 4,5), FP=1 (idx 1), FN=1 (idx 3)
    assert M.f1_binary(preds, labels, positive=0) == pytest.approx(4 / 6)
    assert M.f1_binary([0, 0], [0, 0]) == 0.0  # no positive anywhere


def test_matthews_by_hand():
    # TP=3 TN=2 FP=1 FN=2: (3*2 - 1*2) / sqrt(4*5*3*4)
    preds = [1, 1, 1, 1, 0, 0, 0, 0]
    labels = [1, 1, 1, 0, 1, 1, 0, 0]
    expected = (3 * 2 - 1 * 2) / math.sqrt((3 + 1) * (3 + 2) * (2 + 1) * (2 + 2))
    assert M.matthews_corrcoef(preds, labels) == pytest.approx(expected)
    assert M.matthews_corrcoef([1, 0, 1], [1, 0, 1]) == pytest.approx(1.0)
    assert M.matthews_corrcoef([0, 1, 0], [1, 0, 1]) == pytest.approx(-1.0)
    assert M.matthews_corrcoef([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0  # constant predictor: 0, not NaN


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1)), min_size=2, max_size=40))
def test_matthews_binary_equals_phi_coefficient(pairs):
    p = np.array([a for a, _ in pairs])
    y = np.array([b for _, b in pairs])
    tp = np.sum((p == 1) & (y == 1))
    tn = np.sum((p == 0) & (y == 0))
    fp = np.sum((p == 1) & (y == 0))
    fn = np.sum((p == 0) & (y == 1))
    den = math.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    expected = 0.0 if den == 0 else float(tp * tn - fp * fn) / den
    assert M.matthews_corrcoef(p, y) == pytest.approx(expected, abs=1e-12)


def test_shape_mismatch_and_empty_raise():
    with pytest.raises(ValueError, match="shape"):
        M.accuracy([1, 0], [1])
    with pytest.raises(ValueError, match="no examples"):
        M.accuracy([], [])


# -- regression -----------------------------------------------------------------------------------------
def test_pearson_by_hand():
    # x = 1,2,3 ; y = 2,4,7: dx = -1,0,1 ; dy = -7/3, -1/3, 8/3
    x, y = [1, 2, 3], [2, 4, 7]
    dy = np.array([2, 4, 7]) - 13 / 3
    expected = (1 * 7 / 3 + 0 + 8 / 3) / math.sqrt(2 * float(dy @ dy))
    assert M.pearson(x, y) == pytest.approx(expected)
    assert M.pearson([1, 2, 3], [-2, -4, -6]) == pytest.approx(-1.0)
    assert math.isnan(M.pearson([1, 1, 1], [1, 2, 3]))


def test_rankdata_ties_average():
    assert M.rankdata([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert M.rankdata([3, 3, 3]).tolist() == [2.0, 2.0, 2.0]
    assert M.rankdata([2, 1, 2, 1, 5]).tolist() == [3.5, 1.5, 3.5, 1.5, 5.0]


def test_spearman_with_ties_by_hand():
    # ranks x: 1, 2.5, 2.5, 4 ; ranks y: 1, 2, 3, 4
    rx = np.array([1, 2.5, 2.5, 4]) - 2.5
    ry = np.array([1, 2, 3, 4]) - 2.5
    expected = float(rx @ ry) / math.sqrt(float(rx @ rx) * float(ry @ ry))
    assert M.spearman([1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(expected)
    # monotone but non-linear -> 1
    assert M.spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-5, 5), min_size=3, max_size=30))
def test_spearman_invariant_under_monotone_transform(xs):
    x = np.array(xs, dtype=float)
    y = np.arange(len(xs), dtype=float)
    if np.all(x == x[0]):
        return
    assert M.spearman(x, y) == pytest.approx(M.spearman(np.exp(x), y), abs=1e-12)


def test_perplexity():
    assert M.perplexity(0.0, 10) == 1.0
    assert M.perplexity(10 * math.log(4), 10) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        M.perplexity(1.0, 0)


# -- SQuAD ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, norm", [
    ("The Denver Broncos", "denver broncos"),
    ("  an   apple, a day!  ", "apple day"),
    ("the-end", "theend"),  # punctuation goes first, then "theend" is not an article
    ("(the) end", "end"),
    ("Theatre", "theatre"),  # "the" only as a whole word
    ("A", ""),
    ("\tU.S.\nArmy ", "us army"),
    ("Beyoncé's", "beyoncés"),  # only ASCII punctuation is removed, accents stay
])
def test_normalize_answer(raw, norm):
    assert M.normalize_answer(raw) == norm


def test_squad_em_f1_by_hand():
    assert M.squad_exact_match("the Broncos!", "Broncos") == 1.0
    assert M.squad_exact_match("Denver Broncos", "Broncos") == 0.0
    # pred "denver broncos team" vs gold "broncos": P = 1/3, R = 1 -> F1 = 0.5
    assert M.squad_f1("Denver Broncos team", "the Broncos") == pytest.approx(0.5)
    # duplicates count with multiplicity: pred "a b b" -> "b b" (a is an article), gold "b c": common 1
    assert M.squad_f1("a b b", "b c") == pytest.approx(2 * 0.5 * 0.5 / 1.0)
    assert M.squad_f1("", "Broncos") == 0.0
    assert M.squad_f1("the", "a") == 0.0  # both empty after normalisation: F1 0 (v1.1), EM 1
    assert M.squad_exact_match("the", "a") == 1.0


def test_squad_scores_max_over_gold_and_missing():
    gold = {"q1": ["Denver Broncos", "Broncos", "the Denver Broncos team"],
            "q2": ["1990", "in 1990"],
            "q3": ["Paris"]}
    preds = {"q1": "Broncos", "q2": "1990 season"}
    s = M.squad_scores(gold, preds)
    # q1 exact on the second answer -> EM 1, F1 1; q2: EM 0, F1 max(2/3 vs "1990", 2/3 vs "in 1990"... )
    f1_q2 = max(M.squad_f1("1990 season", "1990"), M.squad_f1("1990 season", "in 1990"))
    assert f1_q2 == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert s["exact_match"] == pytest.approx(100 * 1 / 3)
    assert s["f1"] == pytest.approx(100 * (1 + f1_q2 + 0) / 3)
    assert s["missing"] == 1 and s["questions"] == 3
