import json

import optuna
from conftest import tiny_study

from reftsearch.cli import main
from reftsearch.spec import load_spec


def test_estimate_is_positive_and_close_to_a_measured_trial(write_study, easy_task_files, capsys):
    raw = tiny_study(easy_task_files, budget={"n_trials": 4, "max_epochs": 2})
    raw["space"].update(rank=2, lr=0.005, suffix=1)  # a single config: estimate vs reality
    study = write_study(raw)
    assert main(["estimate", str(study), "--json", "--samples", "2"]) == 0
    estimate = json.loads(capsys.readouterr().out)
    for key in ("cheapest", "median", "most_expensive"):
        assert estimate[key]["epoch_s"] > 0 and estimate[key]["trial_s"] > 0
    assert estimate["study_s"] == estimate["median"]["trial_s"] * 4

    assert main(["run", str(study), "--n-trials", "1"]) == 0
    out = capsys.readouterr().out
    spec = load_spec(study)
    (trial,) = optuna.load_study(study_name="t", storage=spec.storage).get_trials()
    measured = trial.user_attrs["wall_time_s"]
    assert measured / 3 <= estimate["median"]["trial_s"] <= measured * 3
    assert "estimate: " in out and "per trial (median" in out


def test_estimate_table(write_study, easy_task_files, capsys):
    study = write_study(tiny_study(easy_task_files))
    assert main(["estimate", str(study), "--samples", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].strip() for line in lines[:3]] == [
        "cheapest",
        "median",
        "most expensive",
    ]
    assert lines[-1].startswith("estimate: ")
