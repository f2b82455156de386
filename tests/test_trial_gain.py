"""The expected gain of more trials, from a study's own scores (reftsearch.search.trial_gain)."""

import itertools
import json
import random
import statistics

import optuna
import pytest
from conftest import tiny_study

from reftsearch.cli import main
from reftsearch.search.record import TrialRecord
from reftsearch.search.trial_gain import MIN_SCORES, expected_best, trial_gain


@pytest.mark.parametrize("maximize", [True, False])
def test_expected_best_is_the_mean_best_over_every_draw(maximize):
    """Every ordered draw of n from the scores is equally likely: the formula must give the
    mean of their bests, enumerated."""
    scores = [random.Random(n).uniform(0, 1) for n in range(5)] + [0.5, 0.5]
    best = max if maximize else min
    for n in (1, 2, 3):
        draws = itertools.product(scores, repeat=n)
        enumerated = statistics.fmean(best(draw) for draw in draws)
        assert expected_best(scores, n, maximize) == pytest.approx(enumerated, rel=1e-12)


def test_expected_best_grows_towards_the_best_score():
    scores = [0.5, 0.6, 0.7, 0.9]
    values = [expected_best(scores, n) for n in (1, 4, 16, 64)]
    assert values[0] == pytest.approx(statistics.fmean(scores))
    assert values == sorted(values) and values[-1] == pytest.approx(0.9, abs=1e-6)
    with pytest.raises(ValueError, match="n >= 1"):
        expected_best(scores, 0)


def add_trial(study, value, state=optuna.trial.TrialState.COMPLETE, **record):
    attrs = TrialRecord(**record).to_user_attrs()
    kwargs = {"value": value} if state == optuna.trial.TrialState.COMPLETE else {}
    study.add_trial(optuna.trial.create_trial(state=state, user_attrs=attrs, **kwargs))


def test_trial_gain_reads_complete_search_trials_only():
    study = optuna.create_study(direction="maximize")
    for value in (0.6, 0.7, 0.8, 0.75):
        add_trial(study, value)
    add_trial(study, 0.99, finalize_of=2, seed=43)  # a seed rerun is not a draw of the search
    add_trial(study, None, state=optuna.trial.TrialState.PRUNED)
    assert trial_gain(study, budget=4, metric="accuracy") is None  # 4 < MIN_SCORES
    add_trial(study, 0.65)
    gain = trial_gain(study, budget=5, metric="accuracy", more=10)
    scores = [0.6, 0.7, 0.8, 0.75, 0.65]
    assert gain.scores == MIN_SCORES == 5
    assert gain.at_budget == pytest.approx(expected_best(scores, 5))
    assert gain.with_more == pytest.approx(expected_best(scores, 15))
    assert gain.per_trial == pytest.approx((gain.with_more - gain.at_budget) / 10)
    assert 0 < gain.per_trial < (0.8 - gain.at_budget) / 10
    assert "+0.0" in gain.line() and "at 5 trials" in gain.line() and "at 15" in gain.line()


def test_run_and_estimate_say_what_more_trials_add_once_the_study_has_scores(
    write_study, easy_task_files, capsys
):
    raw = tiny_study(easy_task_files, budget={"n_trials": MIN_SCORES, "max_epochs": 1})
    study = write_study(raw)
    assert main(["estimate", str(study), "--samples", "1"]) == 0
    assert (
        capsys.readouterr()
        .out.splitlines()[-1]
        .startswith("score gain per trial: not measured (no study named 't'")
    )

    assert main(["run", str(study)]) == 0
    run_output = capsys.readouterr().out.splitlines()
    assert run_output[-1].startswith("expected best dev accuracy (from the scores of 5")
    assert main(["estimate", str(study), "--samples", "1", "--json"]) == 0
    gain = json.loads(capsys.readouterr().out)["trial_gain"]
    assert gain["scores"] == MIN_SCORES and gain["budget"] == MIN_SCORES
    assert gain["with_more"] >= gain["at_budget"]
    assert main(["estimate", str(study), "--samples", "1"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("expected best dev accuracy (from the scores of 5 complete trials")
