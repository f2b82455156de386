"""The HTML report, the trials table as CSV, and the Pareto front of a study."""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import tiny_study

from reftsearch.cli import main
from reftsearch.results.best_table import trials_frame
from reftsearch.results.html_report import (
    REPORT_FILES,
    best_so_far,
    split_reruns,
    write_report,
)
from reftsearch.search.ranking import pareto_front
from reftsearch.search.record import TrialRecord
from reftsearch.search.study import open_study
from reftsearch.spec.study_file import load_spec

PLOTS = ("history.png", "layers_positions.png", "rank.png", "params.png", "states.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def small_study(**changes) -> dict:
    """tiny:llama on a slice of the builtin sentiment task: trials of about a second."""
    raw = {
        "name": "t",
        "model": "tiny:llama",
        "task": {
            "kind": "classification",
            "data": "builtin:sentiment",
            "max_train_examples": 48,
            "max_dev_examples": 32,
            "max_length": 48,
        },
        "seed": 3,
        "budget": {"n_trials": 4, "max_epochs": 1},
        "sampler": {"type": "grid"},  # 4 distinct configs of the 8
        "pruner": "none",
        "space": {"layers": ["all", "0;2"], "rank": [1, 4], "prefix": 1, "suffix": [1, 2]},
        "resources": {"heartbeat_s": 5},
    }
    raw.update(changes)
    return raw


@pytest.fixture(scope="module")
def searched_study(tmp_path_factory):
    """A finished 4-trial study over layer sets, suffixes and ranks (run once per module)."""
    study = tmp_path_factory.mktemp("searched") / "study.yaml"
    study.write_text(yaml.safe_dump(small_study()))
    assert main(["run", str(study)]) == 0
    return study


def test_report_writes_plots_top_table_and_csv(searched_study, tmp_path, capsys):
    out = tmp_path / "report"
    capsys.readouterr()
    assert main(["report", str(searched_study), "--out", str(out)]) == 0
    assert str(out / "index.html") in capsys.readouterr().out
    page = (out / "index.html").read_text()
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert f"src='{name}'" in page
    # what a later report may write over: every file this one wrote
    assert {path.name for path in out.iterdir()} <= REPORT_FILES
    # offline: nothing is fetched from elsewhere
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page)
    assert "<h1>reftsearch report: t</h1>" in page and "4 complete" in page

    spec = load_spec(searched_study)
    study = optuna.load_study(study_name=spec.name, storage=spec.storage)
    best = max(study.trials, key=lambda t: t.value)
    top_rows = re.findall(r"<tr>\s*<td>1</td>\s*<td>(\d+)</td>", page)
    assert top_rows == [str(best.number)]

    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["number"]) for r in rows] == [0, 1, 2, 3]
    for row, trial in zip(rows, study.trials, strict=True):
        assert float(row["score"]) == trial.value
        assert row["layers"] == ";".join(map(str, trial.user_attrs["config"]["layers"]))
        assert row["positions"] == trial.user_attrs["config"]["positions"]
        assert int(row["n_params"]) == trial.user_attrs["n_params"]


def test_trials_carry_flat_attributes_for_the_dashboard(searched_study):
    spec = load_spec(searched_study)
    for trial in optuna.load_study(study_name=spec.name, storage=spec.storage).trials:
        attrs, config = trial.user_attrs, trial.user_attrs["config"]
        assert attrs["type"] == config["intervention"] == "loreft"
        assert attrs["layers"] in ("0;1;2;3", "0;2")
        assert attrs["positions"] == f"f1+l{config['suffix']}"
        assert attrs["rank"] == config["rank"] and attrs["tied"] is False
        assert attrs["wall_time_s"] > 0 and attrs["worker"]


