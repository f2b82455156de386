"""End to end through the CLI: run, resume, prune, fail, refuse bad input, best."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from conftest import digest, tiny_study

from reftsearch.cli import main
from reftsearch.engine import activation_cache as cache_module
from reftsearch.search import study as study_module
from reftsearch.search.study import open_study
from reftsearch.spec.study_file import load_spec


def trials_of(study_path):
    spec = load_spec(study_path)
    return optuna.load_study(study_name=spec.name, storage=spec.storage).get_trials()


def test_run_records_every_trial_and_resumes(write_study, easy_task_files, capsys):
    study = write_study(tiny_study(easy_task_files))
    assert main(["run", str(study)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("loading tiny:llama and the task's data...\n")  # before the imports
    assert "[3/3] trial 2" in out and "best=" in out
    progress = [line for line in out.splitlines() if line.startswith("[")]
    assert [re.search(r"\| ~[0-9.]+(s|min) left$", line) is not None for line in progress] == [
        True,
        True,
        False,  # the last trial: nothing left
    ]
    assert "frozen pass over 96 train examples" in out  # the worker's cache reports its passes
    trials = trials_of(study)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    for t in trials:
        assert set(t.intermediate_values) == {1, 2}  # one dev score per epoch
        assert t.user_attrs["n_params"] > 0 and t.user_attrs["wall_time_s"] > 0
        assert t.user_attrs["worker"].count(":") == 1
        assert t.user_attrs["config"]["layers"] == [0, 1, 2, 3]
        assert t.user_attrs["config"]["rank"] == t.params["rank"]

    # resume: "until 5 trials have finished", nothing duplicated or lost
    assert main(["run", str(study), "--n-trials", "5"]) == 0
    trials = trials_of(study)
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert all(t.state.name == "COMPLETE" for t in trials)
    # the resumed sampler draws new configs, not the first trials' again (then copied)
    assert trials[3].params != trials[0].params and trials[4].params != trials[1].params
    assert not any("copied_from" in t.user_attrs for t in trials)

    assert main(["run", str(study), "--n-trials", "5"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert len(trials_of(study)) == 5


def test_model_data_and_caches_are_built_once_for_all_trials(
    write_study, easy_task_files, monkeypatch
):
    """One worker, many trials: one model load, one data load, and one frozen pass per
    (layer, split) whatever the number of trials and epochs."""
    calls = {"model": 0, "data": 0, "frozen": []}

    def counted(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        study_module, "load_base_model", counted("model", study_module.load_base_model)
    )
    monkeypatch.setattr(
        study_module, "load_task_data", counted("data", study_module.load_task_data)
    )
    real_frozen = cache_module.compute_frozen

    def frozen_pass(base, examples, layers, keys_values, below=None, **placement):
        calls["frozen"].append((tuple(layers), len(examples)))
        return real_frozen(base, examples, layers, keys_values, below, **placement)

    monkeypatch.setattr(cache_module, "compute_frozen", frozen_pass)
    raw = tiny_study(easy_task_files, budget={"n_trials": 4, "max_epochs": 2})
    raw["space"].update(layers="1;3", prefix=0, suffix=2)  # one lowest layer for all trials
    assert main(["run", str(write_study(raw))]) == 0
    assert calls["model"] == 1 and calls["data"] == 1
    # the 96 train and 48 dev examples once each (the estimate times small samples of its own)
    full_splits = sorted(call for call in calls["frozen"] if call[1] in (96, 48))
    assert full_splits == [((1,), 48), ((1,), 96)]


def learning_and_stalled_trials(write_study, easy_task_files, max_epochs):
    """Run a median-pruned study of two trials: one that learns (its dev loss falls), then
    one that barely moves (worse than the median at epoch 1); return both."""
    raw = tiny_study(
        easy_task_files,
        metric="loss",
        budget={"n_trials": 2, "max_epochs": max_epochs},
        pruner={"type": "median", "n_startup_trials": 1},
    )
    raw["space"].update(lr=[1e-2, 1e-7], rank=1, suffix=1)
    study = write_study(raw)
    spec = load_spec(study)
    created = open_study(spec, spec.storage)
    created.enqueue_trial({"lr": 1e-2})
    created.enqueue_trial({"lr": 1e-7})
    assert main(["run", str(study)]) == 0
    return trials_of(study)


def test_pruning_stops_a_bad_trial_early(write_study, easy_task_files):
    good, bad = learning_and_stalled_trials(write_study, easy_task_files, max_epochs=4)
    assert good.state.name == "COMPLETE" and len(good.intermediate_values) == 4
    assert bad.state.name == "PRUNED" and len(bad.intermediate_values) < 4
    assert bad.user_attrs["pruned_at_epoch"] == max(bad.intermediate_values)


def test_a_trial_that_trained_every_epoch_completes_whatever_the_pruner_says(
    write_study, easy_task_files
):
    """Pruning after the last epoch saves nothing and drops a trained config from the
    ranking and finalize (Hyperband's top rung is the last epoch)."""
    good, bad = learning_and_stalled_trials(write_study, easy_task_files, max_epochs=1)
    assert bad.values[0] > good.values[0]  # else the pruner would not have pruned it
    assert [t.state.name for t in (good, bad)] == ["COMPLETE", "COMPLETE"]
    assert "pruned_at_epoch" not in bad.user_attrs


def test_nan_loss_fails_only_that_trial(write_study, easy_task_files, capsys):
    raw = tiny_study(easy_task_files, budget={"n_trials": 2, "max_epochs": 1})
    raw["space"].update(lr=[1e-2, 1e30], rank=1, suffix=1)
    study = write_study(raw)
    spec = load_spec(study)
    created = open_study(spec, spec.storage)
    created.enqueue_trial({"lr": 1e30})
    created.enqueue_trial({"lr": 1e-2})
    assert main(["run", str(study)]) == 0
    failed, *rest = trials_of(study)
    assert failed.state.name == "FAIL"
    assert "diverged" in failed.user_attrs["fail_reason"]
    assert rest and rest[0].state.name == "COMPLETE"
    assert "FAILED: diverged" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("space.rank=[1, 0]", "space.rank[1]: must be a positive integer, got 0"),
        (
            "space.layers=['all', '2;9']",
            "space.layers[1]: layer 9 does not exist in a model with 4",
        ),
        ("task.text=missing_column", "task.text: column 'missing_column'"),
        ("model=tiny:nope", "model.path"),
    ],
)
def test_bad_input_exits_2_and_leaves_storage_untouched(
    write_study, easy_task_files, capsys, override, message
):
    study = write_study(tiny_study(easy_task_files, budget={"n_trials": 1, "max_epochs": 1}))
    assert main(["run", str(study)]) == 0
    db = study.parent / "t.db"
    before = digest(db)
    capsys.readouterr()
    assert main(["run", str(study), "--n-trials", "3", "--set", override]) == 2
    assert message in capsys.readouterr().err
    assert digest(db) == before
    assert len(trials_of(study)) == 1


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://user:s3cret@127.0.0.1:1/nowhere",
        # libpq takes a password in the query too: it was printed in clear
        "postgresql+psycopg://user@127.0.0.1:1/nowhere?password=s3cret",
        "postgresql+psycopg://user@127.0.0.1:1/nowhere?sslpassword=s3cret&sslpassword=s3cret2",
    ],
    ids=["user-info", "query", "query-twice"],
)
def test_unreachable_storage_is_bad_input_with_password_masked(
    write_study, easy_task_files, capsys, url
):
    study = write_study(tiny_study(easy_task_files))
    assert main(["run", str(study), "--storage", url]) == 2
    err = capsys.readouterr().err
    assert "127.0.0.1" in err and "s3cret" not in err and "***" in err


