"""Hostile input and faults never cost a trial, a file or the machine (issue 25, run side).

Read-only commands never create or change a storage; a space changed under a stored study,
a warm start from a study that is not there, or an output path that cannot be written is bad
input (exit 2) before anything is written. An interrupted trial (SIGINT, SIGTERM) is recorded
as such, not counted, and run again on resume; runs and workers on one study draw different
configs; a storage that fails mid-run ends the run with one line (exit 1) and the next run
resumes with nothing lost; a run whose every trial failed exits 1 with their reasons.
"""

import csv as csv_module
import errno
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

import optuna
import pandas as pd
import pytest
import sqlalchemy
from conftest import digest, tiny_study
from matplotlib.figure import Figure
from optuna.storages._heartbeat import get_heartbeat_thread
from sqlalchemy.engine import make_url
from subprocess_runs import (
    ENV,
    State,
    start_run,
    stored,
    wait_for_running_rerun,
    wait_for_trial_mid_way,
)

from reftsearch import cli
from reftsearch.cli import main, report_errors
from reftsearch.errors import BadInputError, TrialFailed
from reftsearch.own_files import written_whole
from reftsearch.processes import worker_id
from reftsearch.run.worker import UnstartedTrials, Worker, interrupt_trials_of
from reftsearch.search import storage as storage_module
from reftsearch.search.ranking import top_search_trials
from reftsearch.search.record import TrialRecord, search_trials
from reftsearch.search.seed_reruns import enqueue_finalize
from reftsearch.search.storage import open_storage
from reftsearch.search.study import (
    INTERRUPTED,
    check_same_setup,
    count_finished,
    open_study,
    refuse_duplicate,
    store,
)
from reftsearch.search.warm_start import enqueue_warm_starts, paper_recipes
from reftsearch.spec.study_file import load_spec, parse_spec
from reftsearch.testing import postgres_admin


