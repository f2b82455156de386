"""The quality benchmark's accounting: its paired bootstrap interval, and equal compute in
epochs (``reftsearch.run.epoch_budget``), on tiny models only."""

import importlib.util
import random
import sys
from pathlib import Path

import optuna
import pytest
from conftest import SHARED_DATA, tiny_study

from reftsearch.run.driver import run_study
from reftsearch.run.epoch_budget import (
    EpochBudget,
    epochs_spent,
    finalize_epochs,
    most_epochs_per_trial,
)
from reftsearch.search.record import TrialRecord, search_trials
from reftsearch.spec.study_file import load_spec

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark_module(name: str):
    """A module of benchmarks/ (a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bootstrap = load_benchmark_module("paired_bootstrap")


def hits(rng: random.Random, n: int, accuracy: float) -> list[bool]:
    return [rng.random() < accuracy for _ in range(n)]


def test_arms_of_equal_accuracy_give_an_interval_around_zero():
    rng = random.Random(0)
    tasks = [
        bootstrap.TaskPairs(
            f"task{t}", {s: (hits(rng, 400, 0.8), hits(rng, 400, 0.8)) for s in (1, 2, 3)}
        )
        for t in range(2)
    ]
    interval = bootstrap.paired_bootstrap(tasks, resamples=4000)
    assert interval.low < 0 < interval.high
    assert interval.low <= interval.mean <= interval.high
    # independent arms over 2 x 400 rows x 3 seeds: a few points wide, not zero, not 20
    assert 1.5 < interval.high - interval.low < 8
    identical = bootstrap.TaskPairs("same", {1: (hits(rng, 50, 0.5),) * 2})
    assert bootstrap.paired_bootstrap([identical]) == bootstrap.Interval(0.0, 0.0, 0.0)


def test_a_constant_shift_is_recovered():
    rng = random.Random(1)
    seeds = {}
    for seed in (1, 2, 3):
        paper = hits(rng, 500, 0.7)
        wrong = [i for i, hit in enumerate(paper) if not hit]
        searched = list(paper)
        for i in rng.sample(wrong, 25):  # 25 of 500 rows more: +5 points, every seed
            searched[i] = True
        seeds[seed] = (paper, searched)
    interval = bootstrap.paired_bootstrap([bootstrap.TaskPairs("t", seeds)], resamples=4000)
    assert interval.mean == pytest.approx(5.0)
    # paired: only the 25 changed rows vary between draws, so the interval is narrow
    assert 3.0 < interval.low < 5.0 < interval.high < 7.0
    assert interval.line("mean_searched_minus_paper").startswith(
        "mean_searched_minus_paper=+5.0 ci95=[+"
    )


def test_every_seed_is_scored_on_the_same_draw_of_rows():
    rng = random.Random(2)
    paper, searched = hits(rng, 300, 0.6), hits(rng, 300, 0.7)
    one = bootstrap.paired_bootstrap([bootstrap.TaskPairs("t", {1: (paper, searched)})])
    three = bootstrap.paired_bootstrap(
        [bootstrap.TaskPairs("t", {s: (paper, searched) for s in (1, 2, 3)})]
    )
    # three seeds that score alike are one seed's evidence, not three times the rows
    assert three == one
    with pytest.raises(ValueError, match="same rows"):
        bootstrap.TaskPairs("t", {1: (paper, searched[:-1])}).row_differences()


def test_the_standard_error_is_the_spread_of_the_bootstraps_draws():
    rng = random.Random(3)
    small = bootstrap.TaskPairs("small", {1: (hits(rng, 100, 0.5), hits(rng, 100, 0.5))})
    large = bootstrap.TaskPairs("large", {1: (hits(rng, 1600, 0.5), hits(rng, 1600, 0.5))})
    # two coin-flipping arms: row differences of sd ~0.7, so ~7 points on 100 rows, 16x the
    # rows for a quarter of it
    assert 5.5 < small.standard_error() < 8.5
    assert large.standard_error() == pytest.approx(small.standard_error() / 4, rel=0.25)
    mean_se = bootstrap.standard_error_of_mean([small, large])
    assert mean_se == pytest.approx(
        (small.standard_error() ** 2 + large.standard_error() ** 2) ** 0.5 / 2
    )
    interval = bootstrap.paired_bootstrap([small, large], resamples=10_000)
    assert interval.high - interval.low == pytest.approx(2 * 1.96 * mean_se, rel=0.1)
    identical = bootstrap.TaskPairs("same", {1: (hits(rng, 50, 0.5),) * 2})
    assert identical.standard_error() == 0.0


def test_epochs_spent_counts_every_trial_by_what_it_trained():
    study = optuna.create_study(direction="maximize")
    done = optuna.trial.TrialState
    for state, record, value in (
        (done.COMPLETE, TrialRecord(epochs_trained=3.0), 0.8),
        (done.PRUNED, TrialRecord(epochs_trained=1.0, pruned_at_epoch=1), None),
        (done.PRUNED, TrialRecord(epochs_trained=0.4444), None),  # data-ladder rungs
        (done.FAIL, TrialRecord(epochs_trained=2.0, fail_reason="diverged"), None),
        (done.COMPLETE, TrialRecord(epochs_trained=3.0, finalize_of=0, seed=43), 0.7),
        (done.COMPLETE, TrialRecord(copied_from=0), 0.8),  # trained nothing
        (done.PRUNED, TrialRecord(invalid_reason="no position"), None),
    ):
        study.add_trial(
            optuna.trial.create_trial(state=state, value=value, user_attrs=record.to_user_attrs())
        )
    assert epochs_spent(study.trials) == pytest.approx(9.4444)
    assert epochs_spent(search_trials(study)) == pytest.approx(6.4444)


def test_the_budget_keeps_room_for_a_whole_trial_and_the_reruns(write_study, easy_task_files):
    raw = tiny_study(easy_task_files, budget={"n_trials": 50, "max_epochs": 2})
    raw["finalize"] = {"top_k": 2, "seeds": [7, 8]}
    spec = load_spec(write_study(raw))
    assert (most_epochs_per_trial(spec), finalize_epochs(spec)) == (2.0, 8.0)
    # after a 16-bit search each top config is rerun with its own seed too, in float32
    assert finalize_epochs(spec, "bfloat16-mixed") == 12.0
    assert EpochBudget.of(20.0, spec, "bfloat16-mixed").reserved == 12.0
    budget = EpochBudget.of(20.0, spec)
    study = optuna.create_study()
    for spent in (4.0, 5.0, 1.0):  # 10 of 20: one more trial (2) and the reruns (8) fit
        study.add_trial(
            optuna.trial.create_trial(
                state=optuna.trial.TrialState.PRUNED,
                user_attrs=TrialRecord(epochs_trained=spent).to_user_attrs(),
            )
        )
    assert not budget(study)
    study.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.PRUNED,
            user_attrs=TrialRecord(epochs_trained=0.5).to_user_attrs(),
        )
    )
    assert budget(study)  # 10.5 + 2 + 8 > 20
    raw["pruner"] = {"type": "hyperband", "resource": "data_fraction", "min_fraction": 0.1}
    ladder = load_spec(write_study(raw, "ladder.yaml"))
    assert most_epochs_per_trial(ladder) == pytest.approx(2 * (1 / 9 + 1 / 3 + 1))


def test_a_searched_arm_stops_where_the_paper_arms_spend_is_met(write_study, easy_task_files):
    """The benchmark's two arms on a tiny model: the paper's lr grid with two seed reruns of
    its pick, then a pruned search whose budget is the epochs the paper arm spent."""
    paper_raw = tiny_study(
        easy_task_files,
        name="paper",
        budget={"n_trials": 3, "max_epochs": 2},
        sampler="grid",
        finalize={"top_k": 1, "seeds": [4, 5]},
    )
    paper_raw["space"].update(rank=1, suffix=0, lr=[1e-3, 3e-3, 1e-2])
    paper = load_spec(write_study(paper_raw, "paper.yaml"))
    paper_study = run_study(paper, paper.storage, log=lambda _: None)
    # a grid's every point is visited before finalize: both reruns still run
    reruns = [TrialRecord.of(t) for t in paper_study.trials if TrialRecord.of(t).finalize_of]
    assert sorted(r.seed for r in reruns) == [4, 5]
    spent = epochs_spent(paper_study.trials)
    assert spent == 3 * 2 + 2 * 2

    searched_raw = tiny_study(
        easy_task_files,
        name="searched",
        budget={"n_trials": 1000, "max_epochs": 2},
        pruner={"type": "median", "n_startup_trials": 1},
        finalize={"top_k": 1, "seeds": [4, 5]},
    )
    searched_raw["space"].update(lr={"low": 1e-5, "high": 1e-2, "log": True})
    searched = load_spec(write_study(searched_raw, "searched.yaml"))
    budget = EpochBudget.of(spent, searched)
    study = run_study(searched, searched.storage, log=lambda _: None, stop=budget)
    search = epochs_spent(search_trials(study))
    total = epochs_spent(study.trials)
    # of the paper arm's 10 epochs, 4 go to the two reruns: the search stopped before a trial
    # (2 at most) that could take it past the other 6, so within one trial of them
    assert 6 - 2 < search <= 6
    assert total == search + 2 * 2 <= spent
    assert budget(study) and len(search_trials(study)) < 1000
    # quality.py --workdir: the same arm run again on its kept study trains nothing more
    again = run_study(searched, searched.storage, log=lambda _: None, stop=budget)
    assert len(again.trials) == len(study.trials) and epochs_spent(again.trials) == total


def test_a_kept_workdir_refuses_task_files_of_other_rows(tmp_path):
    if not (SHARED_DATA / "sst2" / "train.tsv").exists():
        pytest.skip("needs ../shared/data/sst2")
    quality = load_benchmark_module("quality")
    sst2 = quality.TASKS["sst2"]
    files = quality.write_task_files(sst2, 40, tmp_path)
    written = files.train.read_text()
    assert len(written.splitlines()) == 40
    assert quality.write_task_files(sst2, 40, tmp_path) == files  # the same rows: resumed
    # SST-2's validation rows, 444 of 872 positive, halve into 231 of 436 and 223 of 436 negative
    assert "scores 53.0% on the selection half, 51.1% on the report half" in files.counts
    with pytest.raises(quality.OtherRowsError, match="sst2-train.jsonl holds other rows"):
        quality.write_task_files(sst2, 41, tmp_path)
    assert files.train.read_text() == written


def test_a_workdir_that_cannot_be_a_folder_is_bad_input(tmp_path, capsys):
    quality = load_benchmark_module("quality")
    taken = tmp_path / "taken"
    taken.write_text("the user's own file\n")
    assert quality.main(["--tasks", "sst2", "--workdir", str(taken)]) == 2
    assert f"--workdir: cannot use {taken} (File exists)" in capsys.readouterr().err
    assert taken.read_text() == "the user's own file\n"
