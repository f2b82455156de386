"""Two studies (e.g. ReFT and LoRA) on one task, compared fairly.

Fair means (as the PEFT comparisons that hold up do): the same model, task and metric; the
same budget of finished trials (and wall time, if given) for each; the config picked on dev
only; and the picked config scored on test once, at the end (``search/test_split.py``). A
study that already ran further than the budget is judged on its first ``n_trials`` trials only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import optuna
import pandas as pd

from reftsearch.errors import BadInputError, ReftSearchError
from reftsearch.progress import Log
from reftsearch.run.driver import run_study
from reftsearch.run.epoch_budget import epochs_spent
from reftsearch.search.ranking import ranked
from reftsearch.search.record import TrialRecord, search_trials
from reftsearch.search.study import FINISHED_STATES
from reftsearch.search.test_split import test_score
from reftsearch.spec.study_file import StudySpec


@dataclass(frozen=True)
class ArmResult:
    """One study's outcome under the shared budget."""

    study: str
    method: str
    trials: int
    best_trial: int
    dev_score: float
    test_score: float
    n_params: int
    epochs_trained: float  # full passes over the train split, summed over the trials
    train_s: float

    def row(self, metric: str) -> dict:
        return {
            "study": self.study,
            "method": self.method,
            "trials": self.trials,
            "best trial": self.best_trial,
            f"dev {metric}": self.dev_score,
            f"test {metric}": self.test_score,
            "trainable params": self.n_params,
            "epochs trained": round(self.epochs_trained, 2),
            "train time (s)": round(self.train_s, 1),
        }


def check_comparable(a: StudySpec, b: StudySpec) -> None:
    for what, left, right in (
        ("model", a.model, b.model),
        ("task", a.task, b.task),
        ("metric", a.metric, b.metric),
    ):
        if left != right:
            raise BadInputError(
                f"compare: both studies must use the same {what}; "
                f"{a.name!r} has {left!r}, {b.name!r} has {right!r}"
            )


def compare(
    specs: list[tuple[StudySpec, str]],
    n_trials: int,
    timeout_s: float | None = None,
    log: Log = print,
) -> list[ArmResult]:
    """Run (or resume) each ``(spec, storage_url)`` to ``n_trials``, then pick and test."""
    results = []
    for spec, storage_url in specs:
        # the same budget for every arm: no seed reruns (finalize) that only one arm would get
        budget = dataclasses.replace(spec.budget, n_trials=n_trials, timeout=timeout_s)
        spec = dataclasses.replace(spec, budget=budget, finalize=None)
        log(f"== {spec.name} ({spec.method}): up to {n_trials} trials")
        study = run_study(spec, storage_url, n_trials, log=log)
        results.append(judge(spec, study, n_trials, log))
    return results


def judge(spec: StudySpec, study: optuna.Study, n_trials: int, log: Log) -> ArmResult:
    """Best of the first ``n_trials`` finished search trials on dev, then its one test score."""
    finished = sorted(search_trials(study, FINISHED_STATES), key=lambda t: t.number)[:n_trials]
    completed = [t for t in finished if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        raise ReftSearchError(f"study {spec.name!r} has no completed trial to compare")
    best = ranked(study, completed)[0]
    return ArmResult(
        study=spec.name,
        method=spec.method,
        trials=len(finished),
        best_trial=best.number,
        dev_score=best.values[0],
        test_score=test_score(spec, study, best, log=log),
        n_params=TrialRecord.of(best).n_params,
        epochs_trained=epochs_spent(finished),
        train_s=sum(TrialRecord.of(t).wall_time_s or 0.0 for t in finished),
    )


def table(results: list[ArmResult], metric: str) -> pd.DataFrame:
    return pd.DataFrame([r.row(metric) for r in results])
