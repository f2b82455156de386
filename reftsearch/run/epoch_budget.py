"""Training compute counted in epochs, and a search budget in epochs instead of trials.

A trial records ``epochs_trained``: epochs over the whole train split, a pruned trial only
those it trained, a rung of the data ladder its share of the split
(reftsearch.search.objective). What a study spent is their sum over every trial, finalize's
seed reruns included; a trial that copied an identical finished one trained nothing. Wall
time would measure the machine as much as the search; epochs measure the same thing anywhere.

``EpochBudget`` stops a search (``run_study(..., stop=...)``) before the trial that could
take the study past its epochs, with room kept for the finalize reruns that follow: a study
run with it never trains more than the budget, and leaves less than one trial unspent.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import optuna

from reftsearch.models.base import EXACT_DTYPE
from reftsearch.search.fidelity import rung_count
from reftsearch.search.record import TrialRecord
from reftsearch.search.seed_reruns import finalize_runs
from reftsearch.spec.study_file import StudySpec


def epochs_spent(trials: Iterable[optuna.trial.FrozenTrial]) -> float:
    """The epochs ``trials`` trained, summed (over the whole train split each)."""
    return sum(TrialRecord.of(t).epochs_trained or 0.0 for t in trials)


def most_epochs_per_trial(spec: StudySpec) -> float:
    """The most one search trial of ``spec`` can train: ``budget.max_epochs``, on every rung
    of the data ladder when the pruner climbs one (a trial that survives trains on 1/rf**K,
    ..., 1/rf, then all of the split)."""
    pruner, epochs = spec.pruner, spec.budget.max_epochs
    if pruner.type in ("successive_halving", "hyperband") and pruner.resource == "data_fraction":
        top = rung_count(pruner.reduction_factor, pruner.min_fraction) - 1
        return epochs * sum(pruner.reduction_factor ** (k - top) for k in range(top + 1))
    return float(epochs)


def finalize_epochs(spec: StudySpec, dtype: str = EXACT_DTYPE) -> float:
    """The most ``spec``'s finalize reruns can train after a search in ``dtype``: each of the
    top configs once per extra seed (and its own, after a 16-bit search), every epoch on the
    whole split (a rerun is never pruned)."""
    return float(finalize_runs(spec, dtype) * spec.budget.max_epochs)


@dataclass(frozen=True)
class EpochBudget:
    """A study's training budget in epochs, search and finalize together; as ``stop``, true
    once another search trial might take the study past it."""

    epochs: float
    per_trial: float  # the most one search trial can train
    reserved: float  # kept for the finalize reruns

    @classmethod
    def of(cls, epochs: float, spec: StudySpec, dtype: str = EXACT_DTYPE) -> EpochBudget:
        """The budget of ``spec`` searched in ``dtype`` (the loaded model's:
        ``model.dtype: auto`` may be 16-bit, and its finalize then reruns one more seed)."""
        return cls(epochs, most_epochs_per_trial(spec), finalize_epochs(spec, dtype))

    def __call__(self, study: optuna.Study) -> bool:
        spent = epochs_spent(study.get_trials(deepcopy=False))
        return spent + self.per_trial + self.reserved > self.epochs