@pytest.fixture
def not_a_database(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("my notes, not a database\n")
    return path


@pytest.mark.parametrize("command", [["best"], ["report"], ["dashboard", "--port", "0"]])
def test_read_only_commands_refuse_a_file_that_is_no_database_and_leave_it(
    write_study, easy_task_files, not_a_database, capsys, command
):
    before = digest(not_a_database)
    study = write_study(tiny_study(easy_task_files, storage=f"sqlite:///{not_a_database}"))
    assert main([command[0], str(study), *command[1:]]) == 2
    assert "exists and is not a SQLite database" in capsys.readouterr().err
    assert digest(not_a_database) == before


@pytest.mark.parametrize("command", [["best"], ["report"], ["dashboard", "--port", "0"]])
def test_read_only_commands_create_no_database_for_a_mistyped_path(
    write_study, easy_task_files, tmp_path, capsys, command
):
    study = write_study(tiny_study(easy_task_files, storage=f"sqlite:///{tmp_path}/typo.db"))
    assert main([command[0], str(study), *command[1:]]) == 2
    assert "does not exist yet" in capsys.readouterr().err
    assert not (tmp_path / "typo.db").exists()


def test_a_sqlite_database_of_other_tables_or_damaged_is_refused_and_left_as_it_was(
    write_study, easy_task_files, tmp_path, capsys
):
    """`run` added Optuna's tables (and WAL mode) to a user's own database at its storage
    path; a damaged study file gave `best` a traceback; `sqlite://` a TypeError."""
    theirs = tmp_path / "shop.db"
    with closing(sqlite3.connect(theirs)) as db:
        db.execute("CREATE TABLE customers (id INTEGER, name TEXT)")
        db.commit()
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(b"SQLite format 3\x00" + b"\xff" * 2000)
    for storage, said in (
        (f"sqlite:///{theirs}", "of other tables (customers), not a study store"),
        (
            f"sqlite:///{damaged}",
            "is not a readable SQLite database (file is not a database, SQLITE_NOTADB)",
        ),
        ("sqlite://", "is a database in memory"),
    ):
        study = write_study(tiny_study(easy_task_files, storage=storage))
        before = digest(theirs), digest(damaged)
        for command in (["run"], ["best"]):
            assert main([*command, str(study)]) == 2
            assert said in capsys.readouterr().err
        assert (digest(theirs), digest(damaged)) == before
    assert sorted(p.name for p in tmp_path.glob("*.db*")) == ["damaged.db", "shop.db"]


def test_a_storage_that_cannot_be_written_is_refused_by_validate_and_run_before_loading(
    write_study, easy_task_files, tmp_path, capsys, monkeypatch
):
    """`validate` said ok; `run` loaded the model, then failed (exit 1) at its first write,
    saying to run the same command again. As root nothing is read-only: ``os.access`` says
    what a user without write permission would meet."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        storage_module.os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode)
    )
    study = write_study(tiny_study(easy_task_files, storage=f"sqlite:///{locked / 's.db'}"))
    missing = write_study(
        tiny_study(easy_task_files, storage=f"sqlite:///{tmp_path / 'no' / 's.db'}"), "m.yaml"
    )
    for argv, said in (
        (["validate", str(study)], f"storage: {locked} is not writable"),
        (["run", str(study)], f"storage: {locked} is not writable"),
        (["validate", str(missing)], f"directory {tmp_path / 'no'} does not exist"),
    ):
        assert main(argv) == 2
        out = capsys.readouterr()
        assert said in out.err and "loading" not in out.out
    assert list(locked.iterdir()) == []


def test_read_only_commands_leave_an_empty_file_empty(
    write_study, easy_task_files, tmp_path, capsys
):
    empty = tmp_path / "empty.db"
    empty.touch()
    study = write_study(tiny_study(easy_task_files, storage=f"sqlite:///{empty}"))
    for command in (["best"], ["report"], ["dashboard", "--port", "0"]):
        assert main([command[0], str(study), *command[1:]]) == 2
        assert "holds no Optuna studies" in capsys.readouterr().err
    assert empty.stat().st_size == 0


def test_run_refuses_a_storage_file_that_is_no_database(
    write_study, easy_task_files, not_a_database, capsys
):
    before = digest(not_a_database)
    study = write_study(tiny_study(easy_task_files, storage=f"sqlite:///{not_a_database}"))
    assert main(["run", str(study)]) == 2
    assert "exists and is not a SQLite database" in capsys.readouterr().err
    assert digest(not_a_database) == before


def test_output_options_replace_only_files_their_command_wrote(
    write_study, easy_task_files, tmp_path, capsys
):
    """`best --csv`, `report --out` and `compare --out` overwrote whatever their path named:
    the study file, its database (all its trials lost), a user's own table or page."""
    study = write_study(tiny_study(easy_task_files, budget={"n_trials": 1, "max_epochs": 1}))
    assert main(["run", str(study)]) == 0
    mine = tmp_path / "mine.csv"
    mine.write_text("name,score\nann,3\n")
    page = tmp_path / "page"
    page.mkdir()
    (page / "index.html").write_text("<html>my notes</html>")
    (tmp_path / "c.png").write_text("my plot")
    plots = tmp_path / "plots"  # files of the names a report writes, none of them a report's
    plots.mkdir()
    (plots / "trials.csv").write_text("my trials")
    (plots / "history.png").write_text("my plot")
    theirs = [study, tmp_path / "t.db", mine, page / "index.html", tmp_path / "c.png"]
    theirs += [plots / "trials.csv", plots / "history.png"]
    before = [digest(path) for path in theirs]
    capsys.readouterr()
    for argv in (
        ["best", str(study), "--csv", str(study)],
        ["best", str(study), "--csv", str(tmp_path / "t.db")],
        ["best", str(study), "--csv", str(mine)],
        ["report", str(study), "--out", str(page)],
        ["report", str(study), "--out", str(plots)],
        ["report", str(study), "--out", str(tmp_path)],  # the study's own folder
        ["compare", str(study), str(study), "--out", str(mine)],
        ["compare", str(study), str(study), "--out", str(tmp_path / "c.csv")],  # c.png is mine
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "remove it or give another name" in err or "no `reftsearch report` wrote" in err
    assert [digest(path) for path in theirs] == before
    for argv in (  # their own files, written again
        ["best", str(study), "--csv", str(tmp_path / "trials.csv")],
        ["report", str(study), "--out", str(tmp_path / "report")],
    ):
        assert main(argv) == 0 and main(argv) == 0
    report = tmp_path / "report"
    (report / "notes.txt").write_text("mine, beside an earlier report")
    assert main(["report", str(study), "--out", str(report)]) == 2
    assert "holds files no `reftsearch report` wrote (notes.txt)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["best", "{study}", "--csv", "{tmp}/missing/trials.csv"], "does not exist"),
        (["best", "{study}", "--csv", "{tmp}"], "is a directory"),
        (["report", "{study}", "--out", "{tmp}/study.yaml"], "is not a directory"),
        (["dashboard", "{study}", "--port", "99999"], "--port: must be 0 to 65535"),
        (["run", "{study}", "--storage", "sqlite:///{tmp}"], "is a directory"),
        (
            ["run", "{study}", "--storage", "postgresql+psycopg://u:s3cret@127.0.0.1:abc/db"],
            "not a valid SQLAlchemy URL",
        ),
        (["compare", "{study}", "{study}", "--out", "{tmp}/missing/c.csv"], "does not exist"),
        (["compare", "{study}", "{study}", "--out", "{tmp}/c.png"], "name the table (.csv)"),
        # root passes a permission check anywhere: compare ran its arms, then could not write
        (["compare", "{study}", "{study}", "--out", "/proc/c.csv"], "cannot write in /proc"),
        (["dashboard", "{study}", "--host", ""], "--host: give an address to listen on"),
        (["run", "{study}", "--n-trials", str(2**64)], "at most 2,147,483,647"),
        (["estimate", "{study}", "--workers", "-3"], "--workers: must be a positive integer"),
        (["estimate", "{study}", "--storage", "foo://bar"], "storage: cannot use foo://bar"),
        (["export", "{study}", ""], "OUT_DIR: give a directory"),
        # an empty name (an unset variable) wrote nothing and said nothing, exit 0
        (["best", "{study}", "--csv", ""], "--csv: give a file name, got ''"),
        (["report", "{study}", "--out", ""], "--out: give a folder, got ''"),
        (["data", "{study}", "--out", ""], "--out: give a file name, got ''"),
        # refused before the rows are read and summed up, not after
        (["data", "{study}", "--out", "{tmp}/rows.txt"], "must end in .csv or .tsv"),
    ],
    ids=[
        "csv-folder",
        "csv-a-folder",
        "out-a-file",
        "port",
        "storage-folder",
        "port-text",
        "cmp",
        "cmp-png",
        "cmp-proc",
        "empty-host",
        "huge-count",
        "estimate-workers",
        "estimate-storage",
        "export-empty-dir",
        "csv-empty",
        "report-empty",
        "data-empty",
        "data-suffix",
    ],
)
def test_bad_output_paths_ports_and_storages_are_bad_input(
    write_study, easy_task_files, tmp_path, capsys, argv, message
):
    study = write_study(tiny_study(easy_task_files))
    before = digest(study)
    argv = [arg.format(study=study, tmp=tmp_path) for arg in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "s3cret" not in err
    assert digest(study) == before
    assert not (tmp_path / "t.db").exists()


def test_best_test_without_a_test_split_is_refused_before_any_retraining(
    write_study, easy_task_files, capsys
):
    data = {split: easy_task_files[split] for split in ("train", "dev")}
    study = write_study(tiny_study(data, budget={"n_trials": 1, "max_epochs": 1}))
    assert main(["run", str(study)]) == 0
    capsys.readouterr()
    assert main(["best", str(study), "--test"]) == 2
    err = capsys.readouterr().err
    assert "task.data.test: the study has no test split" in err and "retrain" not in err


def test_best_and_export_of_a_study_without_a_completed_trial_exit_2_alike(
    write_study, easy_task_files, tmp_path, capsys
):
    """``best`` exited 1 (a run that failed), ``export`` 2, for the same study state."""
    study = write_study(tiny_study(easy_task_files))
    spec = load_spec(study)
    open_study(spec, spec.storage, heartbeat=False)
    for argv, message in (
        (["best", str(study)], "has no completed trial yet"),
        (["export", str(study), str(tmp_path / "out")], "has no completed trial to export"),
    ):
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_warm_start_from_a_missing_study_is_bad_input_and_creates_nothing(
    write_study, easy_task_files, tmp_path, capsys
):
    raw = tiny_study(easy_task_files, warm_start=[{"study": "nope"}])
    assert main(["run", str(write_study(raw))]) == 2
    assert "warm_start.study: no study named 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "t.db").exists()

    # the storage exists and holds another study: unchanged
    db = f"sqlite:///{tmp_path}/t.db"
    other = write_study(tiny_study(easy_task_files, name="other", storage=db), "other.yaml")
    spec = load_spec(other)
    open_study(spec, spec.storage)
    before = digest(tmp_path / "t.db")
    assert main(["run", str(write_study(raw))]) == 2
    assert "warm_start.study: no study named 'nope' in this storage" in capsys.readouterr().err
    assert digest(tmp_path / "t.db") == before
    assert [s.study_name for s in optuna.get_all_study_summaries(spec.storage)] == ["other"]


@pytest.mark.parametrize(
    ("override", "said"),
    [
        (
            "space.rank=[1, 2, 4]",
            "space.rank: study 't' searched [1, 2], the spec now says [1, 2, 4]",
        ),
        ("space.layers=['all', '0;2']", "space.layers: study 't' searched ['all', '1;3']"),
        ("space.rank={low: 1, high: 4}", "space.rank: study 't' searched [1, 2], the spec now"),
    ],
    ids=["rank-widened", "layers-changed", "list-to-range"],
)
def test_resuming_with_a_changed_space_is_bad_input_and_changes_nothing(
    write_study, easy_task_files, tmp_path, capsys, override, said
):
    raw = tiny_study(easy_task_files, budget={"n_trials": 1, "max_epochs": 1})
    raw["space"]["layers"] = ["all", "1;3"]
    study = write_study(raw)
    assert main(["run", str(study)]) == 0
    before = digest(tmp_path / "t.db")
    capsys.readouterr()
    assert main(["run", str(study), "--n-trials", "3", "--set", override]) == 2
    err = capsys.readouterr().err
    assert said in err and "start a new study (--set name=NEW)" in err
    assert "warm_start: [{study: t}]" in err
    assert digest(tmp_path / "t.db") == before
    assert len(stored(load_spec(study).storage).trials) == 1


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("metric=f1", "metric: study 't' was searched with 'accuracy', the spec now says 'f1'"),
        ("model=tiny:bert", "model: study 't' was searched with 'tiny:llama'"),
    ],
    ids=["metric", "model"],
)
def test_a_study_read_or_resumed_with_another_metric_or_model_is_bad_input(
    write_study, easy_task_files, tmp_path, capsys, override, said
):
    """A resume with another metric relabelled the stored scores as the new metric's; one with
    another model copied the old model's results onto its trials of the same configs, and
    export retrained the pick on the other model."""
    study = write_study(tiny_study(easy_task_files, budget={"n_trials": 1, "max_epochs": 1}))
    assert main(["run", str(study)]) == 0
    before = digest(tmp_path / "t.db")
    capsys.readouterr()
    for command in (["run", str(study), "--n-trials", "2"], ["best", str(study)]):
        assert main([*command, "--set", override]) == 2
        err = capsys.readouterr().err
        assert said in err and "start a new one (--set name=NEW)" in err
    assert main(["export", str(study), str(tmp_path / "out"), "--set", override]) == 2
    assert digest(tmp_path / "t.db") == before and not (tmp_path / "out").exists()


