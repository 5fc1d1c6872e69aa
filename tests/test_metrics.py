"""Metrics against hand-computed values (and scipy where it is installed)."""

from __future__ import annotations

import math
import random

import pytest

from bertforge.errors import BertforgeError
from bertforge.eval.metrics import (
    TASK_METRICS,
    accuracy,
    compute_task_metrics,
    f1_binary,
    matthews_corrcoef,
    normalize_answer,
    pearson,
    spearman,
    squad_exact_match,
    squad_f1,
    squad_metrics,
)

PREDS = [1, 1, 0, 0, 1]
REFS = [1, 0, 0, 1, 1]  # TP 2, FP 1, TN 1, FN 1


def test_accuracy():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert accuracy(PREDS, REFS) == pytest.approx(3 / 5)


def test_f1_binary():
    assert f1_binary(PREDS, REFS) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert f1_binary([0, 0, 0], [0, 0, 0]) == 0.0  # no positive anywhere
    assert f1_binary([1, 1, 1], [1, 1, 1]) == 1.0
    assert f1_binary(PREDS, REFS, positive=0) == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))


def test_matthews_binary_and_multiclass():
    # (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2 − 1) / sqrt(3·3·2·2)
    assert matthews_corrcoef(PREDS, REFS) == pytest.approx(1 / 6)
    assert matthews_corrcoef([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert matthews_corrcoef([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    assert matthews_corrcoef([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0  # constant prediction
    # 3 classes: c=3, s=4, t=[1,1,2], p=[2,1,1] -> (12 - 5) / sqrt((16 - 6)(16 - 6)) = 0.7
    assert matthews_corrcoef([0, 1, 2, 0], [0, 1, 2, 2]) == pytest.approx(0.7)


def test_pearson_spearman_by_hand():
    # x dev [-1, 0, 1], y dev [-7/3, -1/3, 8/3]: r = 5 / sqrt(2 · 114/9)
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    # ranks with a tie: [1, 2.5, 2.5, 4] vs [1, 3, 2, 4] -> 4.5 / sqrt(4.5 · 5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))  # undefined, not a made-up number
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5]))


def test_correlations_match_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    x = [rng.randint(0, 5) for _ in range(200)]  # many ties
    y = [xi + rng.gauss(0, 2) for xi in x]
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert spearman(y, x) == pytest.approx(stats.spearmanr(y, x)[0], abs=1e-12)


def test_metric_input_errors():
    with pytest.raises(BertforgeError, match="2 predictions but 3 references"):
        accuracy([1, 0], [1, 0, 1])
    with pytest.raises(BertforgeError, match="no predictions"):
        pearson([], [])


@pytest.mark.parametrize("text, expected", [
    ("The  Cat!", "cat"),
    ("an apple, a pear and THE end.", "apple pear and end"),
    ("theater another anthem", "theater another anthem"),  # articles only as whole words
    ("A", ""),
    ("U.S.", "us"),
    ("\tDenver \n Broncos ", "denver broncos"),
    ("rock'n'roll—(live)", "rocknroll—live"),  # ASCII punctuation only, as the official script
    ("the-end", "theend"),  # punctuation removed before articles
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_squad_em_f1_single_question():
    assert squad_exact_match("the Denver Broncos!", ["Broncos", "Denver Broncos"]) == 1.0
    assert squad_exact_match("Denver", ["Broncos", "Denver Broncos"]) == 0.0
    # pred [big, red, dog] vs gold [red, dog, barks]: 2 common -> P = R = 2/3
    assert squad_f1("the big red dog", ["red dog barks"]) == pytest.approx(2 / 3)
    # max over golds: [red dog] gives P = 2/3, R = 1 -> 0.8
    assert squad_f1("the big red dog", ["red dog barks", "a red dog"]) == pytest.approx(0.8)
    # repeated tokens count by multiplicity: x·1 + y·1 common of 3 and 3
    assert squad_f1("x x y", ["x y y"]) == pytest.approx(2 / 3)


def test_squad_empty_prediction_and_article_only_gold():
    assert squad_exact_match("", ["Paris"]) == 0.0
    assert squad_f1("", ["Paris"]) == 0.0
    # the official definition: both normalize to "" -> EM 1, but no common token -> F1 0
    assert squad_exact_match("", ["the"]) == 1.0
    assert squad_f1("", ["the"]) == 0.0


def test_squad_corpus_metrics_and_missing_prediction():
    references = {"q1": ["Paris"], "q2": ["red dog barks", "a red dog"], "q3": ["1990"]}
    predictions = {"q1": "paris.", "q2": "the big red dog", "unrelated": "x"}
    with pytest.warns(UserWarning, match="1 of 3 questions have no prediction"):
        scores = squad_metrics(predictions, references)
    assert scores["exact_match"] == pytest.approx(100 * (1 + 0 + 0) / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 0.8 + 0) / 3)


def test_compute_task_metrics_table():
    assert compute_task_metrics("mrpc", PREDS, REFS) == pytest.approx({"accuracy": 0.6, "f1": 2 / 3})
    assert compute_task_metrics("cola", PREDS, REFS) == pytest.approx({"matthews_correlation": 1 / 6})
    stsb = compute_task_metrics("stsb", [1.0, 2.0, 2.0, 3.0], [1.0, 3.0, 2.0, 4.0])
    assert set(stsb) == {"pearson", "spearmanr"}
    assert stsb["spearmanr"] == pytest.approx(4.5 / math.sqrt(22.5))
    squad = compute_task_metrics("squad", {"a": "Paris"}, {"a": ["the Paris"]})
    assert squad == {"exact_match": 100.0, "f1": 100.0}
    for task in ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "squad", "arc", "winogrande"):
        assert task in TASK_METRICS


def test_compute_task_metrics_errors():
    with pytest.raises(BertforgeError, match=r"no metrics for task 'glue'.*cola.*sst2"):
        compute_task_metrics("glue", [1], [1])
    with pytest.raises(BertforgeError, match="two dicts"):
        compute_task_metrics("squad", ["Paris"], [["Paris"]])
