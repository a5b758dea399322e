"""Metrics over (prediction, references) pairs: label metrics through scikit-learn, SQuAD exact
match / F1, and entity-level precision / recall / F1 for NER-as-text."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .tasks import INVALID, Task, read_entities

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, drop punctuation and articles, squeeze whitespace.

    >>> normalize_answer("The  Denver Broncos!")
    'denver broncos'
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def label_metrics(task: Task, predictions: Sequence[str | None], golds: Sequence[str]) -> dict[str, Any]:
    """Accuracy (an invalid prediction, None, counts as wrong), per-class precision/recall,
    confusion matrix (rows: gold, columns: predicted, last column invalid, named null), F1 for
    binary tasks (positive class = the second label, as GLUE's label 1), macro F1, and MCC when
    asked for. Labels are compared by their index, so no label word can stand for "invalid"."""
    from sklearn.metrics import confusion_matrix, f1_score, matthews_corrcoef, precision_recall_fscore_support

    labels = list(task.labels or ())
    index = {label: i for i, label in enumerate(labels)}
    invalid = len(labels)  # the column of predictions that are no label
    pred = [index.get(p, invalid) if p is not INVALID else invalid for p in predictions]
    gold = [index.get(g, invalid) for g in golds]
    n = len(golds)
    out: dict[str, Any] = {
        "accuracy": sum(p == g for p, g in zip(pred, gold) if g != invalid) / n if n else 0.0,
        "invalid": sum(p == invalid for p in pred),
    }
    if not n:
        return out
    classes = list(range(len(labels)))
    precision, recall, _, support = precision_recall_fscore_support(gold, pred, labels=classes, zero_division=0)
    out["per_class"] = {
        lab: {"precision": float(p), "recall": float(r), "support": int(s)}
        for lab, p, r, s in zip(labels, precision, recall, support)
    }
    out["macro_f1"] = float(f1_score(gold, pred, labels=classes, average="macro", zero_division=0))
    if len(labels) == 2:
        out["f1"] = float(f1_score(gold, pred, labels=[1], average=None, zero_division=0)[0])
    if "mcc" in task.extra_metrics:
        out["mcc"] = float(matthews_corrcoef(gold, pred))
    matrix = confusion_matrix(gold, pred, labels=[*classes, invalid])
    out["confusion"] = {"labels": [*labels, INVALID], "matrix": matrix[: len(labels)].tolist()}
    return out


def squad_scores(prediction: str, references: Sequence[str]) -> tuple[float, float]:
    """(exact match, token F1) of one prediction, each the max over references.

    >>> squad_scores("the Denver Broncos", ["Denver Broncos", "Broncos"])
    (1.0, 1.0)
    >>> squad_scores("Broncos of Denver", ["Denver Broncos"])
    (0.0, 0.8)
    """
    pred = normalize_answer(prediction)
    best_em = best_f1 = 0.0
    for ref in references:
        gold = normalize_answer(ref)
        best_em = max(best_em, float(pred == gold))
        p_toks, g_toks = pred.split(), gold.split()
        if not p_toks or not g_toks:
            best_f1 = max(best_f1, float(p_toks == g_toks))
            continue
        common = sum((Counter(p_toks) & Counter(g_toks)).values())
        if common:
            precision, recall = common / len(p_toks), common / len(g_toks)
            best_f1 = max(best_f1, 2 * precision * recall / (precision + recall))
    return best_em, round(best_f1, 10)


def squad_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, Any]:
    scores = [squad_scores(p, r) for p, r in zip(predictions, references)]
    n = max(1, len(scores))
    return {
        "exact_match": sum(s[0] for s in scores) / n,
        "f1": sum(s[1] for s in scores) / n,
        "empty": sum(not p.strip() for p in predictions),
    }


def _prf(tp: int, n_pred: int, n_gold: int) -> dict[str, float]:
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def entity_metrics(predictions: Sequence[str], references: Sequence[str], policy: str = "lenient") -> dict[str, Any]:
    """Micro precision/recall/F1 over (type, span) pairs, matched as multisets per sentence.
    A malformed generation is counted (``malformed``); under ``lenient`` its well-formed
    entities still count, under ``strict`` it predicts none (see :func:`read_entities`)."""
    tp: Counter = Counter()
    n_pred: Counter = Counter()
    n_gold: Counter = Counter()
    malformed = 0
    for pred_text, gold_text in zip(predictions, references):
        pred, well_formed = read_entities(pred_text, policy)
        malformed += not well_formed
        gold, _ = read_entities(gold_text)
        matched = Counter(pred) & Counter(gold)
        for (kind, _), count in matched.items():
            tp[kind] += count
        for kind, _ in pred:
            n_pred[kind] += 1
        for kind, _ in gold:
            n_gold[kind] += 1
    out = _prf(sum(tp.values()), sum(n_pred.values()), sum(n_gold.values()))
    out["per_type"] = {k: _prf(tp[k], n_pred[k], n_gold[k]) for k in sorted(set(n_gold) | set(n_pred))}
    out["malformed"] = malformed
    return out


def compute_metrics(
    task: Task, predictions: Sequence[str], references: Sequence[Sequence[str]], entity_parsing: str = "lenient"
) -> dict[str, Any]:
    if task.metric == "accuracy":
        return label_metrics(task, predictions, [r[0] for r in references])
    if task.metric == "squad":
        return squad_metrics(predictions, references)
    return entity_metrics(predictions, [r[0] for r in references], entity_parsing)


def headline(task: Task) -> str:
    """The task's headline metric: what decides the best step unless ``eval.metric`` says otherwise."""
    return {"accuracy": "accuracy", "squad": "f1", "entities": "f1"}[task.metric]


# Metric names (and counts) that are better when lower; every other metric is better when higher.
LOWER_IS_BETTER = {"ece", "invalid", "empty", "malformed", "truncated", "loss"}


def greater_is_better(name: str) -> bool:
    """Whether a higher ``name`` is better (``eval.greater_is_better`` when it is not given).

    >>> greater_is_better("accuracy"), greater_is_better("ece")
    (True, False)
    """
    return name not in LOWER_IS_BETTER


def metric_names(task: Task, mode: str) -> list[str]:
    """The numbers a validation of ``task`` in ``mode`` reports, any of which ``eval.metric`` may name."""
    if task.metric == "accuracy":
        names = (
            ["accuracy", "macro_f1", "invalid"]
            + (["f1"] if len(task.labels or ()) == 2 else [])
            + (["mcc"] if "mcc" in task.extra_metrics else [])
        )
        return names + (["ece"] if mode == "score" else ["truncated"])
    if task.metric == "squad":
        return ["exact_match", "f1", "empty", "truncated"]
    return ["precision", "recall", "f1", "malformed", "truncated"]


CALIBRATION_BINS = 15


def calibration_metrics(
    probabilities: Sequence[Sequence[float]],
    predictions: Sequence[str],
    golds: Sequence[str],
    bins: int = CALIBRATION_BINS,
) -> dict[str, Any]:
    """Expected calibration error of the top label's probability over ``bins`` equal-width bins
    (ECE = Σ_b n_b/n · |accuracy_b − confidence_b|), and the reliability curve's points, binned
    as scikit-learn's ``calibration_curve`` bins them (which draws the curve).

    >>> out = calibration_metrics([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]], ["a", "a", "b"], ["a", "b", "b"])
    >>> round(out["ece"], 4), out["calibration"]["count"]
    (0.3, [1, 1, 1])
    """
    import numpy as np
    from sklearn.calibration import calibration_curve

    confidence = np.array([max(p) for p in probabilities], dtype=float)
    correct = np.array([p == g for p, g in zip(predictions, golds)], dtype=float)
    if not len(confidence):
        return {}
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.searchsorted(edges[1:-1], confidence)  # calibration_curve's own binning
    counts = np.bincount(which, minlength=bins)
    gap = np.abs(
        np.bincount(which, weights=correct, minlength=bins) - np.bincount(which, weights=confidence, minlength=bins)
    )
    ece = float(gap.sum() / len(confidence))
    if correct.min() == correct.max():  # calibration_curve needs both outcomes; the points are direct
        accuracy = np.bincount(which, weights=correct, minlength=bins)[counts > 0] / counts[counts > 0]
        mean_conf = np.bincount(which, weights=confidence, minlength=bins)[counts > 0] / counts[counts > 0]
    else:
        accuracy, mean_conf = calibration_curve(correct, confidence, n_bins=bins, strategy="uniform")
    return {
        "ece": ece,
        "calibration": {
            "bins": bins,
            "confidence": [float(x) for x in mean_conf],
            "accuracy": [float(x) for x in accuracy],
            "count": [int(c) for c in counts[counts > 0]],
        },
    }
