"""More pruning signals: Wilcoxon on per-example dev scores, and a ladder over training data."""

import optuna
import pytest
from conftest import tiny_study

from reftsearch.cli import main
from reftsearch.errors import SpecError
from reftsearch.metrics import share
from reftsearch.search.fidelity import data_ladder, example_steps, rung_count
from reftsearch.search.record import unpack_hits
from reftsearch.search.study import open_study
from reftsearch.spec.study_file import load_spec, parse_spec


def run_enqueued(write_study, raw, *params, name="study.yaml"):
    """Run a study whose trials are the given params, in order; return its trials."""
    study = write_study(raw, name)
    spec = load_spec(study)
    created = open_study(spec, spec.storage)
    for p in params:
        created.enqueue_trial(p)
    assert main(["run", str(study)]) == 0
    return optuna.load_study(study_name=spec.name, storage=spec.storage).trials


def test_the_data_ladder_is_nested_and_ends_with_the_whole_split():
    train = list(range(96))
    rungs = data_ladder(train, reduction_factor=3, min_fraction=0.1, seed=0)
    assert [(r.step, len(r.train)) for r in rungs] == [(1, 11), (3, 32), (9, 96)]
    assert set(rungs[0].train) < set(rungs[1].train) and rungs[2].train is train
    assert rung_count(3, 1 / 9) == 3 and rung_count(2, 0.25) == 3
    assert list(example_steps(2, 48)) == list(range(48, 96))


@pytest.mark.parametrize(
    ("pruner", "metric", "message"),
    [
        ({"type": "wilcoxon"}, "f1", "pruner.type: wilcoxon compares trials example by example"),
        ({"type": "median", "resource": "data_fraction"}, "accuracy", "pruner.resource: does not"),
        ({"type": "hyperband", "p_threshold": 0.05}, "accuracy", "pruner.p_threshold: does not"),
        (
            {"type": "successive_halving", "resource": "data_fraction", "min_fraction": 0.5},
            "accuracy",
            r"pruner.min_fraction: must be a number > 0 and <= 0.333",
        ),
        (
            {"type": "successive_halving", "resource": "data_fraction", "min_resource": 2},
            "accuracy",
            "pruner.min_resource: counts epochs",
        ),
        ({"type": "asha"}, "accuracy", r"pruner.type: must be one of \[.*'wilcoxon'\]"),
    ],
)
def test_pruner_spec_errors_name_the_key(tmp_path, pruner, metric, message):
    raw = {
        "name": "t",
        "model": "tiny:llama",
        "task": {"kind": "classification", "data": "builtin:sentiment"},
        "metric": metric,
        "pruner": pruner,
    }
    with pytest.raises(SpecError, match=message):
        parse_spec(raw, tmp_path)


def test_a_wilcoxon_pruned_trial_stops_early(write_study, easy_task_files):
    raw = tiny_study(
        easy_task_files,
        budget={"n_trials": 2, "max_epochs": 2},
        pruner={"type": "wilcoxon", "p_threshold": 0.05},
    )
    raw["space"].update(rank=2, suffix=1, lr={"low": 1e-6, "high": 0.05, "log": True})
    good, bad = run_enqueued(write_study, raw, {"lr": 0.01}, {"lr": 1e-6})
    assert good.state.name == "COMPLETE" and good.user_attrs["epochs_trained"] == 2
    # one step per dev example (48) and epoch, 1 right / 0 wrong, mean = the epoch's accuracy
    assert sorted(good.intermediate_values) == list(range(96))
    assert bad.state.name == "PRUNED" and bad.user_attrs["pruned_at_epoch"] == 1
    assert bad.user_attrs["epochs_trained"] == 1  # of 2
    assert sorted(bad.intermediate_values) == list(range(48))
    assert set(bad.intermediate_values.values()) <= {0.0, 1.0}
    # reports show the epoch's score, not the last example's hit
    first_epoch = [bad.intermediate_values[step] for step in range(48)]
    assert bad.user_attrs["dev_curve"] == [pytest.approx(sum(first_epoch) / 48)]
    assert len(good.user_attrs["dev_curve"]) == 2 and good.user_attrs["dev_curve"][-1] == good.value


def test_the_data_ladder_trains_on_growing_fractions(write_study, easy_task_files):
    raw = tiny_study(
        easy_task_files,
        budget={"n_trials": 2, "max_epochs": 2},
        pruner={"type": "successive_halving", "resource": "data_fraction", "min_fraction": 0.1},
    )
    raw["space"].update(rank=2, suffix=1, lr={"low": 1e-6, "high": 0.05, "log": True})
    good, bad = run_enqueued(write_study, raw, {"lr": 0.03}, {"lr": 1e-6})
    # 11, 32 then all 96 training examples; a dev score reported at steps 1, 3, 9
    assert good.state.name == "COMPLETE" and sorted(good.intermediate_values) == [1, 3, 9]
    assert good.user_attrs["epochs_trained"] == pytest.approx(2 * (1 / 9 + 1 / 3 + 1), abs=1e-3)
    assert bad.state.name == "PRUNED" and list(bad.intermediate_values) == [1]
    assert bad.user_attrs["epochs_trained"] == pytest.approx(2 / 9, abs=1e-3)
    assert "at 0.111 of the training data" in bad.user_attrs["pruned"]
    # the dev hits on record are the trained config's, from the top rung only
    assert share(unpack_hits(good.user_attrs["dev_hits"])) == pytest.approx(good.value)
    assert "dev_hits" not in bad.user_attrs
    # the top rung is plain training on everything: the same score as without a ladder
    raw.update(name="plain", pruner="none", budget={"n_trials": 1, "max_epochs": 2})
    (plain,) = run_enqueued(write_study, raw, {"lr": 0.03}, name="plain.yaml")
    assert plain.value == good.value
