"""Dev/test metrics over whole splits (never per batch: F1 and MCC do not average)."""

from __future__ import annotations

import decimal
import math
import re
from collections.abc import Sequence

# "1,234.50", "-3", "$18" -> the digits; a sentence-ending period is not a decimal point.
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
# GSM8K references end with "#### <answer>"; models trained on them learn to write it too.
_ANSWER_MARK = "####"


def matches(predictions: Sequence, targets: Sequence) -> list[bool]:
    """Per example: is the prediction the target?"""
    return [p == t for p, t in zip(predictions, targets, strict=True)]


def share(hits: Sequence[bool]) -> float:
    return sum(hits) / max(len(hits), 1)


def accuracy(predictions: Sequence, targets: Sequence) -> float:
    return share(matches(predictions, targets))


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


def normalize(text: str) -> str:
    return " ".join(text.split())


def exact_matches(outputs: Sequence[str], targets: Sequence[str]) -> list[bool]:
    """Per output: equal to its reference, up to whitespace?"""
    return matches([normalize(o) for o in outputs], [normalize(t) for t in targets])


def may_still_match(output: str, target: str) -> bool:
    """Can ``output`` continued by any text still match ``target`` exactly (up to whitespace)?

    ``normalize(output)`` is a prefix of ``normalize(output + more)`` whatever ``more`` is (the
    words it completes stay, its last one may only grow), so once it is no prefix of the
    normalized target, no continuation matches."""
    return normalize(target).startswith(normalize(output))


def exact_match(outputs: Sequence[str], targets: Sequence[str]) -> float:
    """Share of outputs equal to their reference, up to whitespace."""
    return share(exact_matches(outputs, targets))


def final_number(text: str) -> str | None:
    """The answer number of ``text`` in canonical form ("1,200.0" -> "1200"), or None.

    The first number after the last ``####`` when there is one (GSM8K's format), else the
    last number in the text (a model that reasons and then states its answer).
    """
    head, mark, tail = text.rpartition(_ANSWER_MARK)
    numbers = _NUMBER.findall(tail) if mark else _NUMBER.findall(head + tail)
    if not numbers:
        return None
    number = numbers[0] if mark else numbers[-1]
    return format(decimal.Decimal(number.replace(",", "")).normalize(), "f")


def final_number_matches(outputs: Sequence[str], targets: Sequence[str]) -> list[bool]:
    """Per output: is its final number the reference's?"""
    answers = [final_number(t) for t in targets]
    return [
        answer is not None and final_number(output) == answer
        for output, answer in zip(outputs, answers, strict=True)
    ]


def final_number_match(outputs: Sequence[str], targets: Sequence[str]) -> float:
    """Share of outputs whose final number equals the reference's (GSM8K's exact match)."""
    return share(final_number_matches(outputs, targets))


CLASSIFICATION_METRICS = {"accuracy": accuracy, "f1": macro_f1, "matthews": matthews}
GENERATION_METRICS = {"exact_match": exact_match, "final_number": final_number_match}
# generation metrics that can tell from an output's beginning that it will not match: a
# row's decoding may stop there (a final number can come at any point: not that one)
MAY_STILL_MATCH = {"exact_match": may_still_match}
# metrics that are the share of examples right: what each example contributes (1 or 0), in
# order; Wilcoxon pruning pairs these example by example between trials
PER_EXAMPLE = {
    "accuracy": matches,
    "exact_match": exact_matches,
    "final_number": final_number_matches,
}