def test_a_study_resumed_on_other_rows_is_bad_input_the_same_rows_elsewhere_are_not(
    write_study, easy_task_files, tmp_path, capsys
):
    """A resume on another dev file (or other train rows) ranked its new trials, scored on
    other rows, beside the first ones as if comparable."""
    study = write_study(tiny_study(easy_task_files, budget={"n_trials": 1, "max_epochs": 1}))
    assert main(["run", str(study)]) == 0
    before = digest(tmp_path / "t.db")
    capsys.readouterr()
    other_dev = tmp_path / "other_dev.csv"
    other_dev.write_text("".join(Path(easy_task_files["dev"]).read_text().splitlines(True)[:9]))
    for override, changed in (
        (f"task.data.dev={other_dev}", "the dev rows differ"),
        ("task.max_train_examples=50", "the train rows differ"),
    ):
        assert main(["run", str(study), "--n-trials", "2", "--set", override]) == 2
        err = capsys.readouterr().err
        assert f"task.data: {changed} from those study 't' was searched on" in err, err
    assert digest(tmp_path / "t.db") == before
    moved = tmp_path / "moved"  # the same rows in another place: the same study
    moved.mkdir()
    for split, path in easy_task_files.items():
        (moved / f"{split}.csv").write_text(Path(path).read_text())
    data = f"task.data={{train: {moved}/train.csv, dev: {moved}/dev.csv}}"
    assert main(["run", str(study), "--n-trials", "2", "--set", data]) == 0


def test_a_study_of_one_method_is_not_resumed_by_a_spec_of_another(
    write_study, easy_task_files, tmp_path, capsys
):
    """A LoRA study file copied from a ReFT one, its name unchanged, added LoRA trials to the
    ReFT study, ranked with them, and replaced the spec its workers join with."""
    study = write_study(tiny_study(easy_task_files, budget={"n_trials": 1, "max_epochs": 1}))
    assert main(["run", str(study)]) == 0
    lora = tiny_study(easy_task_files, budget={"n_trials": 2, "max_epochs": 1}, method="lora")
    lora["space"] = {"rank": [1, 2], "lr": 1e-3, "batch_size": 8}
    before = digest(tmp_path / "t.db")
    capsys.readouterr()
    assert main(["run", str(write_study(lora, "lora.yaml"))]) == 2
    assert "method: study 't' was searched with 'reft', the spec now says 'lora'" in (
        capsys.readouterr().err
    )
    assert digest(tmp_path / "t.db") == before


def test_a_model_directory_that_moved_is_the_same_model(tmp_path, easy_task_files):
    study = optuna.create_study()
    study.set_user_attr("model", "/old/checkout/models/my-bert")

    def spec_of(model: str):
        return parse_spec(tiny_study(easy_task_files, model=model), base_dir=tmp_path)

    check_same_setup(spec_of("./models/my-bert"), study)  # the project was cloned elsewhere
    with pytest.raises(BadInputError, match="model: study 't' was searched with"):
        check_same_setup(spec_of("./models/other"), study)


