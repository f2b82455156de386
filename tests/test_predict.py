"""``reftsearch predict``: a trained trial on new inputs, as it was scored."""

import csv
import json
import shutil
from pathlib import Path

import optuna
import pytest
from conftest import tiny_study
from test_export import tiny_llama_directory, write_study
from test_real_tasks import TINY, needs_data, offline, smollm2_cache, study_file  # noqa: F401

from reftsearch.cli import main
from reftsearch.data.splits import load_task_data
from reftsearch.metrics import CLASSIFICATION_METRICS, GENERATION_METRICS
from reftsearch.results import predict as predict_module
from reftsearch.results.predict import Prediction
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
    assert main(["predict", str(trained_study), "--input", str(tmp_path)]) == 2
    assert f"--input: {tmp_path} is a directory" in capsys.readouterr().err
    assert main(["predict", str(trained_study), "--trial", "7", "--text", "a"]) == 2
    with pytest.raises(SystemExit) as exit_info:  # argparse: one of --text / --input
        main(["predict", str(trained_study)])
    assert exit_info.value.code == 2
    latin1 = b"caf\xe9".decode("utf-8", "surrogateescape")  # as Python reads such an argument
    capsys.readouterr()
    assert main(["predict", str(trained_study), "--text", "ok", latin1]) == 2  # was a traceback
    assert "--text[1]: is not UTF-8 text" in capsys.readouterr().err


def test_an_input_file_predict_cannot_read_is_named_as_given(trained_study, tmp_path, capsys):
    """An --input file is not the study's test split: its errors named task.data.test and
    advised editing the study's task.data settings, which would change how the study's own
    files are read (and an export has no study file): they name --input and say the format
    the file must have."""
    out = tmp_path / "out"
    assert main(["export", str(trained_study), str(out)]) == 0
    files = {
        "columns.csv": ("review,label\nnice,1\n", "lacks task.text: column 'text'"),
        "rowfirst.csv": ("nice,1\nbad,0\n", "lacks task.text: column 'text'"),
        "quotes.csv": ('text\n"Tigers" win\n', "line 2: "),
        "latin1.csv": (b"text\ncaf\xe9\n", "not utf-8 text"),
        "notes.txt": ("text\nnice\n", "notes.txt: unknown file type"),
        "empty.csv": ("text\n", "has no rows"),
    }
    for name, (content, cause) in files.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        for target in (trained_study, out):
            capsys.readouterr()
            assert main(["predict", str(target), "--input", str(path)]) == 2, name
            error = capsys.readouterr().err
            assert "--input" in error and cause in error, error
            assert "task.data.test" not in error and "set task.data" not in error, error
            assert "--input is read as the task's files are: column 'text' (task.text)" in error


