"""The pruner wrappers: the wrapped pruner's decision, except for warm starts (every pruner)
and trials already leading (rung pruners)."""

import optuna
import pytest
from conftest import tiny_study

from reftsearch.search.pruners import LeadersKept, WarmStartsKept
from reftsearch.search.record import TrialRecord
from reftsearch.search.study import make_pruner
from reftsearch.spec.study_file import parse_spec

WARM_START = TrialRecord(warm_start="paper-glue-lr0.01").to_user_attrs()


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return True


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_a_trial_at_least_as_good_as_the_best_finished_one_is_spared(direction):
    sign = 1 if direction == "maximize" else -1
    study = optuna.create_study(direction=direction, pruner=LeadersKept(AlwaysPrune()))
    first = study.ask()
    assert study.pruner.prune(study, study._storage.get_trial(first._trial_id))  # nothing done
    study.tell(first, sign * 0.79)

    def decision(score: float) -> bool:
        trial = study.ask()
        trial.report(sign * 0.5, 1)
        trial.report(sign * score, 2)  # the latest step decides
        pruned = trial.should_prune()
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return pruned

    assert not decision(0.80)  # beats the best finished trial: allowed to go on
    assert not decision(0.79)  # ties it
    assert decision(0.78)  # behind: the wrapped pruner's call stands


def test_the_wrapped_pruner_keeping_a_trial_is_final():
    study = optuna.create_study(pruner=LeadersKept(optuna.pruners.NopPruner()))
    study.tell(study.ask(), 0.9)
    trial = study.ask()
    trial.report(0.1, 1)
    assert not trial.should_prune()


def test_a_warm_start_is_never_pruned():
    """A recipe's first epoch is no verdict on it: it sets the bar, so it runs to the end."""
    study = optuna.create_study(direction="maximize", pruner=WarmStartsKept(AlwaysPrune()))
    study.tell(study.ask(), 0.9)
    study.enqueue_trial({}, user_attrs=WARM_START)
    warm, sampled = study.ask(), study.ask()
    for trial in (warm, sampled):
        trial.report(0.1, 1)
    assert not warm.should_prune()
    assert sampled.should_prune()


def test_a_warm_starts_rung_score_still_sets_the_bar_for_sampled_trials():
    """Successive halving records a trial's rung score when asked about it: a warm start is
    asked too (and kept), so a sampled trial far behind it at the rung is stopped."""
    halving = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    study = optuna.create_study(direction="maximize", pruner=WarmStartsKept(LeadersKept(halving)))
    study.enqueue_trial({}, user_attrs=WARM_START)
    warm = study.ask()
    warm.report(0.9, 1)
    assert not warm.should_prune()
    sampled = study.ask()
    sampled.report(0.1, 1)
    assert sampled.should_prune()


@pytest.mark.parametrize(
    "pruner",
    [
        {"type": "median", "n_startup_trials": 1},
        {"type": "successive_halving"},
        {"type": "hyperband"},
        {"type": "wilcoxon"},
    ],
)
def test_every_study_pruner_keeps_warm_starts_and_stops_the_same_scores_sampled(
    pruner, easy_task_files, tmp_path
):
    spec = parse_spec(tiny_study(easy_task_files, pruner=pruner), tmp_path)
    study = optuna.create_study(direction="maximize", pruner=make_pruner(spec))
    # wilcoxon: one 0/1 hit per dev example; the rung pruners: one score per epoch
    steps = range(48) if pruner["type"] == "wilcoxon" else [1]

    def pruned(score: float, user_attrs: dict | None = None) -> bool:
        """Whether a trial scoring ``score`` at every step is stopped (asked as the objective
        asks, which is when rung pruners record its rung score); it then finishes there."""
        study.enqueue_trial({}, user_attrs=user_attrs)
        trial = study.ask()
        for step in steps:
            trial.report(score, step)
        decision = trial.should_prune()
        study.tell(trial, score)
        return decision

    assert not pruned(1.0)
    assert not pruned(0.0, WARM_START)
    assert pruned(0.0)
