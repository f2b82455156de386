"""Seed-robust final pick: the top configs retrained with extra seeds, picked by their mean.

One-seed differences of 2-3 points are noise on small dev sets, so when the search budget is
spent the top ``finalize.top_k`` configs are trained again with each of ``finalize.seeds``.
Those runs are ordinary trials of the study, enqueued with the same parameters and marked
``finalize_of`` (the trial they repeat) and ``seed``: they show up on the dashboard, survive
a crash like any trial, and a resumed study only enqueues the runs still missing.

They train in float32 (reftsearch.run.driver). A config the search trained in 16 bits is
also rerun with its own seed, so that its mean over seeds holds float32 scores only (the
rerun's score replaces the search's for that seed: ``ranking.seed_scores``).
"""

from __future__ import annotations

import optuna

from reftsearch.models.base import EXACT_DTYPE
from reftsearch.progress import Log
from reftsearch.search.ranking import top_search_trials
from reftsearch.search.record import TrialRecord
from reftsearch.spec.study_file import FinalizeSpec, StudySpec

ALIVE = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.RUNNING,
    optuna.trial.TrialState.WAITING,
)


def enqueue_finalize(
    study: optuna.Study,
    finalize: FinalizeSpec,
    log: Log = print,
    picks: list[optuna.trial.FrozenTrial] | None = None,
) -> int:
    """Enqueue the missing (config, seed) runs of the top ``finalize.top_k`` configs (or of
    ``picks``); returns how many are waiting to run."""
    reruns = [TrialRecord.of(t) for t in study.get_trials(deepcopy=False, states=ALIVE)]
    existing = {(r.finalize_of, r.seed) for r in reruns if r.finalize_of is not None}
    for trial in top_search_trials(study, finalize.top_k) if picks is None else picks:
        for seed in (*own_seed_rerun(TrialRecord.of(trial)), *finalize.seeds):
            if (trial.number, seed) not in existing:
                rerun = TrialRecord(finalize_of=trial.number, seed=seed)
                study.enqueue_trial(trial.params, user_attrs=rerun.to_user_attrs())
                log(f"finalize: trial {trial.number} enqueued again with seed {seed}")
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    records = [TrialRecord.of(t) for t in waiting]
    # a run another process enqueued too is one run (its copy ends unrun: refuse_duplicate)
    return len({(r.finalize_of, r.seed) for r in records if r.finalize_of is not None})


def own_seed_rerun(record: TrialRecord) -> tuple[int, ...]:
    """The seed a trial trained in 16 bits is rerun with in float32 (its own); none for a
    trial trained in float32, whose own run is exact."""
    return (record.config["seed"],) if _inexact(record.dtype) else ()


def finalize_runs(spec: StudySpec, dtype: str = EXACT_DTYPE) -> int:
    """The seed reruns ``spec``'s finalize trains once a search in ``dtype`` is done: each
    top config once per extra seed, and after a 16-bit search with its own seed too."""
    if not spec.finalize:
        return 0
    return spec.finalize.top_k * (len(spec.finalize.seeds) + int(_inexact(dtype)))


def _inexact(dtype: str | None) -> bool:
    """Whether a search in ``dtype`` (None: recorded before dtypes were) is rerun in float32."""
    return dtype not in (None, EXACT_DTYPE)
