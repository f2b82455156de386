"""Pruner wrappers: a warm start is never stopped, nor (under a rung pruner) a trial which
already matches the best finished one.

A warm start (a recipe, or another study's best) is a config known to train: it is there to
set the bar the sampled configs must clear, and a first epoch's score is no verdict on it.
Mid-schedule, while the learning rate is still high, dev scores swing: on MRPC (3,668 rows,
3 epochs) successive halving stopped the paper recipe's warm starts at lr 3e-3 and 1e-2
after epoch 1 (0.740 and 0.725 on 204 selection rows), which finish at 0.784 and 0.794, the
best of the recipe's lr sweep (benchmarks/README.md). So warm starts run to the end, under
every pruner.

Rung-based pruners (successive halving, Hyperband) and the median rule compare a trial only
with its peers at the same step. With the few dozen trials a ReFT search affords, that stops
trials whose dev score after epoch 3 already beats every finished trial's final score
(measured on SST-2: pruned at 0.80 while the best finished trial had 0.79). Such a trial is
not unpromising: it is the search's best lead, so it is allowed to finish. (Wilcoxon's steps
are single dev examples, whose 0/1 hits are no score to hold against a trial's value.)
"""

from __future__ import annotations

import optuna
from optuna.pruners import BasePruner

from reftsearch.search.ranking import is_maximized
from reftsearch.search.record import TrialRecord


class WarmStartsKept(BasePruner):
    """``wrapped``'s decision, except that a warm start is never pruned."""

    def __init__(self, wrapped: BasePruner) -> None:
        self.wrapped = wrapped

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        # asked for every trial: a rung pruner records each trial's rung score as it decides,
        # and a warm start's must be there for the sampled trials to be measured against
        return self.wrapped.prune(study, trial) and TrialRecord.of(trial).warm_start is None


class LeadersKept(BasePruner):
    """``wrapped``'s decision, except for a trial whose latest score is at least as good as
    the best completed trial's value."""

    def __init__(self, wrapped: BasePruner) -> None:
        self.wrapped = wrapped

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        if not self.wrapped.prune(study, trial):
            return False
        step = trial.last_step
        completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if step is None or not completed:
            return True
        score = trial.intermediate_values[step]
        if is_maximized(study):
            return score < max(t.value for t in completed)
        return score > min(t.value for t in completed)
