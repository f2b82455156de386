"""``reftsearch predict``: a trained trial on new inputs, as it was scored."""

import csv
import json

import optuna
import pytest
from conftest import tiny_study
from test_real_tasks import TINY, needs_data, offline, smollm2_cache, study_file  # noqa: F401

from reftsearch.cli import main
from reftsearch.data.splits import load_task_data
from reftsearch.metrics import CLASSIFICATION_METRICS, GENERATION_METRICS
from reftsearch.spec.study_file import load_spec


@pytest.fixture
def trained_study(write_study, easy_task_files):
    raw = tiny_study(easy_task_files, budget={"n_trials": 2, "max_epochs": 2})
    study = write_study(raw)
    assert main(["run", str(study)]) == 0
    return study


def best_trial(study_file) -> optuna.trial.FrozenTrial:
    spec = load_spec(study_file)
    return optuna.load_study(study_name=spec.name, storage=spec.storage).best_trial


def test_predict_on_dev_rows_reproduces_the_trials_dev_score(
    trained_study, easy_task_files, tmp_path, capsys
):
    out = tmp_path / "predictions.json"
    capsys.readouterr()
    args = ["predict", str(trained_study), "--input", easy_task_files["dev"], "--json"]
    assert main([*args, "--out", str(out)]) == 0
    assert f"wrote 48 predictions to {out}" in capsys.readouterr().err
    predictions = json.loads(out.read_text())
    with open(easy_task_files["dev"]) as f:
        dev = list(csv.DictReader(f))
    assert [p["input"] for p in predictions] == [{"text": row["text"]} for row in dev]
    hits = [p["label"] == row["label"] for p, row in zip(predictions, dev, strict=True)]
    assert sum(hits) / len(hits) == best_trial(trained_study).value
    for p in predictions:
        assert set(p["probabilities"]) == {"0", "1"}
        assert sum(p["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert p["label"] == max(p["probabilities"], key=p["probabilities"].get)

    # the same trial by number, on texts given on the command line, read as the files are
    trial = best_trial(trained_study).number
    texts = [dev[0]["text"] + " ", dev[1]["text"]]  # a trailing space means nothing
    assert main(["predict", str(trained_study), "--trial", str(trial), "--text", *texts]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [p["label"] for p in predictions[:2]]
    assert lines[0].endswith("\t" + dev[0]["text"])


def test_predict_refuses_what_it_cannot_do(trained_study, tmp_path, capsys):
    taken = tmp_path / "taken.json"
    taken.write_text("mine")
    assert main(["predict", str(trained_study), "--text", "a", "--out", str(taken)]) == 2
    assert taken.read_text() == "mine"
    assert main(["predict", str(trained_study), "--input", str(tmp_path / "none.csv")]) == 2
    assert "--input: file not found" in capsys.readouterr().err
    assert main(["predict", str(trained_study), "--trial", "7", "--text", "a"]) == 2
    with pytest.raises(SystemExit) as exit_info:  # argparse: one of --text / --input
        main(["predict", str(trained_study)])
    assert exit_info.value.code == 2


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("name", ["sst2-minilm", "gsm8k-smollm2"])
def test_predict_reproduces_a_real_models_dev_score(name, tmp_path, capsys, request):
    """On the embedded models: MiniLM's labels (by name) and SmolLM2's greedy answers."""
    if name.endswith("smollm2"):
        request.getfixturevalue("smollm2_cache")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    overrides = [f"--set={item}" for item in [*offline(name), *TINY[name], "budget.max_epochs=1"]]
    study = str(study_file(name))
    assert main(["run", study, "--storage", storage, "--n-trials", "1", *overrides]) == 0
    spec = load_spec(study, [item.removeprefix("--set=") for item in overrides])
    dev = load_task_data(spec.task, spec.seed).dev
    key = "text" if spec.task.kind == "classification" else "prompt"
    capsys.readouterr()
    argv = ["predict", study, "--storage", storage, "--json", *overrides, "--text"]
    assert main([*argv, *[row[key] for row in dev]]) == 0
    predictions = json.loads(capsys.readouterr().out)
    if spec.task.kind == "classification":
        names = load_task_data(spec.task, spec.seed).label_names
        score = CLASSIFICATION_METRICS[spec.metric](
            [names.index(p["label"]) for p in predictions], [row["label"] for row in dev]
        )
    else:
        score = GENERATION_METRICS[spec.metric](
            [p["text"] for p in predictions], [row["response"] for row in dev]
        )
    trial = optuna.load_study(study_name=spec.name, storage=storage).trials[0]
    assert score == trial.value
