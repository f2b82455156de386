"""Has the search learned the task at all? Its best trial against always answering the dev
split's most frequent label.

A classifier that answers one label for every row scores that label's share of the dev
split. A best trial that does not beat this by more than the dev split's noise has not shown
that it learned anything, and the search's pick among such trials is luck: in the quality
benchmark, RTE and BoolQ at its train sizes left every arm there (LoRA's too), and which
config "won" swung the held-out score by 3-4 points either way (benchmarks/README.md). A
user should hear that before exporting the pick, with what would help: more train rows or
more epochs.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Hashable, Sequence

import optuna

from reftsearch.data.splits import TaskData
from reftsearch.search.ranking import reruns_by_trial, row_hit_rates, rows_noise, seed_runs
from reftsearch.search.record import pack_hits, unpack_hits

MAJORITY_ATTR = "dev_majority"
# A lead is evidence of learning beyond two standard errors (a one-sided ~2% chance for a
# single comparison; the best of many trials gets there by luck more often than that)
NOISE_ERRORS = 2.0


def most_frequent(labels: Sequence[Hashable]) -> tuple[Hashable, float]:
    """The most frequent of ``labels`` and its share: what a classifier that learned nothing
    scores by answering it always."""
    label, count = Counter(labels).most_common(1)[0]
    return label, count / len(labels)


def keep_majority(study: optuna.Study, data: TaskData) -> None:
    """Store the dev split's most frequent label, its share, and which rows have it (a
    classification study only); the dev rows are fixed for the study (``keep_task_data``)."""
    if data.label_names is None:
        return
    labels = [row["label"] for row in data.dev]
    label, share = most_frequent(labels)
    study.set_user_attr(
        MAJORITY_ATTR,
        {
            "label": data.label_names[label],
            "share": share,
            "hits": pack_hits([other == label for other in labels]),
        },
    )


def majority_note(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> str | None:
    """Why ``trial`` (over its seeds, where it was rerun) has not shown it learned the task,
    when it has not: its dev score leads the majority label's share by no more than
    ``NOISE_ERRORS`` standard errors of their paired difference over the dev rows. None where
    it leads by more, or where the study cannot tell (no label, or a metric that is not a
    share of rows right, such as f1: no row hits are recorded)."""
    majority = study.user_attrs.get(MAJORITY_ATTR)
    reruns = reruns_by_trial(study)  # one pass over the study's trials, for both reads below
    rows = row_hit_rates(study, trial, reruns)
    if majority is None or rows is None:
        return None
    noise = rows_noise(rows, [float(hit) for hit in unpack_hits(majority["hits"])])
    if noise is None:  # dev rows of another length: not this study's majority
        return None
    score = statistics.fmean(rows)
    lead = score - majority["share"]
    if lead > NOISE_ERRORS * noise:
        return None
    seeds = len(seed_runs(study, trial, reruns))
    over = f", mean of {seeds} seeds" if seeds > 1 else ""
    return (
        f"trial {trial.number} ({score:.4f} on dev{over}) "
        f"does not beat always answering {majority['label']!r}, the dev split's most frequent "
        f"label ({majority['share']:.4f}), by more than noise: {100 * lead:+.1f} points, where "
        f"{NOISE_ERRORS:g} standard errors are {100 * NOISE_ERRORS * noise:.1f}. The search has "
        "not shown it learned the task; more train rows or epochs may get it there (README: Is "
        "the pick real?)"
    )