def test_predict_never_writes_over_a_file_made_while_it_ran(
    trained_study, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "predictions.txt"
    real = predict_module.predict

    def meanwhile(*args, **kwargs):
        out.write_text("mine")  # the user's, made after predict checked the name
        return real(*args, **kwargs)

    monkeypatch.setattr(predict_module, "predict", meanwhile)
    assert main(["predict", str(trained_study), "--text", "a", "--out", str(out)]) == 2
    assert out.read_text() == "mine" and "exists (made while predicting)" in (
        capsys.readouterr().err
    )


def test_a_classified_input_is_one_line_whatever_it_holds():
    """An input with a tab or a line break (a quoted CSV cell) broke the one tab-separated
    line per input that scripts split."""
    shown = Prediction({"text": "a\tb\nc"}, "pos", {"neg": 0.1, "pos": 0.9}).line()
    assert shown == "pos\t(neg 0.100, pos 0.900)\ta\\tb\\nc"
    assert len(shown.split("\t")) == 3 and "\n" not in shown


def predictions(capsys, *argv: str) -> tuple[list[dict], str]:
    """``predict --json``'s predictions, and what it said on stderr."""
    capsys.readouterr()
    assert main(["predict", *argv, "--json"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def assert_same_predictions(ours: list[dict], theirs: list[dict]) -> None:
    """The same inputs and labels (or texts), the same probabilities to 1e-5."""
    assert [p["input"] for p in ours] == [p["input"] for p in theirs]
    assert [p.get("label") for p in ours] == [p.get("label") for p in theirs]
    assert [p.get("text") for p in ours] == [p.get("text") for p in theirs]
    for mine, other in zip(ours, theirs, strict=True):
        if "probabilities" in mine:
            assert mine["probabilities"] == pytest.approx(other["probabilities"], abs=1e-5)


# tiny:llama trials whose export must predict what the study predicts: every intervention
# type, untied prefix and suffix (two interventions per layer), tied, suffix only
EXPORT_CASES = {
    "cls-loreft-f1+l2-untied": {"prefix": 1, "suffix": 2, "tied": False},
    "cls-noreft-l2": {"intervention": "noreft", "prefix": 0, "suffix": 2},
    "gen-loreft-f1+l2-untied": {"prefix": 1, "suffix": 2, "tied": False},
    "gen-direft-f2+l1-tied": {"intervention": "direft", "prefix": 2, "suffix": 1, "tied": True},
}


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_predict_on_an_export_matches_predict_on_its_study(tmp_path, easy_task_files, capsys, case):
    task = "classification" if case.startswith("cls") else "generation"
    data = easy_task_files if task == "classification" else None  # None: builtin:arithmetic
    space = {"intervention": "loreft", "layers": "0;2", **EXPORT_CASES[case]}
    study = write_study(tmp_path, "s", "tiny:llama", space, data=data)
    assert main(["run", str(study)]) == 0
    out = tmp_path / "out"
    assert main(["export", str(study), str(out)]) == 0
    if task == "classification":
        inputs = ["--input", easy_task_files["dev"]]
    else:
        inputs = ["--text", "12+7=", "3+40=", "99+1="]
    from_study, _ = predictions(capsys, str(study), *inputs)
    from_export, said = predictions(capsys, str(out), *inputs)
    assert_same_predictions(from_export, from_study)
    assert f"trial 0 of study 's', exported to {out}: " in said
    sidecar = json.loads((out / "reftsearch.json").read_text())
    assert sidecar["task_spec"]["kind"] == task and sidecar["task_spec"]["max_length"] == 32
    if task == "classification":  # on dev rows: the trial's dev score
        with open(easy_task_files["dev"]) as f:
            labels = [row["label"] for row in csv.DictReader(f)]
        hits = [p["label"] == label for p, label in zip(from_export, labels, strict=True)]
        assert sum(hits) / len(hits) == sidecar["dev_score"]
    else:
        assert sidecar["task_spec"]["max_new_tokens"] == 3


def test_predict_on_an_export_of_a_local_model_checks_its_weights(tmp_path, capsys):
    model = tiny_llama_directory(tmp_path / "my-llama", rope_theta=100000.0)
    space = {"intervention": "loreft", "layers": "1;2", "prefix": 1, "suffix": 1, "tied": True}
    study = write_study(tmp_path, "s", str(model), space)
    out = tmp_path / "out"
    assert main(["run", str(study)]) == 0
    assert main(["export", str(study), str(out)]) == 0
    assert not (out / "base_model").exists()  # referenced, not copied
    prompts = ["--text", "5+5=", "20+31="]
    from_export, _ = predictions(capsys, str(out), *prompts)
    assert_same_predictions(from_export, predictions(capsys, str(study), *prompts)[0])

    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))  # a changed (or retrained) model
    assert main(["predict", str(out), *prompts]) == 2
    error = capsys.readouterr().err
    assert f"{weights}: has sha256 " in error and "not the base model this export" in error
    shutil.rmtree(model)
    assert main(["predict", str(out), *prompts]) == 2
    assert f"base model directory {model} does not exist" in capsys.readouterr().err


def test_predict_refuses_what_is_no_export_it_can_read(
    trained_study, tmp_path, easy_task_files, capsys
):
    def refused(target: Path, *extra: str) -> str:
        capsys.readouterr()
        assert main(["predict", str(target), "--text", "yes red", *extra]) == 2
        return capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a reftsearch export (it has no reftsearch.json)" in refused(empty)
    out = tmp_path / "out"
    assert main(["export", str(trained_study), str(out)]) == 0
    for option in (["--trial", "0"], ["--storage", "sqlite:///x.db"], ["--set", "seed=1"]):
        assert f"{option[0]}: for a study file; {out} is an export directory" in refused(
            out, *option
        )

    older = tmp_path / "older"
    shutil.copytree(out, older)
    sidecar = json.loads((older / "reftsearch.json").read_text())
    del sidecar["task_spec"]
    (older / "reftsearch.json").write_text(json.dumps(sidecar))
    error = refused(older)
    assert "lacks the task settings (task_spec)" in error and "export the trial again" in error
    edited = {**sidecar, "task_spec": {"data": {}}}  # a hand edit: was a KeyError traceback
    (older / "reftsearch.json").write_text(json.dumps(edited))
    assert "task_spec is not as export writes it (KeyError" in refused(older)
    whole = json.loads((out / "reftsearch.json").read_text())
    task_spec = whole["task_spec"]
    for edit, said in (  # each was a traceback (exit 1), or labels made up (empty id2label)
        ({"task_spec": {**task_spec, "max_length": -5}}, "task_spec.max_length is not as"),
        ({"task_spec": {**task_spec, "max_length": "x"}}, "task_spec.max_length is not as"),
        ({"id2label": {"0": "a"}}, "id2label is not as export writes it"),
        ({"id2label": {}}, "id2label is not as export writes it"),
        ({"id2label": 5}, "id2label is not as export writes it"),
        ({"base_model": None}, "base_model is not as export writes it"),
        ({"id2label": {"0": "a", "1": "b", "2": "c"}}, "does not fit the base model"),
    ):
        (older / "reftsearch.json").write_text(json.dumps({**whole, **edit}))
        error = refused(older)
        assert said in error and "export the trial again" in error, error
    lora = {**whole, "config": {"method": "lora", "rank": 2}}  # was the config, dumped
    (older / "reftsearch.json").write_text(json.dumps(lora))
    assert "an export of a lora trial; predict EXPORT_DIR runs ReFT exports" in refused(older)

    adapters = tmp_path / "adapters"
    assert main(["export", str(trained_study), str(adapters), "--format", "adapters"]) == 0
    assert "an export for AdapterHub adapters (--format adapters)" in refused(adapters)

    next(out.glob("intkey_*.bin")).unlink()
    assert "cannot be read as the export wrote it" in refused(out)


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("name", ["sst2-minilm", "gsm8k-smollm2"])
def test_predict_reproduces_a_real_models_dev_score(name, tmp_path, capsys, request):
    """On the embedded models: MiniLM's labels (by name) and SmolLM2's greedy answers, from
    the study and from its export (MiniLM referenced, SmolLM2 copied)."""
    if name.endswith("smollm2"):
        request.getfixturevalue("smollm2_cache")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    # no test split: export would score it, which this test does not need
    settings = [*offline(name), "task.data.test=null", *TINY[name], "budget.max_epochs=1"]
    overrides = [f"--set={item}" for item in settings]
    study = str(study_file(name))
    assert main(["run", study, "--storage", storage, "--n-trials", "1", *overrides]) == 0
    spec = load_spec(study, settings)
    dev = load_task_data(spec.task, spec.seed).dev
    key = "text" if spec.task.kind == "classification" else "prompt"
    texts = ["--text", *[row[key] for row in dev]]
    from_study, _ = predictions(capsys, study, "--storage", storage, *overrides, *texts)
    if spec.task.kind == "classification":
        names = load_task_data(spec.task, spec.seed).label_names
        score = CLASSIFICATION_METRICS[spec.metric](
            [names.index(p["label"]) for p in from_study], [row["label"] for row in dev]
        )
    else:
        score = GENERATION_METRICS[spec.metric](
            [p["text"] for p in from_study], [row["response"] for row in dev]
        )
    trial = optuna.load_study(study_name=spec.name, storage=storage).trials[0]
    assert score == trial.value

    out = tmp_path / "export"
    assert main(["export", study, str(out), "--storage", storage, *overrides]) == 0
    assert (out / "base_model").is_dir() == name.endswith("smollm2")
    from_export, _ = predictions(capsys, str(out), *texts)
    assert_same_predictions(from_export, from_study)
