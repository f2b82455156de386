"""Two objectives (dev score up, trainable parameters down): spec checks, run, front, report."""

import json

import optuna
import pytest
from conftest import REPO

from reftsearch.cli import main
from reftsearch.search.study import open_study
from reftsearch.spec.study_file import load_spec

PARETO_STUDY = REPO / "studies" / "tiny-pareto.yaml"


def test_shipped_pareto_study_runs_and_best_json_lists_the_front(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'pareto.db'}"
    fast = ["--set", "task.max_train_examples=48", "--set", "task.max_dev_examples=32"]
    assert main(["run", str(PARETO_STUDY), "--storage", storage, "--n-trials", "4", *fast]) == 0
    study = optuna.load_study(study_name="tiny-pareto", storage=storage)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert done and all(t.values[1] == t.user_attrs["n_params"] for t in done)
    # no pruning: every trial trains every epoch and keeps its curve as a user attribute
    assert all(len(t.user_attrs["dev_curve"]) == t.user_attrs["config"]["epochs"] for t in done)
    assert all(t.user_attrs["dev_curve"][-1] == t.values[0] for t in done)

    capsys.readouterr()
    assert main(["best", str(PARETO_STUDY), "--storage", storage, "--json", *fast]) == 0
    front = json.loads(capsys.readouterr().out)
    assert isinstance(front, list) and front
    by_number = {t.number: t for t in done}
    for entry in front:
        assert entry["values"] == [entry["value"], entry["n_params"]]
        assert entry["config"] == by_number[entry["number"]].user_attrs["config"]
    sizes = [entry["n_params"] for entry in front]
    assert sizes == sorted(sizes)
    # nothing outside the front is both at least as good and at least as small as a member
    for entry in front:
        for other in done:
            assert not (
                other.values[0] >= entry["value"]
                and other.values[1] <= entry["n_params"]
                and (other.values[0] > entry["value"] or other.values[1] < entry["n_params"])
            )

    out = tmp_path / "report"
    assert main(["report", str(PARETO_STUDY), "--storage", storage, "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert "<h2>Pareto front</h2>" in page and "Pareto front: score vs trainable" in page
    assert (out / "params.png").stat().st_size > 1000

    # export wrote `trial.value`, which a two-objective trial has not: a traceback, exit 1
    exported = tmp_path / "export"
    pick = str(front[0]["number"])
    argv = ["export", str(PARETO_STUDY), str(exported), "--trial", pick, "--storage", storage]
    assert main([*argv, *fast]) == 0
    sidecar = json.loads((exported / "reftsearch.json").read_text())
    assert sidecar["dev_score"] == front[0]["value"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pruner=hyperband", "pruner.type: Optuna cannot prune a study with two objectives"),
        ("sampler=cmaes", "sampler.type: cmaes cannot search two objectives"),
        ("finalize={top_k: 2}", "finalize: picks one best config"),
        ("objectives=[n_params]", "objectives: must start with score"),
        ("objectives=[score, size]", "objectives[1]: must be one of ['n_params', 'score']"),
    ],
)
def test_pareto_spec_errors_name_the_key(override, message, capsys):
    assert main(["validate", str(PARETO_STUDY), "--set", override]) == 2
    assert message in capsys.readouterr().err


def test_pareto_spec_defaults():
    spec = load_spec(PARETO_STUDY)
    assert spec.objectives == ("score", "n_params")
    assert spec.directions == ("maximize", "minimize")
    assert spec.pruner.type == "none" and spec.finalize is None
    assert load_spec(PARETO_STUDY, ["objectives=[score]"]).directions == ("maximize",)


def test_best_test_is_refused_on_a_pareto_study(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'p.db'}"
    spec = load_spec(PARETO_STUDY)
    open_study(spec, storage)
    assert main(["best", str(PARETO_STUDY), "--storage", storage, "--test"]) == 2
    assert "a study with two objectives has a front" in capsys.readouterr().err