def test_a_run_whose_every_trial_failed_exits_1_with_the_reasons(
    write_study, easy_task_files, capsys
):
    raw = tiny_study(easy_task_files, budget={"n_trials": 2, "max_epochs": 1})
    raw["space"].update(lr=1e30, rank=1, suffix=1)  # every trial diverges
    assert main(["run", str(write_study(raw))]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: all 2 trials failed: 2 x diverged: training loss became nan in epoch 1"]


def test_workers_on_one_study_draw_different_configs_and_a_lone_run_is_reproducible(
    write_study, easy_task_files, tmp_path
):
    """Two workers with the spec's seed each (two `reftsearch run`s of one random study) drew
    the very same configs: a budget of 4 trained 2. Each is now seeded by its first trial."""
    raw = tiny_study(easy_task_files, budget={"n_trials": 4, "max_epochs": 1})
    spec = load_spec(write_study(raw))
    first, second = Worker(spec, spec.storage), Worker(spec, spec.storage)
    for n_trials, worker in zip((1, 2, 3, 4), (first, second, first, second), strict=True):
        worker.run(n_trials)
    trials = search_trials(stored(spec.storage))
    assert len(trials) == 4 and {t.state for t in trials} == {State.COMPLETE}
    assert not any(TrialRecord.of(t).copied_from is not None for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4
    assert Counter(t.user_attrs["worker"] for t in trials) == {trials[0].user_attrs["worker"]: 4}

    # one run alone draws the same configs each time: trial 0 with the spec's seed, as before
    lone = [
        load_spec(write_study({**raw, "storage": f"sqlite:///{tmp_path}/{i}.db"}, f"{i}.yaml"))
        for i in range(2)
    ]
    params = []
    for spec_i in lone:
        Worker(spec_i, spec_i.storage).run(2)
        params.append([t.params for t in stored(spec_i.storage).trials])
    assert params[0] == params[1] and params[0][0] == trials[0].params


# a process that asks for a trial (and, with --beat, beats once) and exits: the trial it
# leaves is a killed process's
ASK_AND_EXIT = """
import sys
from reftsearch.processes import worker_id
from reftsearch.search.study import open_study
from reftsearch.spec.study_file import load_spec
spec = load_spec(sys.argv[1])
study = open_study(spec, spec.storage)
trial = study.ask()
if "--beat" in sys.argv:
    study._storage.record_heartbeat(trial._trial_id)
if "--elsewhere" in sys.argv:  # a process of another host: this one cannot tell it is gone
    study._storage.set_trial_user_attr(trial._trial_id, "worker", "elsewhere:1")
print(trial.number, trial.suggest_float("lr", 1e-3, 1e-2, log=True), worker_id())
"""


def test_waiting_for_a_killed_processs_trial_says_so_then_retries_it(
    write_study, easy_task_files, tmp_path
):
    """After a SIGKILL on another host, the trial it ran stays RUNNING until its heartbeat
    is stale: the resumed run waits for it, and says why instead of nothing for minutes.
    One killed on this host is retried at once (its pid is gone): no wait."""
    raw = tiny_study(easy_task_files, budget={"n_trials": 1, "max_epochs": 1})
    raw["resources"] = {"heartbeat_s": 3}  # stale 6 s after its beat: the worker is loaded
    for host, waited in (["--elsewhere"], 1), ([], 0):
        storage = f"sqlite:///{tmp_path}/w{waited}.db"
        path = write_study({**raw, "storage": storage}, f"w{waited}.yaml")
        spec = load_spec(path)
        # as a killed process leaves it: RUNNING, its last heartbeat stored
        killed = [sys.executable, "-c", ASK_AND_EXIT, str(path), "--beat", *host]
        subprocess.run(killed, capture_output=True, check=True, env=ENV)
        lines = []
        Worker(spec, spec.storage, log=lines.append).run(1)
        waiting = [line for line in lines if line.startswith("waiting for trials [0]")]
        assert len(waiting) == waited and all("heartbeat is 6 s old" in w for w in waiting)
        trials = stored(spec.storage).trials
        assert [t.state for t in trials] == [State.FAIL, State.COMPLETE]
        assert trials[1].system_attrs["failed_trial"] == 0


def test_a_trial_of_a_live_process_is_not_ended_however_late_its_first_beat(
    write_study, easy_task_files, capsys
):
    """Under load a trial's first heartbeat can come late; its process runs here, so the
    trial is its own, not an orphan to end."""
    raw = tiny_study(easy_task_files, budget={"n_trials": 1, "max_epochs": 1})
    raw["resources"] = {"heartbeat_s": 1}
    spec = load_spec(write_study(raw))
    live = open_study(spec, spec.storage).ask()  # this test's process: alive, no heartbeat
    unstarted = UnstartedTrials(grace_s=0)
    unstarted.end_orphans(open_study(spec, spec.storage), print)
    assert "ended before it began training" not in capsys.readouterr().out
    assert stored(spec.storage).trials[live.number].state == State.RUNNING


def test_a_trial_of_a_process_whose_pid_another_now_has_is_not_that_ones(
    write_study, easy_task_files, capsys
):
    """A container restarted under its old host name hands out its small pids again: a dead
    worker's pid, now another process's, kept the dead one's trial from ever going stale.
    Each trial records when its process started, which tells the two apart."""
    raw = tiny_study(easy_task_files, budget={"n_trials": 2, "max_epochs": 1})
    raw["resources"] = {"heartbeat_s": 1}
    spec = load_spec(write_study(raw))
    study = open_study(spec, spec.storage)
    ours, earlier = study.ask(), study.ask()  # both stamped with this process's pid
    assert TrialRecord.of(ours).worker_started == pytest.approx(time.time(), abs=3600)
    for trial in (ours, earlier):
        study._storage.record_heartbeat(trial._trial_id)
    # the process that had this pid before this one: started an hour earlier
    started = TrialRecord.of(earlier).worker_started - 3600
    study._storage.set_trial_user_attr(earlier._trial_id, "worker_started", started)
    time.sleep(3.5)  # both heartbeats stale: SQLite keeps whole seconds, stale is > 2
    optuna.storages.fail_stale_trials(study)
    trials = stored(spec.storage).trials
    assert trials[ours.number].state == State.RUNNING  # this process runs it
    assert trials[earlier.number].state == State.FAIL  # retried: its process is gone
    assert trials[-1].system_attrs["failed_trial"] == earlier.number


def test_a_trial_whose_process_died_before_its_heartbeat_runs_again(
    write_study, easy_task_files, capsys
):
    """A process killed between Optuna's ask and its trial's first heartbeat left the trial
    RUNNING with no heartbeat: never stale, so the resumed run waited for it forever."""
    raw = tiny_study(easy_task_files, budget={"n_trials": 2, "max_epochs": 1})
    raw["resources"] = {"heartbeat_s": 1}
    path = write_study(raw)
    assert main(["run", str(path), "--n-trials", "1"]) == 0
    spec = load_spec(path)
    killed = subprocess.run(  # as a process killed between ask and heartbeat left it
        [sys.executable, "-c", ASK_AND_EXIT, str(path)],
        capture_output=True,
        text=True,
        check=True,
        env=ENV,
    )
    number, lr, killed_worker = killed.stdout.split()
    orphan = int(number)
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"trial {orphan}: {killed_worker} ended before it began training" in out
    trials = stored(spec.storage).trials
    assert trials[orphan].state == State.FAIL
    assert TrialRecord.of(trials[orphan]).fail_reason == INTERRUPTED
    rerun = trials[orphan + 1]  # its config, enqueued again, and the budget's last
    assert rerun.state == State.COMPLETE and rerun.params["lr"] == float(lr)
    assert count_finished(stored(spec.storage)) == 2


def test_a_heartbeat_the_storage_refuses_is_skipped_and_the_next_one_beats(tmp_path, monkeypatch):
    """Optuna's heartbeat thread ended at its first storage error (a server restarting, a
    lock held past the busy timeout): the live trial beat no more, other workers failed it as
    stale, and its run died when it reported."""
    monkeypatch.setattr(storage_module, "SQLITE_BUSY_TIMEOUT_S", 0.2)
    path = tmp_path / "s.db"
    storage = open_storage(f"sqlite:///{path}", heartbeat_s=1)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    with closing(sqlite3.connect(path, isolation_level=None)) as holder:
        holder.execute("BEGIN EXCLUSIVE")  # every write waits, then fails "database is locked"
        heartbeat = get_heartbeat_thread(trial._trial_id, storage)
        heartbeat.start()
        time.sleep(0.5)  # the first beat has failed
        assert storage.running_without_heartbeat(study._study_id) == {trial._trial_id}
        holder.execute("COMMIT")
    deadline = time.monotonic() + 5  # the next beat comes a second later
    try:
        while storage.running_without_heartbeat(study._study_id) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert storage.running_without_heartbeat(study._study_id) == set()
    finally:
        heartbeat.join()


def test_a_trial_names_its_process_from_the_moment_it_runs(tmp_path):
    """Before its heartbeat, before its objective: a Ctrl-C of a Ray run ends its actors'
    trials by this name (``interrupt_trials_of``)."""
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 's.db'}"))
    study.enqueue_trial({"x": 1.0})
    enqueued, new = study.ask(), study.ask()
    for trial in stored_trials(study, (enqueued, new)):
        assert trial.state == State.RUNNING and TrialRecord.of(trial).worker == worker_id()


def test_an_enqueued_trial_is_taken_by_one_of_the_runs_that_pop_it_at_once(tmp_path):
    """Optuna reads a WAITING trial's state, then writes RUNNING: on SQLite, two runs started
    at once both took the study's first enqueued trial, and the second to report died
    ("Trial#0 has already finished"). Four connections pop one trial, released together."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(storage=open_storage(url, heartbeat_s=None))
    for _ in range(3):
        study.enqueue_trial({"x": 1.0})
        (waiting,) = study.get_trials(states=(State.WAITING,))
        assert sorted(pop_at_once(url, waiting._trial_id, 4)) == [False, False, False, True]
        study.tell(waiting.number, state=State.FAIL)


def pop_at_once(url: str, trial_id: int, connections: int) -> list[bool]:
    """Whether each of ``connections`` storages, released together, took ``trial_id``."""
    storages = [open_storage(url, heartbeat_s=None) for _ in range(connections)]
    released = threading.Barrier(connections)
    taken: list[bool] = []

    def pop(storage: optuna.storages.RDBStorage) -> None:
        released.wait()
        taken.append(storage.set_trial_state_values(trial_id, State.RUNNING))

    threads = [threading.Thread(target=pop, args=(storage,)) for storage in storages]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return taken


def stored_trials(study: optuna.Study, trials) -> list[optuna.trial.FrozenTrial]:
    return [study._storage.get_trial(trial._trial_id) for trial in trials]


def enqueue_again(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> None:
    """Enqueue ``trials``' runs once more, as a second process that read the study before the
    first one had enqueued them does."""
    for trial in trials:
        study.enqueue_trial(trial.system_attrs["fixed_params"], user_attrs=trial.user_attrs)


def test_runs_enqueued_twice_train_and_count_once(write_study, easy_task_files, capsys):
    """Two runs that start a new study at once both enqueued its warm starts, and two that
    end its search at once both enqueued its reruns: each copy trained as a run of its own
    (the warm starts counted twice against the budget). The first copy runs; the others end
    unrun, counted nowhere, printed nowhere."""
    study = write_study(warm_started_study(easy_task_files))
    spec = load_spec(study)
    worker = Worker(spec, spec.storage)
    enqueue_warm_starts(worker.study, paper_recipes("classification", 4), spec.space, 4)
    enqueue_again(worker.study, worker.study.get_trials(states=(State.WAITING,)))
    worker.run(3)
    enqueue_finalize(worker.study, spec.finalize)
    enqueue_again(worker.study, worker.study.get_trials(states=(State.WAITING,)))
    capsys.readouterr()
    assert main(["run", str(study)]) == 0  # the finalize step pops the reruns
    out = capsys.readouterr().out

    trials = stored(spec.storage).get_trials()
    assert runs_trained(trials) == {
        ("paper-glue-lr0.003", None, None): 1,
        ("paper-glue-lr0.01", None, None): 1,
        (None, None, None): 1,  # the sampled third trial
        (None, ran_first(stored(spec.storage)), 11): 1,
    }
    copies = [t for t in trials if TrialRecord.of(t).duplicate_of is not None]
    assert [TrialRecord.of(t).duplicate_of for t in copies] == [0, 1, 5]
    assert all(t.state == State.FAIL and "config" not in t.user_attrs for t in copies)
    assert count_finished(stored(spec.storage)) == 3
    assert not [t for t in trials if t.state in (State.RUNNING, State.WAITING)]
    assert "finalize: 1 runs" in out and f"[1/1] trial {copies[-1].number - 1} " in out
    assert f"trial {copies[-1].number} " not in out
    assert main(["best", str(study), "--csv", str(study.with_suffix(".csv"))]) == 0
    notes = study.with_suffix(".csv").read_text()
    assert "not run: trial 0 runs the same enqueued config" in notes


def warm_started_study(data) -> dict:
    """3 trials, two of them the paper's warm starts, then the best one rerun with seed 11."""
    raw = tiny_study(data, finalize={"top_k": 1, "seeds": [11]})
    raw["space"].update(prefix={"low": 0, "high": 1}, suffix={"low": 0, "high": 1})
    raw.update(warm_start={"recipes": "paper"}, budget={"n_trials": 3, "max_epochs": 1})
    # two distinct warm starts: rank 4 is fixed to 1, which makes the rank-4 recipe a duplicate
    raw["space"].update(lr={"low": 3e-3, "high": 1e-2, "log": True}, rank=1)
    return raw


def runs_trained(trials: list[optuna.trial.FrozenTrial]) -> Counter:
    """How often each run trained, by warm start, then trial and seed it reruns."""
    records = [TrialRecord.of(t) for t in trials if t.state == State.COMPLETE]
    return Counter((r.warm_start, r.finalize_of, r.seed) for r in records)


@pytest.mark.slow
def test_two_runs_started_at_once_train_each_enqueued_run_once(write_study, easy_task_files):
    """The same, as it happens: two `reftsearch run`s of one new study started at once."""
    study = write_study(warm_started_study(easy_task_files))
    runs = [start_run(study), start_run(study)]
    outs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outs
    trials = stored(load_spec(study).storage).get_trials()
    assert runs_trained(trials) == {
        ("paper-glue-lr0.003", None, None): 1,
        ("paper-glue-lr0.01", None, None): 1,
        (None, None, None): 1,
        (None, ran_first(stored(load_spec(study).storage)), 11): 1,
    }
    assert count_finished(stored(load_spec(study).storage)) == 3
    assert not [t for t in trials if t.state in (State.RUNNING, State.WAITING)]


def test_a_copy_runs_when_the_earlier_copy_failed():
    """An interrupted warm start was enqueued again (``give_back``): that copy must run; a
    copy of a run that is still waiting, running or done must not."""
    study = optuna.create_study()
    for record in ({"warm_start": "a"}, {"warm_start": "a"}, {"finalize_of": 0, "seed": 1}):
        study.enqueue_trial({}, user_attrs=TrialRecord(**record).to_user_attrs())
    first = study.ask()
    refuse_duplicate(first)  # the first copy runs
    second = study.ask()
    with pytest.raises(TrialFailed, match="not run: trial 0 runs the same enqueued config"):
        refuse_duplicate(second)  # while the first runs
    study.tell(second, state=State.FAIL)
    study.tell(first, state=State.FAIL)
    study.enqueue_trial({}, user_attrs=TrialRecord(warm_start="a").to_user_attrs())
    refuse_duplicate(study.ask())  # trial 2: the rerun of trial 0, another run
    refuse_duplicate(study.ask())  # trial 3: the interrupted warm start's copy runs


def test_stopped_workers_trials_end_interrupted_with_what_they_drew_enqueued_again():
    """A Ray actor stopped at a Ctrl-C may have asked a trial and drawn none, some or all of
    its config: each ends interrupted; what it drew (with what it was enqueued with) runs
    again, and one that drew nothing leaves nothing to run."""
    study = optuna.create_study()
    study.enqueue_trial({"x": 0.5})
    enqueued, nothing, partial, other = (study.ask() for _ in range(4))
    partial.suggest_float("x", 0, 1)
    for trial in (enqueued, nothing, partial, other):
        store(trial, worker="here:1" if trial is not other else "elsewhere:2")
    assert interrupt_trials_of(study, {"here:1"}) == [0, 1, 2]
    trials = study.get_trials()
    assert [t.state for t in trials[:4]] == [State.FAIL] * 3 + [State.RUNNING]
    assert all(TrialRecord.of(t).fail_reason == INTERRUPTED for t in trials[:3])
    waiting = [t.system_attrs["fixed_params"] for t in trials if t.state == State.WAITING]
    assert waiting == [{"x": 0.5}, {"x": partial.params["x"]}]


def ran_first(study: optuna.Study) -> int:
    """The search trial finalize reruns: the first of the search's ranking."""
    return top_search_trials(study, 1)[0].number


RACE = """
import os, sys, time
import optuna
from reftsearch.search import storage as storage_module
from reftsearch.search.storage import open_storage
go, url = sys.argv[1:]
while not os.path.exists(go):
    time.sleep(0.001)
study = optuna.create_study(study_name="t", storage=open_storage(url), load_if_exists=True)
print(study.study_name)
"""


def test_processes_creating_one_new_storage_at_once_all_get_the_study(tmp_path):
    """Two runs creating one new SQLite study at once: one failed with a 60-line traceback,
    "table studies already exists". Eight processes start the moment a file appears."""
    url = f"sqlite:///{tmp_path}/t.db"
    go = tmp_path / "go"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(go), url],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    time.sleep(5)  # let them import (no assertion on it: a late one only races less)
    go.touch()
    results = [process.communicate(timeout=120) for process in processes]
    assert [p.returncode for p in processes] == [0] * 8, [err for _, err in results]
    assert [out.strip() for out, _ in results] == ["t"] * 8
    assert len(optuna.get_all_study_summaries(url)) == 1


