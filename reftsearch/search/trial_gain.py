"""What more trials are expected to add to a study's best dev score, from its own trials.

Expected best of ``n`` trials (Dodge et al. 2019, "Show Your Work"): treat each trial as a
draw, with replacement, from the dev scores of the study's complete search trials. With those
``m`` scores sorted from worst to best, ``s_1 .. s_m``, the best of ``n`` draws is ``s_i``
with probability ``(i/m)**n - ((i-1)/m)**n``. The difference between ``n`` and ``n + k``
trials is what ``k`` more are expected to add. It is a measured figure, not a promise: it
assumes trials keep landing where the finished ones did (TPE usually does better than such
draws, so it is a floor for the sampler's part), and it says nothing below a handful of
scores, so none is given under ``MIN_SCORES``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import optuna

from reftsearch.search.ranking import is_maximized
from reftsearch.search.record import search_trials

MIN_SCORES = 5


def expected_best(scores: Sequence[float], n: int, maximize: bool = True) -> float:
    """The expected best of ``n`` draws with replacement from ``scores``."""
    if not scores or n < 1:
        raise ValueError(f"expected_best needs scores and n >= 1, got {len(scores)} and {n}")
    worst_first = sorted(scores, reverse=not maximize)
    m = len(worst_first)
    return sum(s * ((i / m) ** n - ((i - 1) / m) ** n) for i, s in enumerate(worst_first, 1))


@dataclass(frozen=True)
class TrialGain:
    """The expected best dev score at the study's budget, and what trials beyond it add."""

    metric: str
    scores: int  # complete search trials it is measured from
    budget: int
    at_budget: float
    more: int
    with_more: float

    @property
    def per_trial(self) -> float:
        return (self.with_more - self.at_budget) / self.more

    def line(self) -> str:
        return (
            f"expected best dev {self.metric} (from the scores of {self.scores} complete "
            f"trials, drawn at random): {self.at_budget:.4f} at {self.budget} trials, "
            f"{self.with_more:.4f} at {self.budget + self.more}: "
            f"{self.per_trial:+.4f} per trial beyond the budget"
        )


def trial_gain(study: optuna.Study, budget: int, metric: str, more: int = 10) -> TrialGain | None:
    """What ``more`` trials past ``budget`` are expected to add to ``study``'s best dev score;
    None with fewer than ``MIN_SCORES`` complete search trials."""
    complete = search_trials(study, (optuna.trial.TrialState.COMPLETE,))
    scores = [t.values[0] for t in complete]
    if len(scores) < MIN_SCORES:
        return None
    maximize = is_maximized(study)
    return TrialGain(
        metric=metric,
        scores=len(scores),
        budget=budget,
        at_budget=expected_best(scores, budget, maximize),
        more=more,
        with_more=expected_best(scores, budget + more, maximize),
    )
