"""Seed-robust final pick: the top configs retrained with extra seeds, picked by their mean.

One-seed differences of 2-3 points are noise on small dev sets, so when the search budget is
spent the top ``finalize.top_k`` configs are trained again with each of ``finalize.seeds``.
Those runs are ordinary trials of the study, enqueued with the same parameters and marked
``finalize_of`` (the trial they repeat) and ``seed``: they show up on the dashboard, survive
a crash like any trial, and a resumed study only enqueues the runs still missing.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import optuna

from reftsearch.spec.study_file import FinalizeSpec

FINALIZE_OF = "finalize_of"
PAST_BUDGET = "past_budget"  # set on a trial asked once the budget was met: why it did not run
SEED = "seed"
ALIVE = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.RUNNING,
    optuna.trial.TrialState.WAITING,
)


def is_search_trial(trial: optuna.trial.FrozenTrial | optuna.Trial) -> bool:
    """Not a finalize rerun, nor a trial asked past the budget (which never ran)."""
    return FINALIZE_OF not in trial.user_attrs and PAST_BUDGET not in trial.user_attrs


def search_trials(study: optuna.Study, states=None) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=states) if is_search_trial(t)]


def top_search_trials(study: optuna.Study, k: int) -> list[optuna.trial.FrozenTrial]:
    """The ``k`` best completed search trials by their own (single-seed) dev score.

    The dev score is the first objective, also in a study that trades it off against size.
    """
    completed = search_trials(study, (optuna.trial.TrialState.COMPLETE,))
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    return sorted(completed, key=lambda t: (t.values[0], -t.number), reverse=maximize)[:k]


def enqueue_finalize(
    study: optuna.Study, finalize: FinalizeSpec, log: Callable[[str], None] = print
) -> int:
    """Enqueue the missing (config, seed) runs; returns how many are waiting to run."""
    existing = {
        (t.user_attrs[FINALIZE_OF], t.user_attrs[SEED])
        for t in study.get_trials(deepcopy=False, states=ALIVE)
        if not is_search_trial(t)
    }
    for trial in top_search_trials(study, finalize.top_k):
        for seed in finalize.seeds:
            if (trial.number, seed) not in existing:
                study.enqueue_trial(
                    trial.params, user_attrs={FINALIZE_OF: trial.number, SEED: seed}
                )
                log(f"finalize: trial {trial.number} enqueued again with seed {seed}")
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    return sum(1 for t in waiting if not is_search_trial(t))


def seed_scores(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict[int, float]:
    """Dev score per seed for a search trial: its own run plus its finalize runs."""
    scores = {trial.user_attrs["config"]["seed"]: trial.values[0]}
    for other in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if other.user_attrs.get(FINALIZE_OF) == trial.number:
            scores[other.user_attrs[SEED]] = other.value
    return scores


def seed_summary(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict | None:
    """``{seed_scores, mean, std}`` when the trial was rerun with other seeds, else None."""
    scores = seed_scores(study, trial)
    if len(scores) < 2:
        return None
    values = list(scores.values())
    return {
        "seed_scores": {str(seed): score for seed, score in sorted(scores.items())},
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values),
    }