def slow_study(write_study, files, storage=None, n_trials=4, heartbeat_s=60):
    """Trials of a few seconds (batch 4, 4 epochs), so that one can be stopped mid-way."""
    raw = tiny_study(files, budget={"n_trials": n_trials, "max_epochs": 4})
    raw["resources"] = {"heartbeat_s": heartbeat_s}
    if storage is not None:
        raw["storage"] = storage
    raw["space"].update(batch_size=4, epochs=4)
    return write_study(raw)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_trial_is_not_counted_and_runs_again_on_resume(
    write_study, easy_task_files, signum
):
    """Ctrl-C left the trial FAIL with no reason, counted and never retried: a budget of 4
    trained 3 configs. SIGTERM (a scheduler's stop) killed the process outright."""
    study = slow_study(write_study, easy_task_files)
    url = load_spec(study).storage
    driver = start_run(study)
    victim = wait_for_trial_mid_way(url, driver, completed=1)
    driver.send_signal(signum)
    out, _ = driver.communicate(timeout=120)
    assert driver.returncode == 1, out
    assert out.strip().splitlines()[-1] == "interrupted: run the same command again to resume"
    trials = stored(url).get_trials()
    assert trials[victim.number].state == State.FAIL
    assert trials[victim.number].user_attrs["fail_reason"] == INTERRUPTED
    (again,) = [t for t in trials if t.state == State.WAITING]
    assert again.system_attrs["fixed_params"] == victim.params
    assert count_finished(stored(url)) == victim.number  # those before it; it does not count

    resumed = start_run(study)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    result = stored(url)
    completed = [t for t in search_trials(result) if t.state == State.COMPLETE]
    assert count_finished(result) == len(completed) == 4  # four configs trained
    assert [t.params for t in completed if t.number == again.number] == [victim.params]
    assert not result.get_trials(states=(State.RUNNING, State.WAITING))


