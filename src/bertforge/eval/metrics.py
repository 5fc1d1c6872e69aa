"""Evaluation metrics for fine-tuning tasks, and the table saying which task reports which.

Classification: `accuracy`, `f1_binary`, `matthews_corrcoef` (binary and multi-class, Gorodkin's
formula, as scikit-learn). Regression: `pearson`, `spearman` (Pearson of average-tie ranks, as
`scipy.stats.spearmanr`, written with numpy so scipy stays a dev-only dependency). Extractive QA:
`normalize_answer`, `squad_exact_match`, `squad_f1` and `squad_metrics`, written from the official
SQuAD v1.1 evaluation script's definition: normalize = lower-case, drop punctuation, drop the articles
a/an/the, collapse whitespace; EM and token F1 are the max over the gold answers; the corpus score is
the mean times 100, and a question without a prediction scores 0 (as the official script does; a
warning says how many).

`compute_task_metrics(task, predictions, references)` looks the task up in `TASK_METRICS` and returns
`{metric name: value}` with the names the GLUE/SQuAD leaderboards (and HF `evaluate`) use.
Degenerate correlation (a constant input) is `nan`, never a made-up number.
"""

from __future__ import annotations

import math
import re
import string
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from bertforge.errors import BertforgeError, require

__all__ = [
    "METRIC_FUNCTIONS",
    "TASK_METRICS",
    "accuracy",
    "compute_task_metrics",
    "f1_binary",
    "matthews_corrcoef",
    "normalize_answer",
    "pearson",
    "spearman",
    "squad_exact_match",
    "squad_f1",
    "squad_metrics",
]


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    require(len(predictions) > 0, "metric got no predictions: evaluate on a non-empty dataset")
    require(
        len(predictions) == len(references),
        f"metric got {len(predictions)} predictions but {len(references)} references: pass one prediction per example",
    )


def accuracy(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Fraction of predictions equal to the reference label."""
    _check_lengths(predictions, references)
    return float(np.mean(np.asarray(predictions) == np.asarray(references)))


def f1_binary(predictions: Sequence[int], references: Sequence[int], positive: int = 1) -> float:
    """F1 of the positive class: 2·TP / (2·TP + FP + FN); 0.0 when there is no positive at all."""
    _check_lengths(predictions, references)
    pred = np.asarray(predictions) == positive
    ref = np.asarray(references) == positive
    tp = int(np.sum(pred & ref))
    denominator = 2 * tp + int(np.sum(pred & ~ref)) + int(np.sum(~pred & ref))
    return 0.0 if denominator == 0 else 2 * tp / denominator


def matthews_corrcoef(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Matthews correlation (multi-class form); 0.0 when a marginal is constant, as scikit-learn."""
    _check_lengths(predictions, references)
    classes, encoded = np.unique(np.concatenate([np.asarray(references), np.asarray(predictions)]),
                                 return_inverse=True)
    n = len(references)
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)  # (true, predicted)
    np.add.at(confusion, (encoded[:n], encoded[n:]), 1.0)
    true_counts, pred_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    correct, total = np.trace(confusion), confusion.sum()
    numerator = correct * total - pred_counts @ true_counts
    denominator = math.sqrt((total**2 - pred_counts @ pred_counts) * (total**2 - true_counts @ true_counts))
    return 0.0 if denominator == 0 else float(numerator / denominator)


