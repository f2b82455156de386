"""Cheap early looks at a trial beyond per-epoch dev scores, so pruners stop bad configs sooner.

**Data-fraction ladder** (``pruner: {type: successive_halving | hyperband, resource:
data_fraction}``). Rung ``k`` of ``K + 1`` trains the config from scratch, for all its epochs,
on the first ``N / rf**(K - k)`` examples of one fixed shuffle of the ``N`` training examples
(``rf`` = ``reduction_factor``; ``K`` = how often the data can shrink by ``rf`` and stay at or
above ``min_fraction``); the top rung is the whole train split. Every trial climbs the same
nested subsets, so a rung compares like with like, and a trial that reaches the top ends with
exactly the score of training on everything: its value, finalize reruns and exports mean what
they mean without a ladder. Rung ``k`` reports its dev score at step ``rf**k`` (1, 3, 9, ...:
the data relative to the first rung), where successive halving and hyperband with
``min_resource: 1`` put their rungs. Cost: a pruned trial stops after ``1 / rf**K`` of a full
training; a surviving one pays ``1 + 1/rf + 1/rf**2 + ...`` (about 1.5x for rf = 3).

**Wilcoxon** (``pruner: {type: wilcoxon}``): after each epoch a trial reports what every dev
example contributed to the metric (1 right, 0 wrong) at step ``(epoch - 1) * n_dev + i`` for
dev example ``i``; dev items and their order are fixed for the study, so the same step is the
same example after the same epoch in every trial. Optuna's ``WilcoxonPruner`` pairs those
steps with the best trial's and prunes when a signed-rank test says this trial is worse (at
``p_threshold``); trials with different epoch counts are compared on the epochs both ran. It
decides after an epoch, like the epoch pruners, but on paired examples instead of one mean
per trial. Each example is one ``Trial.report``, one storage write: with thousands of dev
examples that adds seconds per epoch.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from reftsearch.data.batches import Encoded


@dataclass(frozen=True)
class Rung:
    step: int  # reported at this step: the data relative to the first rung
    fraction: float  # of the train split
    train: list[Encoded]


def rung_count(reduction_factor: int, min_fraction: float) -> int:
    """How many rungs fit between ``min_fraction`` and the whole train split."""
    # the epsilon keeps min_fraction = 1/9, rf = 3 at three rungs despite float rounding
    return math.floor(math.log(1 / min_fraction) / math.log(reduction_factor) + 1e-9) + 1


def data_ladder(
    train: list[Encoded], reduction_factor: int, min_fraction: float, seed: int
) -> list[Rung]:
    """Nested training subsets, smallest first; the last rung is ``train`` itself."""
    top = rung_count(reduction_factor, min_fraction) - 1
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)  # the same subsets for every trial of the study
    rungs = []
    for k in range(top):
        fraction = reduction_factor ** (k - top)
        n = max(1, round(len(train) * fraction))
        rungs.append(Rung(reduction_factor**k, fraction, [train[i] for i in order[:n]]))
    return [*rungs, Rung(reduction_factor**top, 1.0, train)]


def example_steps(epoch: int, n_examples: int) -> range:
    """The steps at which the per-example dev scores of ``epoch`` are reported (Wilcoxon)."""
    return range((epoch - 1) * n_examples, epoch * n_examples)
