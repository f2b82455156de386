"""Dev/test metrics over whole splits (never per batch: F1 and MCC do not average)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def accuracy(predictions: Sequence, targets: Sequence) -> float:
    return sum(p == t for p, t in zip(predictions, targets, strict=True)) / max(len(targets), 1)


def macro_f1(predictions: Sequence[int], targets: Sequence[int]) -> float:
    """Unweighted mean of per-class F1 over the classes present in targets or predictions."""
    scores = []
    for label in sorted(set(targets) | set(predictions)):
        tp = sum(p == label and t == label for p, t in zip(predictions, targets, strict=True))
        fp = sum(p == label and t != label for p, t in zip(predictions, targets, strict=True))
        fn = sum(p != label and t == label for p, t in zip(predictions, targets, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / max(len(scores), 1)


def matthews(predictions: Sequence[int], targets: Sequence[int]) -> float:
    """Matthews correlation, multi-class form (Gorodkin 2004); 0 when undefined."""
    labels = sorted(set(targets) | set(predictions))
    n = len(targets)
    correct = sum(p == t for p, t in zip(predictions, targets, strict=True))
    predicted = [sum(p == k for p in predictions) for k in labels]
    actual = [sum(t == k for t in targets) for k in labels]
    numerator = correct * n - sum(p * t for p, t in zip(predicted, actual, strict=True))
    denominator = math.sqrt(n * n - sum(p * p for p in predicted)) * math.sqrt(
        n * n - sum(t * t for t in actual)
    )
    return numerator / denominator if denominator else 0.0


CLASSIFICATION_METRICS = {"accuracy": accuracy, "f1": macro_f1, "matthews": matthews}