def pearson(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Pearson correlation; `nan` when either side is constant (correlation undefined)."""
    _check_lengths(predictions, references)
    x = np.asarray(predictions, dtype=np.float64) - np.mean(predictions)
    y = np.asarray(references, dtype=np.float64) - np.mean(references)
    denominator = math.sqrt(float(x @ x) * float(y @ y))
    return float("nan") if denominator == 0 else float(np.clip((x @ y) / denominator, -1.0, 1.0))


def _average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties get the mean of the ranks they span (scipy's `rankdata(method='average')`)."""
    array = np.asarray(values, dtype=np.float64)
    sorter = np.argsort(array, kind="mergesort")
    inverse = np.empty(sorter.size, dtype=np.intp)
    inverse[sorter] = np.arange(sorter.size)
    ordered = array[sorter]
    is_new = np.r_[True, ordered[1:] != ordered[:-1]]
    dense = np.cumsum(is_new)[inverse]  # 1-based tie-group index of each value
    bounds = np.r_[np.nonzero(is_new)[0], len(is_new)]  # start of each group, then n
    return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def spearman(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson of the average-tie ranks."""
    _check_lengths(predictions, references)
    return pearson(_average_ranks(predictions), _average_ranks(references))


# ---------------------------------------------------------------------------- SQuAD v1.1

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, remove punctuation, remove articles (a, an, the), collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact_match(prediction: str, gold_answers: Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized gold answer, else 0.0."""
    require(len(gold_answers) > 0, "squad_exact_match got no gold answers: pass at least one")
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(gold) for gold in gold_answers))


def _token_f1(prediction: str, gold: str) -> float:
    predicted_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    same = sum((Counter(predicted_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, gold_answers: Sequence[str]) -> float:
    """Max over gold answers of the bag-of-tokens F1 between normalized prediction and gold."""
    require(len(gold_answers) > 0, "squad_f1 got no gold answers: pass at least one")
    return max(_token_f1(prediction, gold) for gold in gold_answers)


def squad_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Corpus EM and F1 (×100) over every question in `references` ({id: [gold texts]}).

    `predictions` is the official predictions.json mapping {id: text}. A question without a prediction
    scores 0, as in the official script; predictions for ids not in `references` are ignored.
    """
    require(len(references) > 0, "squad_metrics got no reference questions: pass a non-empty {id: answers}")
    missing = [qid for qid in references if qid not in predictions]
    if missing:
        warnings.warn(f"{len(missing)} of {len(references)} questions have no prediction and score 0 "
                      f"(first: {missing[0]!r})", stacklevel=2)
    exact = f1 = 0.0
    for qid, golds in references.items():
        if qid in predictions:
            exact += squad_exact_match(predictions[qid], golds)
            f1 += squad_f1(predictions[qid], golds)
    return {"exact_match": 100.0 * exact / len(references), "f1": 100.0 * f1 / len(references)}


# ---------------------------------------------------------------------------- task table

METRIC_FUNCTIONS: dict[str, Callable[[Sequence, Sequence], float]] = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "matthews_correlation": matthews_corrcoef,
    "pearson": pearson,
    "spearmanr": spearman,
}

TASK_METRICS: dict[str, tuple[str, ...]] = {
    # GLUE (official leaderboard metrics)
    "cola": ("matthews_correlation",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "stsb": ("pearson", "spearmanr"),
    "qqp": ("accuracy", "f1"),
    "mnli": ("accuracy",),
    "mnli_matched": ("accuracy",),
    "mnli_mismatched": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
    # other sentence(-pair) tasks
    "snli": ("accuracy",),
    "sick": ("accuracy",),
    "sick_relatedness": ("pearson", "spearmanr"),
    # multiple choice
    "swag": ("accuracy",),
    "arc": ("accuracy",),
    "winogrande": ("accuracy",),
    # extractive QA: predictions {id: text}, references {id: [gold texts]}
    "squad": ("exact_match", "f1"),
}


def compute_task_metrics(task_name: str, predictions, references) -> dict[str, float]:
    """The task's official metrics, e.g. `compute_task_metrics("mrpc", preds, labels)` ->
    `{"accuracy": ..., "f1": ...}`. Classification takes label ids, regression scores, and "squad"
    takes `{id: text}` predictions with `{id: [gold texts]}` references."""
    if task_name not in TASK_METRICS:
        raise BertforgeError(f"no metrics for task {task_name!r}: use one of {', '.join(sorted(TASK_METRICS))}")
    if task_name == "squad":
        require(isinstance(predictions, Mapping) and isinstance(references, Mapping),
                "squad metrics take predictions {id: text} and references {id: [gold texts]}: pass two dicts")
        return squad_metrics(predictions, references)
    predictions, references = list(predictions), list(references)
    return {name: METRIC_FUNCTIONS[name](predictions, references) for name in TASK_METRICS[task_name]}