def suspend_past_the_grace(process: subprocess.Popen, url: str, checker) -> None:
    """Stop ``process`` mid-trial (Ctrl-Z, a machine asleep) for longer than twice its
    heartbeat, run the stale check on the study ``checker()`` opens, and let it go on."""
    wait_for_trial_mid_way(url, process)
    process.send_signal(signal.SIGSTOP)
    try:
        time.sleep(3)  # heartbeat_s 1: stale after 2 s
        optuna.storages.fail_stale_trials(checker())
    finally:
        process.send_signal(signal.SIGCONT)


@pytest.mark.slow
def test_a_suspended_run_is_not_failed_as_stale_by_a_process_of_its_host(
    write_study, easy_task_files
):
    """A run stopped past twice its heartbeat (Ctrl-Z, then fg) had its trial failed as
    stale by another worker and died when it resumed and reported ("Cannot tell a FAIL
    trial"). On its own host its process can be seen alive: its trial is not stale."""
    path = slow_study(write_study, easy_task_files, n_trials=2, heartbeat_s=1)
    spec = load_spec(path)
    run = start_run(path)
    suspend_past_the_grace(run, spec.storage, lambda: open_study(spec, spec.storage))
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 0, out
    states = [t.state for t in stored(spec.storage).trials]
    assert states == [State.COMPLETE, State.COMPLETE], out


@pytest.mark.slow
def test_a_trial_failed_as_stale_from_another_host_is_left_to_its_retry(
    write_study, easy_task_files
):
    """A process on another host cannot see the suspended one: it fails the trial and
    enqueues its retry. The resumed run gives the trial up, says why, and runs on: the
    budget is met with every config trained, the retry's included."""
    path = slow_study(write_study, easy_task_files, n_trials=2, heartbeat_s=1)
    spec = load_spec(path)
    run = start_run(path)
    elsewhere = optuna.storages.RDBStorage(  # Optuna's own check, as a worker elsewhere runs it
        spec.storage,
        heartbeat_interval=1,
        grace_period=2,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(1),
    )
    suspend_past_the_grace(
        run, spec.storage, lambda: optuna.load_study(study_name="t", storage=elsewhere)
    )
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 0, out
    assert "Traceback" not in out and "Cannot tell" not in out, out
    trials = stored(spec.storage).trials
    failed = [t for t in trials if t.state == State.FAIL]
    assert len(failed) == 1, out
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == failed[0].number]
    assert (
        f"trial {failed[0].number}: another process failed it as stale (no heartbeat from this "
        f"one for over 2 s: suspended, or the storage out of reach); it runs again as trial "
        f"{retry.number}"
    ) in out
    assert retry.state == State.COMPLETE and retry.params == failed[0].params
    assert count_finished(stored(spec.storage)) == 2
    assert not stored(spec.storage).get_trials(states=(State.RUNNING, State.WAITING))


@pytest.mark.parametrize("where", ["ask", "tell"])
def test_a_ctrl_c_in_optunas_ask_or_tell_ends_the_trial_as_interrupted(
    write_study, easy_task_files, capsys, monkeypatch, where
):
    """A signal in ``ask`` (the trial just created) left it RUNNING with no heartbeat: the
    resumed run waited for it forever. One in ``tell`` came out of Optuna as a traceback
    (UnboundLocalError) and left the trained trial RUNNING until its heartbeat was stale."""
    path = write_study(tiny_study(easy_task_files, budget={"n_trials": 2, "max_epochs": 1}))
    assert main(["run", str(path), "--n-trials", "1"]) == 0
    if where == "ask":  # the trial just created, RUNNING, when the signal comes
        real_ask = optuna.Study.ask

        def signalled(study, *args, **kwargs):
            trial = real_ask(study, *args, **kwargs)
            if study.study_name != "t":  # the estimate's draft study
                return trial
            monkeypatch.undo()  # once: the interrupt's clean-up asks for itself
            raise KeyboardInterrupt

        monkeypatch.setattr(optuna.Study, "ask", signalled)
    else:  # the trial trained, its tell not yet stored

        def signalled(*args, **kwargs):
            monkeypatch.undo()
            raise KeyboardInterrupt

        monkeypatch.setattr(optuna.study._optimize, "_tell_with_warning", signalled)
    capsys.readouterr()
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "interrupted: run the same command again to resume"
    assert "Traceback" not in err and "failed with parameters" not in err, err
    trials = stored(load_spec(path).storage).trials
    assert [t.state for t in trials[:2]] == [State.COMPLETE, State.FAIL]
    assert TrialRecord.of(trials[1]).fail_reason == INTERRUPTED
    assert main(["run", str(path)]) == 0  # no wait: the budget's last trial trains
    assert count_finished(stored(load_spec(path).storage)) == 2


def test_a_second_ctrl_c_does_not_cut_the_first_ones_clean_up_short():
    """Ctrl-C pressed twice: the second arrived inside the first one's clean-up (the trial's
    config given back), and that config was lost from the study."""
    cleaned = []

    def command() -> int:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # interrupted at once
        except KeyboardInterrupt:
            os.kill(os.getpid(), signal.SIGTERM)  # pressed again while cleaning up
            time.sleep(0.1)
            cleaned.append("given back")
            raise
        return 0

    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    assert report_errors(command) == 1 and cleaned == ["given back"]
    assert {signum: signal.getsignal(signum) for signum in before} == before