def test_best_json_and_table(write_study, easy_task_files, capsys):
    study = write_study(tiny_study(easy_task_files, budget={"n_trials": 2, "max_epochs": 1}))
    assert main(["run", str(study)]) == 0
    capsys.readouterr()
    assert main(["best", str(study), "--json"]) == 0
    best = json.loads(capsys.readouterr().out)
    assert {"value", "number", "params", "n_params", "config"} <= set(best)
    values = [t.value for t in trials_of(study)]
    assert best["value"] == max(values)
    assert main(["best", str(study), "--top", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # one epoch of a tiny model may not beat the majority label yet: best then says so below
    table = [line for line in lines if not line.startswith("warning: ")]
    assert table[0].split()[:3] == ["rank", "trial", "accuracy"] and len(table) == 3


def test_best_test_touches_test_once_and_caches(write_study, easy_task_files, capsys):
    study = write_study(tiny_study(easy_task_files, budget={"n_trials": 1, "max_epochs": 1}))
    assert main(["run", str(study)]) == 0
    capsys.readouterr()
    assert main(["best", str(study), "--json", "--test"]) == 0
    captured = capsys.readouterr()
    first = json.loads(captured.out)["test_score"]
    assert 0.0 <= first <= 1.0
    assert "scoring trial 0 (kept artifact " in captured.err  # the searched weights themselves
    assert main(["best", str(study), "--json", "--test"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["test_score"] == first
    assert "not touching test again" in captured.err


def test_best_test_retrains_the_config_when_its_weights_are_gone(
    write_study, easy_task_files, capsys
):
    study = write_study(tiny_study(easy_task_files, budget={"n_trials": 1, "max_epochs": 1}))
    assert main(["run", str(study)]) == 0
    shutil.rmtree(study.parent / "t.artifacts")
    capsys.readouterr()
    assert main(["best", str(study), "--json", "--test"]) == 0
    captured = capsys.readouterr()
    assert "its trained weights were not kept (or are gone or unreadable); retr" in captured.err
    assert "scoring trial 0 (retrained with seed " in captured.err
    assert 0.0 <= json.loads(captured.out)["test_score"] <= 1.0


def test_kept_weights_move_with_their_sqlite_file_and_a_damaged_one_is_retrained(
    write_study, easy_task_files, tmp_path, capsys
):
    """A project moved elsewhere looked for its weights at the old absolute path (export
    retrained, run wrote new weights there); a damaged weights file was a traceback."""
    study = write_study(tiny_study(easy_task_files, budget={"n_trials": 1, "max_epochs": 1}))
    assert main(["run", str(study)]) == 0
    moved = tmp_path / "moved"
    moved.mkdir()
    for path in [tmp_path / "study.yaml", tmp_path / "t.artifacts", *tmp_path.glob("t.db*")]:
        shutil.move(path, moved / path.name)  # the database with its write-ahead log
    study = moved / "study.yaml"
    capsys.readouterr()
    assert main(["best", str(study), "--json", "--test"]) == 0
    assert f"scoring trial 0 (kept artifact {moved / 't.artifacts'}/" in capsys.readouterr().err
    assert main(["run", str(study), "--n-trials", "2"]) == 0
    assert not (tmp_path / "t.artifacts").exists()
    assert len(list((moved / "t.artifacts").iterdir())) == 2
    for kept in (moved / "t.artifacts").iterdir():
        kept.write_bytes(kept.read_bytes()[:100])  # damaged: cut short
    capsys.readouterr()
    assert main(["export", str(study), str(tmp_path / "out"), "--trial", "1"]) == 0
    assert "were not kept (or are gone or unreadable); retraining" in capsys.readouterr().err


def test_weights_that_cannot_be_written_leave_the_trial_complete(
    write_study, easy_task_files, capsys, monkeypatch
):
    """An unwritable artifacts folder failed the trial after it trained (its score lost,
    counted against the budget) and ended the run with a traceback."""

    def refused(**kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(optuna.artifacts, "upload_artifact", refused)
    study = write_study(tiny_study(easy_task_files, budget={"n_trials": 1, "max_epochs": 1}))
    assert main(["run", str(study)]) == 0
    out = capsys.readouterr().out
    assert "trial 0: its weights could not be kept in " in out and "(Permission denied)" in out
    (trial,) = trials_of(study)
    assert trial.state == optuna.trial.TrialState.COMPLETE


def test_best_of_a_missing_study_is_bad_input(write_study, easy_task_files, capsys):
    study = write_study(tiny_study(easy_task_files))
    assert main(["best", str(study)]) == 2
    assert "does not exist yet" in capsys.readouterr().err


def test_validate_reports_each_file(write_study, easy_task_files, capsys):
    good = write_study(tiny_study(easy_task_files), "good.yaml")
    bad = write_study(tiny_study(easy_task_files, pruner={"type": "x"}), "bad.yaml")
    assert main(["validate", str(good)]) == 0
    assert main(["validate", str(good), str(bad)]) == 2
    captured = capsys.readouterr()
    assert "good.yaml: ok" in captured.out and "pruner.type: must be one of" in captured.err


def test_a_device_this_machine_lacks_is_bad_input_before_the_storage(
    write_study, easy_task_files, tmp_path, capsys
):
    missing = f"cuda:{torch.cuda.device_count()}"
    raw = tiny_study(easy_task_files, model={"path": "tiny:llama", "device": missing})
    assert main(["run", str(write_study(raw))]) == 2
    assert f"model.device: device '{missing}': torch sees" in capsys.readouterr().err
    assert not (tmp_path / "t.db").exists()


def test_a_failed_trial_is_reported_by_its_progress_line_not_by_optunas_traceback():
    """A diverged trial printed Optuna's traceback and two warnings besides reftsearch's line."""
    code = """
import optuna
from reftsearch.cli import report_errors
from reftsearch.errors import TrialFailed

def diverges(trial):
    trial.suggest_float("lr", 0, 1)
    raise TrialFailed(f"trial {trial.number} failed: diverged")

def has_a_bug(trial):
    raise ValueError("a bug")

study = optuna.create_study()
report_errors(lambda: study.optimize(diverges, n_trials=2, catch=(TrialFailed,)) or 0)
report_errors(lambda: study.optimize(has_a_bug, n_trials=1, catch=(ValueError,)) or 0)
print([trial.state.name for trial in study.trials])
"""
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert ran.stdout.strip() == "['FAIL', 'FAIL', 'FAIL']", ran.stderr
    assert "Trial 0" not in ran.stderr and "Trial 1" not in ran.stderr
    assert "TrialFailed" not in ran.stderr
    # any other error still comes with Optuna's report and traceback
    assert "Trial 2 failed with parameters" in ran.stderr
    assert "in has_a_bug\nValueError: a bug" in ran.stderr
    assert "Trial 2 failed with value None." in ran.stderr


@pytest.mark.parametrize(
    "problem",
    [["--set", "space.rank=-1"], ["--storage", "postgresql+psycopg://nobody@127.0.0.1:1/none"]],
    ids=["spec", "storage"],
)
def test_run_refuses_bad_input_before_importing_the_model_libraries(problem):
    """A typo in the spec or an unreachable database is told at once: it used to wait for the
    runner's imports (torch and transformers, ~10 s on a CPU machine)."""
    tiny = Path(__file__).parents[1] / "studies" / "tiny.yaml"
    argv = ["run", str(tiny), *problem]
    code = (
        "import sys; from reftsearch.cli import main; "
        f"code = main({argv!r}); print(code, 'torch' in sys.modules)"
    )
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert ran.stdout.split() == ["2", "False"], ran.stderr
    assert ran.stderr.startswith("error: ")