def test_best_csv_writes_every_trial(searched_study, tmp_path, capsys):
    target = tmp_path / "trials.csv"
    assert main(["best", str(searched_study), "--json", "--csv", str(target)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["number"] in range(4)  # stdout stays pure JSON
    assert f"wrote 4 trials to {target}" in captured.err
    with open(target) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {row["dtype"] for row in rows} == {"float32"}


def test_best_csv_named_tsv_is_tab_separated_and_rewritten(searched_study, tmp_path, capsys):
    """A .tsv held commas, as data --out's does not."""
    target = tmp_path / "trials.tsv"
    for _ in range(2):  # the second replaces the table the first wrote
        assert main(["best", str(searched_study), "--csv", str(target)]) == 0
        with open(target) as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        assert len(rows) == 4 and {row["dtype"] for row in rows} == {"float32"}


def test_report_of_a_study_without_trials_says_why(write_study, easy_task_files, tmp_path):
    study = write_study(tiny_study(easy_task_files))
    spec = load_spec(study)
    open_study(spec, spec.storage)
    out = tmp_path / "empty"
    assert main(["report", str(study), "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert not list(out.glob("*.png"))
    assert "No completed trial yet." in page and "No trial has a dev score yet." in page
    assert "Needs at least 2 completed trials, the study has 0." in page


def _trial(score: float, n_params: int) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(
        value=score, params={}, distributions={}, user_attrs={"n_params": n_params}
    )


def test_finalize_reruns_are_drawn_apart_and_are_not_search_progress(tmp_path):
    """A lucky seed rerun (0.875) of the pick (0.8) is neither the best so far nor the pick:
    it is drawn as a rerun, and the history's line follows the search trials only."""
    study = optuna.create_study(direction="maximize")
    config = {
        "intervention": "loreft", "layers": [0], "positions": "l1", "tied": False, "rank": 1,
        "seed": 3, "lr": 1e-3, "epochs": 1, "batch_size": 8,
    }  # fmt: skip
    for score, record in [
        (0.6, TrialRecord(config=config, n_params=10)),
        (0.8, TrialRecord(config=config, n_params=10)),
        (0.875, TrialRecord(config=config, n_params=10, finalize_of=1, seed=4)),
        (0.7, TrialRecord(config=config, n_params=10)),
    ]:
        study.add_trial(
            optuna.trial.create_trial(
                value=score, params={}, distributions={}, user_attrs=record.to_user_attrs()
            )
        )
    search, reruns = split_reruns(trials_frame(study))
    assert list(search["number"]) == [0, 1, 3] and list(reruns["number"]) == [2]
    assert list(best_so_far(search, maximize=True)) == [0.6, 0.8, 0.8]
    write_report(study, tmp_path)
    with open(tmp_path / "trials.csv") as f:
        assert [row["finalize_of"] for row in csv.DictReader(f)] == ["", "", "1.0", ""]


def test_pareto_front_keeps_only_undominated_trials():
    study = optuna.create_study(direction="maximize")
    for score, size in [(0.6, 100), (0.7, 400), (0.65, 500), (0.7, 300), (0.5, 100), (0.9, 900)]:
        study.add_trial(_trial(score, size))
    # (0.7, 400) loses to (0.7, 300); (0.65, 500) to (0.7, 300); (0.5, 100) to (0.6, 100)
    assert [t.number for t in pareto_front(study)] == [0, 3, 5]


def test_commands_that_read_a_spec_or_a_stored_study_import_no_model_library():
    """``best`` and the report's tables read a spec, load a study and describe its trials:
    importing transformers and peft made ``reftsearch best`` take 8.2 s instead of 4.6, and
    torch (for the intervention names the spec's space may use) 4.6 s instead of 3.1, and
    ``reftsearch --help`` 4 s instead of 0.7."""
    demo = Path(__file__).parents[1] / "studies" / "demo.yaml"
    code = (
        "import sys, reftsearch.cli, reftsearch.results.best_table, reftsearch.search.storage; "
        f"reftsearch.spec.study_file.load_spec({str(demo)!r}); "
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]"