@pytest.mark.parametrize(
    ("command", "last_line"),
    [
        ("run", "interrupted: run the same command again to resume"),
        ("estimate", "interrupted: run the same command again"),
        ("best", "interrupted: run the same command again"),
    ],
)
def test_an_interrupt_says_resume_only_for_commands_that_run_trials(
    command, last_line, write_study, easy_task_files, monkeypatch, capsys
):
    """`best` or `estimate` stopped by Ctrl-C said to run it again "to resume"."""
    study = write_study(tiny_study(easy_task_files))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_spec", interrupted)
    assert main([command, str(study)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == last_line


@pytest.mark.slow
def test_an_interrupted_seed_rerun_says_so_and_runs_on_resume(write_study, easy_task_files):
    """A finalize rerun stopped by Ctrl-C stayed FAIL with no reason."""
    raw = tiny_study(
        easy_task_files,
        budget={"n_trials": 1, "max_epochs": 40},
        finalize={"top_k": 1, "seeds": [11]},
    )
    raw["space"].update(batch_size=4, epochs=40)  # seconds a trial: time to stop the rerun
    study = write_study(raw)
    url = load_spec(study).storage
    driver = start_run(study)
    rerun = wait_for_running_rerun(url, driver)
    driver.send_signal(signal.SIGINT)
    out, _ = driver.communicate(timeout=120)
    assert driver.returncode == 1, out
    stopped = stored(url).trials[rerun.number]
    assert stopped.state == State.FAIL and stopped.user_attrs["fail_reason"] == INTERRUPTED

    resumed = start_run(study)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    reruns = [t for t in stored(url).trials if TrialRecord.of(t).finalize_of is not None]
    assert [t.state for t in reruns] == [State.FAIL, State.COMPLETE]
    assert reruns[1].params == rerun.params


SECRET = "s3cret"  # trust auth ignores the password; it must still never be printed


def with_password(url: str) -> str:
    return make_url(url).set(password=SECRET).render_as_string(hide_password=False)


def one_error_line(out: str) -> str:
    """The run's last line, after checking that no traceback came before it."""
    assert "Traceback" not in out and "Exception in thread" not in out, out
    return out.strip().splitlines()[-1]


@pytest.mark.parametrize("outage", ["connections-refused", "database-dropped"])
def test_postgres_lost_mid_run_ends_in_one_line_and_resumes(
    write_study, easy_task_files, postgres_url, outage
):
    """PostgreSQL unreachable mid-run gave 150-330 lines of traceback ending in
    UnboundLocalError or StorageInternalError. A real server: its connections are cut
    (pg_terminate_backend) and refused, then allowed again; or the database is dropped."""
    url = with_password(postgres_url)
    name = make_url(url).database
    study = slow_study(write_study, easy_task_files, url, heartbeat_s=1)
    driver = start_run(study)
    wait_for_trial_mid_way(url, driver, completed=1)
    before = {t.number: (t.value, t.params) for t in stored(url).trials if t.value is not None}
    with postgres_admin() as admin:
        if outage == "database-dropped":
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        else:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
        out, _ = driver.communicate(timeout=300)
        assert driver.returncode == 1, out
        line = one_error_line(out)
        masked = make_url(url).render_as_string(hide_password=True)
        assert line.startswith(f"error: storage {masked} failed: "), line
        assert line.endswith("run the same command again to resume once it is back")
        assert SECRET not in out
        if outage == "database-dropped":
            return
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')

    resumed = start_run(study)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    result = stored(url)
    assert {n: (result.trials[n].value, result.trials[n].params) for n in before} == before
    assert count_finished(result) == 4
    assert not result.get_trials(states=(State.RUNNING, State.WAITING))


def test_a_full_disk_mid_run_ends_in_one_line_and_resumes(write_study, easy_task_files, tmp_path):
    """The run's process may write no file past its database's size + 64 KB (RLIMIT_FSIZE,
    SIGXFSZ ignored), as on a full disk: SQLite says "database or disk is full" for a write
    that comes back short, "disk I/O error" for one refused outright."""
    study = write_study(tiny_study(easy_task_files, budget={"n_trials": 1, "max_epochs": 1}))
    assert main(["run", str(study)]) == 0
    db = tmp_path / "t.db"
    (first,) = stored(f"sqlite:///{db}").trials
    limit = db.stat().st_size + 64 * 1024

    def full_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = [sys.executable, "-m", "reftsearch.cli", "run", str(study), "--n-trials", "30"]
    ran = subprocess.run(command, env=ENV, capture_output=True, text=True, preexec_fn=full_disk)
    assert ran.returncode == 1, ran.stdout + ran.stderr
    line = one_error_line(ran.stderr)
    assert line.startswith(f"error: storage sqlite:///{db} failed: "), line
    assert "database or disk is full" in line or "disk I/O error" in line, line
    assert count_finished(stored(f"sqlite:///{db}")) < 30

    assert main(["run", str(study), "--n-trials", "3"]) == 0
    result = stored(f"sqlite:///{db}")
    assert result.trials[0].params == first.params and result.trials[0].value == first.value
    assert count_finished(result) >= 3
    assert not result.get_trials(states=(State.RUNNING, State.WAITING))


def test_an_existing_study_on_a_full_disk_is_no_room_not_a_bad_file(
    write_study, easy_task_files, tmp_path
):
    """Opening a study, even to read it, makes SQLite's shared-memory file beside it: on a
    full disk that failed as "not a readable SQLite database (disk I/O error)", exit 2,
    blaming the user's file. With no room even for Python's probe of the temporary folder,
    the import of datasets (through dill) ended in a traceback."""
    study = write_study(tiny_study(easy_task_files, budget={"n_trials": 1, "max_epochs": 1}))
    command = [sys.executable, "-m", "reftsearch.cli", "run", str(study)]
    subprocess.run(command, env=ENV, capture_output=True, check=True)  # its SQLite files closed
    db = tmp_path / "t.db"
    before = db.read_bytes()
    no_room = "free some space, "
    for limit, expected in (
        (1024, f"error: storage: no room beside {db} for SQLite's files (File too large); "),
        (0, "error: cannot write temporary files (No usable temporary directory found in "),
    ):

        def full_disk(limit=limit):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        again = [*command, "--n-trials", "2"]
        ran = subprocess.run(again, env=ENV, capture_output=True, text=True, preexec_fn=full_disk)
        assert ran.returncode == 1, ran.stdout + ran.stderr
        line = one_error_line(ran.stderr)
        assert line.startswith(expected) and no_room in line.lower(), line
        assert db.read_bytes() == before


@pytest.mark.parametrize("fault", ["storage", "disk"])
def test_a_trial_cut_short_by_the_storage_or_a_full_disk_is_not_counted(
    write_study, easy_task_files, tmp_path, monkeypatch, capsys, caplog, fault
):
    """PostgreSQL's connections cut mid-trial (the next one made again), or the disk full as
    the trial's weights were kept: the trial was stored as a plain FAIL, counted against the
    budget with its config never trained, and Optuna's warning printed three tracebacks."""
    study = write_study(tiny_study(easy_task_files, budget={"n_trials": 2, "max_epochs": 2}))
    url = load_spec(study).storage
    if fault == "storage":  # once, as a cut connection fails one statement
        report = optuna.storages.RDBStorage.set_trial_intermediate_value
        cut = sqlalchemy.exc.OperationalError("UPDATE", {}, Exception("terminating connection"))
        calls = Counter()

        def failing_once(self, *args):
            calls["report"] += 1
            if calls["report"] == 1:
                raise cut
            return report(self, *args)

        monkeypatch.setattr(
            optuna.storages.RDBStorage, "set_trial_intermediate_value", failing_once
        )
        expected = f"error: storage {url} failed: "
    else:

        def disk_full(**kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(optuna.artifacts, "upload_artifact", disk_full)
        folder = tmp_path / "t.artifacts"  # where: the error said no more than "no room"
        expected = f"error: no room to write: [Errno 28] No space left on device: '{folder}'"
    assert main(["run", str(study)]) == 1
    assert one_error_line(capsys.readouterr().err).startswith(expected)
    assert "failed with parameters" not in caplog.text  # Optuna's warning, with a traceback
    cut_short = stored(url).trials[0]  # its config given back: enqueued again
    assert cut_short.state == State.FAIL and cut_short.user_attrs["fail_reason"] == INTERRUPTED

    monkeypatch.undo()
    assert main(["run", str(study)]) == 0
    result = stored(url)
    assert count_finished(result) == 2
    trained = [t.params for t in result.trials if t.state == State.COMPLETE]
    assert len(trained) == 2 and cut_short.params in trained


def no_room(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def part_then_no_room(self, path, *args, **kwargs):
    """A write that fills the disk: part of the file is there, then ENOSPC."""
    Path(path).write_text("number,val")
    no_room()


class PartThenNoRoomWriter:
    def __init__(self, file, **kwargs):
        self.file = file

    def writerow(self, row):
        self.file.write("split,row")

    def writerows(self, rows):
        no_room()


def test_a_full_disk_leaves_earlier_outputs_whole_and_no_partial_file(
    write_study, easy_task_files, tmp_path, monkeypatch, capsys
):
    """best --csv, data --out, predict --out, compare --out: a traceback and a truncated (or
    0-byte) file that then blocked the retry; report --out: a truncated history.png beside
    the new trials.csv and the old page."""
    study = write_study(tiny_study(easy_task_files, budget={"n_trials": 1, "max_epochs": 1}))
    assert main(["run", str(study)]) == 0
    csv, listed, report = tmp_path / "trials.csv", tmp_path / "rows.csv", tmp_path / "report"
    for argv in (["best", "--csv", csv], ["data", "--out", listed], ["report", "--out", report]):
        assert main([argv[0], str(study), *map(str, argv[1:])]) == 0
    before = {path: digest(path) for path in [csv, listed, *report.iterdir()]}

    monkeypatch.setattr(pd.DataFrame, "to_csv", part_then_no_room)
    monkeypatch.setattr(csv_module, "writer", PartThenNoRoomWriter)
    monkeypatch.setattr(Figure, "savefig", part_then_no_room)
    capsys.readouterr()
    for argv, option, path in (
        (["best", "--csv", csv], "--csv", csv),
        (["data", "--out", listed], "--out", listed),
        (["report", "--out", report], "--out", report),
    ):
        assert main([argv[0], str(study), *map(str, argv[1:])]) == 1
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith(f"error: {option} {path}: no room to write it ("), line
    assert {path: digest(path) for path in before} == before
    assert sorted(p.name for p in tmp_path.iterdir() if "partial" in p.name) == []
    assert sorted(p.name for p in report.iterdir()) == sorted(
        p.name for p in before if p.parent == report
    )


def test_predict_and_compare_on_a_full_disk_leave_earlier_outputs_and_no_partial_file(
    write_study, easy_task_files, tmp_path, monkeypatch, capsys
):
    """predict --out and compare --out write through the same whole-file writer as best
    --csv: a full disk under them is one line, no part of a file, and compare's earlier
    table and plot as they were."""
    raw = tiny_study(easy_task_files, budget={"n_trials": 1, "max_epochs": 1})
    studies = [write_study(raw), write_study({**raw, "name": "u"}, "u.yaml")]
    table = tmp_path / "compared.csv"
    assert main(["compare", *map(str, studies), "--out", str(table)]) == 0
    before = {path: digest(path) for path in (table, table.with_suffix(".png"))}
    predicted = tmp_path / "predicted.txt"

    def part_then_no_room_text(self, data, *args, **kwargs):
        with open(self, "w") as file:
            file.write(data[:3])
        no_room()

    monkeypatch.setattr(pd.DataFrame, "to_csv", part_then_no_room)
    monkeypatch.setattr(Figure, "savefig", part_then_no_room)
    monkeypatch.setattr(Path, "write_text", part_then_no_room_text)
    capsys.readouterr()
    for argv, path in (
        (["predict", str(studies[0]), "--text", "good", "--out", str(predicted)], predicted),
        (["compare", *map(str, studies), "--out", str(table)], table),
    ):
        assert main(argv) == 1
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith(f"error: --out {path}: no room to write it ("), line
    assert {path: digest(path) for path in before} == before
    assert not predicted.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if "partial" in p.name) == []


def test_a_file_written_whole_keeps_links_and_never_replaces_in_exclusive_mode(
    tmp_path, monkeypatch
):
    real, link = tmp_path / "real.csv", tmp_path / "link.csv"
    real.write_text("old")
    link.symlink_to(real)
    with written_whole(link) as scratch:
        scratch.write_text("new")
    assert link.is_symlink() and real.read_text() == "new"  # through the link, as open() did
    with pytest.raises(FileExistsError), written_whole(real, exclusive=True) as scratch:
        scratch.write_text("newer")
    assert real.read_text() == "new"

    def no_hard_links(*args):  # a file system without them (FAT, some FUSE mounts)
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_hard_links)
    with written_whole(tmp_path / "made.txt", exclusive=True) as scratch:
        scratch.write_text("made")
    assert (tmp_path / "made.txt").read_text() == "made"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.csv", "made.txt", "real.csv"]


def test_best_csv_into_a_pipe_is_written_not_read(write_study, easy_task_files, tmp_path):
    """`best --csv /dev/stdout | cat` hung for ever: the check that the file is one best
    wrote read the pipe's first bytes."""
    study = write_study(tiny_study(easy_task_files, budget={"n_trials": 1, "max_epochs": 1}))
    assert main(["run", str(study)]) == 0
    pipe = tmp_path / "pipe.csv"
    os.mkfifo(pipe)
    read = {}
    reader = threading.Thread(target=lambda: read.update(text=pipe.read_text()))
    reader.start()
    command = [sys.executable, "-m", "reftsearch.cli", "best", str(study), "--csv", str(pipe)]
    try:
        ran = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
    finally:
        if reader.is_alive():  # the command never opened the pipe to write: let the reader go
            with open(pipe, "w"):
                pass
        reader.join()
    assert ran.returncode == 0, ran.stderr
    assert read["text"].startswith("number,")


@pytest.mark.slow
def test_two_runs_started_at_once_on_a_new_random_study_share_the_budget(
    write_study, easy_task_files
):
    """Two `reftsearch run`s of one new study: one died on "table studies already exists",
    or both drew the same random configs (4 budget slots, 2 configs)."""
    raw = tiny_study(easy_task_files, budget={"n_trials": 4, "max_epochs": 1})
    study = write_study(raw)
    url = load_spec(study).storage
    runs = [start_run(study), start_run(study)]
    outs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outs
    result = stored(url)
    trials = search_trials(result)
    assert count_finished(result) == len(trials) == 4
    assert {t.state for t in trials} == {State.COMPLETE}
    assert not any(TrialRecord.of(t).copied_from is not None for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4


def test_read_only_commands_create_no_tables_in_an_empty_postgres_database(
    write_study, easy_task_files, postgres_url, capsys
):
    study = write_study(tiny_study(easy_task_files, storage=with_password(postgres_url)))
    for command in (["best"], ["report"], ["dashboard", "--port", "0"]):
        assert main([command[0], str(study), *command[1:]]) == 2
        err = capsys.readouterr().err
        assert "holds no Optuna studies" in err and SECRET not in err
    tables = sqlalchemy.inspect(sqlalchemy.create_engine(postgres_url)).get_table_names()
    assert tables == []


def test_a_warm_start_from_an_unreachable_storage_is_bad_input_not_a_storage_failure(
    write_study, easy_task_files, tmp_path, capsys
):
    """Its connection error is the context of the bad-input error: it stays exit code 2."""
    source = {"study": "nope", "storage": f"postgresql+psycopg://u:{SECRET}@127.0.0.1:1/none"}
    raw = tiny_study(easy_task_files, warm_start=[source])
    assert main(["run", str(write_study(raw))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: warm_start.study: storage: cannot connect to 127.0.0.1")
    assert SECRET not in err and not (tmp_path / "t.db").exists()
