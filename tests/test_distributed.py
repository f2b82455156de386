"""Many workers on one PostgreSQL study: Ray actors and stand-alone workers, kill -9 survived.

Real Ray, real PostgreSQL (tests/conftest.py ``postgres_url``), the tiny random Llama.
Heartbeats every second, so a killed trial is found stale after two.
"""

import multiprocessing
import os
import re
import signal
import sys
import time
from collections import Counter
from functools import partial

import optuna
import psutil
import pytest
from conftest import tiny_study
from sqlalchemy.engine import make_url
from subprocess_runs import State, start_run, stored, wait_for_trial_mid_way

from reftsearch.cli import STORAGE_ENV, main
from reftsearch.errors import TrialFailed
from reftsearch.results.best_table import trials_frame
from reftsearch.run import worker
from reftsearch.search.record import TrialRecord, search_trials
from reftsearch.search.study import INTERRUPTED, asked_past_budget, count_finished, open_study
from reftsearch.spec.study_file import load_spec

SECRET = "s3cret"  # trust auth ignores the password; it must still never be printed


def with_password(url: str, database: str | None = None) -> str:
    parsed = make_url(url).set(password=SECRET)
    return parsed.set(database=database or parsed.database).render_as_string(hide_password=False)


def slow_study(write_study, files, url, n_trials, epochs=4, **changes):
    """Trials of a few seconds (batch 4, 4 epochs), so that one can be killed mid-way."""
    raw = tiny_study(
        files,
        storage=url,
        budget={"n_trials": n_trials, "max_epochs": epochs},
        resources={"heartbeat_s": 1, "cpus_per_trial": 0.5},
        **changes,
    )
    raw["space"].update(batch_size=4, epochs=epochs)
    return write_study(raw)


def ray_processes_started_after(moment: float) -> list[str]:
    names = ("raylet", "gcs_server")
    return [
        p.info["name"]
        for p in psutil.process_iter(["name", "create_time"])
        if p.info["name"] in names and p.info["create_time"] >= moment
    ]


def assert_retried_once(trials, victim) -> None:
    assert trials[victim.number].state == State.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1
    assert retries[0].params == victim.params and retries[0].state == State.COMPLETE


@pytest.mark.ray
def test_ray_workers_share_a_study_and_a_killed_worker_is_retried(
    write_study, easy_task_files, postgres_url
):
    url = with_password(postgres_url)
    # 40 epochs: the victim, stopped after its first, cannot finish as the driver stops
    study = slow_study(write_study, easy_task_files, url, n_trials=6, epochs=40)
    began = time.time()
    driver = start_run(study, "--workers", "2")
    victim = wait_for_trial_mid_way(url, driver)
    host, pid = victim.user_attrs["worker"].rsplit(":", 1)
    os.kill(int(pid), signal.SIGKILL)  # a Ray actor, mid-trial
    out, _ = driver.communicate(timeout=240)
    assert driver.returncode == 0, out

    result = stored(url)
    trials = result.get_trials()
    assert_retried_once(trials, victim)
    assert count_finished(result) == 6
    assert not result.get_trials(states=(State.RUNNING, State.WAITING))
    completed = [t for t in trials if t.state == State.COMPLETE]
    # both workers took trials of the one study (the victim its killed one: on a fast machine
    # the other finishes the rest before the victim's replacement has loaded the model), and
    # a worker ran several
    ran = [TrialRecord.of(t) for t in trials if TrialRecord.of(t).past_budget is None]
    per_worker = Counter(record.worker for record in ran if record.worker is not None)
    assert len(per_worker) >= 2 and max(per_worker.values()) >= 2, per_worker
    # each actor (the restarted one too) loaded the model once and reused it for every trial
    assert {t.user_attrs["model_loads"] for t in completed} == {1}
    assert f"retry of trial {victim.number}" in out and f"FAILED: worker {host}:{pid}" in out
    assert SECRET not in out and SECRET not in str(result.user_attrs)
    assert not ray_processes_started_after(began)  # the local cluster was shut down


@pytest.mark.ray
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_ray_run_ends_its_workers_trials_as_interrupted(
    write_study, easy_task_files, postgres_url, signum
):
    """Ctrl-C ends the actors' RUNNING trials at once as interrupted: FAIL, not counted, their
    configs enqueued again (they used to wait out their heartbeat, counted as failures)."""
    url = with_password(postgres_url)
    # 40 epochs: the victim, stopped after its first, cannot finish as the driver stops
    study = slow_study(write_study, easy_task_files, url, n_trials=6, epochs=40)
    began = time.time()
    driver = start_run(study, "--workers", "2")
    victim = wait_for_trial_mid_way(url, driver)
    driver.send_signal(signum)
    out, _ = driver.communicate(timeout=120)
    assert driver.returncode == 1, out
    assert out.strip().splitlines()[-1] == "interrupted: run the same command again to resume"
    trials = stored(url).get_trials()
    assert not [t for t in trials if t.state == State.RUNNING]  # none waits for a heartbeat
    ended = [t for t in trials if t.user_attrs.get("fail_reason") == INTERRUPTED]
    outcomes = [(t.number, t.state.name, TrialRecord.of(t).fail_reason) for t in trials]
    assert victim.number in {t.number for t in ended}, (outcomes, out)
    assert all(t.state == State.FAIL for t in ended)
    assert f"interrupted trials {', '.join(str(t.number) for t in ended)}" in out
    waiting = [t.system_attrs["fixed_params"] for t in trials if t.state == State.WAITING]
    configs = {t.number: {**t.system_attrs.get("fixed_params", {}), **t.params} for t in ended}
    # each config runs again on resume; a trial stopped before it drew one has none to keep
    assert configs[victim.number], outcomes
    assert all(config in waiting for config in configs.values() if config), (configs, waiting)
    assert count_finished(stored(url)) == sum(t.state == State.COMPLETE for t in trials)
    assert not ray_processes_started_after(began)  # the local cluster was shut down


def test_killed_driver_resumes_without_losing_or_duplicating(
    write_study, easy_task_files, postgres_url
):
    study = slow_study(write_study, easy_task_files, postgres_url, n_trials=4)
    driver = start_run(study)  # one worker: trials run in the driver process itself
    victim = wait_for_trial_mid_way(postgres_url, driver, completed=1)
    driver.send_signal(signal.SIGKILL)
    driver.communicate()
    before = {
        t.number: (t.value, t.params)
        for t in stored(postgres_url).get_trials()
        if t.state == State.COMPLETE
    }

    resumed = start_run(study)
    out, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, out
    result = stored(postgres_url)
    trials = result.get_trials()
    assert [t.number for t in trials] == list(range(len(trials)))
    assert {n: (trials[n].value, trials[n].params) for n in before} == before
    assert_retried_once(trials, victim)
    assert count_finished(result) == 4
    assert not result.get_trials(states=(State.RUNNING, State.WAITING))


def standalone_worker(argv: list[str]) -> None:
    sys.exit(main(["worker", *argv]))


def test_sixteen_standalone_workers_on_postgres(
    write_study, easy_task_files, postgres_url, monkeypatch
):
    raw = tiny_study(
        easy_task_files, storage=postgres_url, budget={"n_trials": 24, "max_epochs": 1}
    )
    raw["space"].update(batch_size=32)
    spec = load_spec(write_study(raw))
    worker.publish_spec(open_study(spec, postgres_url), spec, 24)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv(STORAGE_ENV, postgres_url)
    # 16 separate processes forked from one that imported reftsearch: 16 fresh imports of
    # torch would take minutes of CPU on 2 cores
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["reftsearch.run.worker"])
    workers = [
        context.Process(target=standalone_worker, args=(["--study", "t"],)) for _ in range(16)
    ]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=240)
    assert [process.exitcode for process in workers] == [0] * 16

    result = stored(postgres_url)
    trials = search_trials(result)
    # workers that check the budget at the same moment each ask one more trial; those asked
    # past the budget end at once, unrun and uncounted
    assert count_finished(result) == len(trials) == 24
    assert {t.state for t in trials} == {State.COMPLETE}
    assert len({t.user_attrs["worker"] for t in trials}) >= 2
    notes = trials_frame(result).set_index("number")["note"]  # `best --csv`, the report
    for extra in result.get_trials():
        if extra not in trials:
            assert extra.state == State.FAIL and "model_loads" not in extra.user_attrs
            past_budget = TrialRecord.of(extra).past_budget
            assert past_budget.startswith("not run: 24 trials asked before")
            assert notes[extra.number] == past_budget


def test_only_trials_asked_within_the_budget_count_toward_it():
    """Trials count in the order they were asked: finished ones, running ones and those
    waiting to run (a retry in place of its dead original); a finalize rerun neither counts
    nor is ever past the budget (a worker may pop one as the search ends)."""
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(value=0.5))  # 0
    dead = study.ask()  # 1: its worker died; trial 4 retries it
    study.tell(dead, state=State.FAIL)
    running = study.ask()  # 2: a trial another worker runs
    waiting = partial(optuna.trial.create_trial, state=State.WAITING)
    study.add_trial(waiting(user_attrs=TrialRecord(finalize_of=0).to_user_attrs()))  # 3: a rerun
    study.add_trial(waiting(system_attrs={"retry_history": [1]}))  # 4: the retry, as Optuna's
    trials = study.get_trials()
    # counted before trial 4: 0 and 2 (1 was retried, 3 is a finalize rerun)
    assert not asked_past_budget(study, trials[4], n_trials=3)
    assert asked_past_budget(study, trials[4], n_trials=2)
    assert not asked_past_budget(study, trials[2], n_trials=2)  # only 0 before it
    assert not asked_past_budget(study, trials[3], n_trials=1)
    study.tell(running, 0.7)
    assert count_finished(study) == 2  # 0 and 2; 1 was retried, 4 has not run


def test_a_trial_refused_past_the_budget_leaves_its_grid_point_to_a_later_run(
    write_study, easy_task_files
):
    """GridSampler counts a failed trial's point as visited: a trial refused past the budget
    must give its point back, or raising the budget later never trains that config."""
    raw = tiny_study(easy_task_files, sampler="grid", budget={"n_trials": 1, "max_epochs": 1})
    raw["space"].update(rank=[1, 2], suffix=[1, 2], lr=1e-3)  # a grid of 4 configs
    spec = load_spec(write_study(raw))
    alone = worker.Worker(spec, spec.storage)
    alone.run(n_trials=1)
    # a second worker that saw the trial missing too asks one more, which is refused
    alone.study.optimize(partial(alone._trial, n_trials=1), n_trials=1, catch=(TrialFailed,))
    refused = alone.study.trials[-1]
    assert refused.state == State.FAIL and TrialRecord.of(refused).past_budget is not None

    alone.run(n_trials=4)  # the budget raised to the whole grid
    trained = [(t.params["rank"], t.params["suffix"]) for t in search_trials(alone.study)]
    assert sorted(trained) == [(1, 1), (1, 2), (2, 1), (2, 2)]


def test_wrong_database_is_bad_input_with_password_masked(
    write_study, easy_task_files, postgres_url, capsys
):
    url = with_password(postgres_url, database="no_such_database")
    study = write_study(tiny_study(easy_task_files))
    began = time.time()
    assert main(["run", str(study), "--storage", url, "--workers", "2"]) == 2
    assert main(["worker", "--storage", url, "--study", "t"]) == 2
    err = capsys.readouterr().err
    assert err.count("cannot connect to 127.0.0.1") == 2 and "no_such_database" in err
    assert SECRET not in err and "***" in err
    assert not ray_processes_started_after(began)  # refused before any work started


def test_worker_refuses_a_study_without_a_published_spec(postgres_url, capsys):
    optuna.create_study(study_name="bare", storage=postgres_url)
    assert main(["worker", "--storage", postgres_url, "--study", "bare"]) == 2
    assert "start it with `reftsearch run STUDY.yaml`" in capsys.readouterr().err


def test_a_model_without_its_weights_is_bad_input_before_any_worker_starts(
    write_study, easy_task_files, tmp_path, capsys
):
    """The driver loads the weights itself: a broken model directory is refused there (exit
    2, one line), not in every Ray actor (exit 1, restarts, tracebacks)."""
    from reftsearch.models.base import load_base_model

    base = load_base_model("tiny:llama", "classification")
    model = tmp_path / "model"
    base.model.save_pretrained(model)
    base.tokenizer.save_pretrained(model)
    for weights in model.glob("*.safetensors"):
        weights.unlink()
    study = write_study(tiny_study(easy_task_files, model=str(model)))
    began = time.time()
    assert main(["run", str(study), "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "model.path" in err and "no file named model.safetensors" in err
    assert not ray_processes_started_after(began)


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_bad_worker_count_is_bad_input(write_study, easy_task_files, capsys, workers):
    study = write_study(tiny_study(easy_task_files))
    assert main(["run", str(study), "--workers", workers]) == 2
    assert "--workers: must be a positive integer" in capsys.readouterr().err


@pytest.mark.ray
def test_ray_driver_frees_its_weights_for_the_search_and_times_no_estimate(
    write_study, easy_task_files, monkeypatch, capsys
):
    """The driver runs no search trial: it frees its model's weights while the workers search
    (they load their own), and the estimate's frozen passes are a worker's, whose trials
    reuse them. Finalize, which the driver runs itself, loads the weights again (and only
    them: the data stays as tokenized). Each frozen pass is computed once, by one worker: the
    other and the driver's finalize read it from the frozen store. The workers' passes are
    reported in the driver's output."""
    from reftsearch.engine import activation_cache as cache_module
    from reftsearch.run import driver as runner
    from reftsearch.search import study as study_module

    driver_passes, driver_models, data_loads, devices_during_search = [], [], [], []
    real_frozen, real_model, real_data, real_run_on_ray = (
        cache_module.compute_frozen,
        study_module.load_base_model,
        study_module.load_task_data,
        runner.run_on_ray,
    )

    def frozen_pass(base, examples, layers, keys_values, below=None, **placement):
        driver_passes.append(len(examples))
        return real_frozen(base, examples, layers, keys_values, below, **placement)

    def load_base_model(*args, **kwargs):
        driver_models.append(real_model(*args, **kwargs))
        return driver_models[-1]

    def load_task_data(*args, **kwargs):
        data_loads.append(args)
        return real_data(*args, **kwargs)

    def run_on_ray(*args, **kwargs):
        devices_during_search.extend(
            {p.device.type for p in base.model.parameters()} for base in driver_models
        )
        return real_run_on_ray(*args, **kwargs)

    monkeypatch.setattr(cache_module, "compute_frozen", frozen_pass)
    monkeypatch.setattr(study_module, "load_base_model", load_base_model)
    monkeypatch.setattr(study_module, "load_task_data", load_task_data)
    monkeypatch.setattr(runner, "run_on_ray", run_on_ray)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the Ray actors
    raw = tiny_study(easy_task_files, budget={"n_trials": 3, "max_epochs": 1})
    raw["finalize"] = {"top_k": 1, "seeds": [4]}
    raw["resources"]["threads"] = 2  # over the environment's 1, in the actors and the driver
    began = time.time()
    study = write_study(raw)
    assert main(["run", str(study), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert devices_during_search == [{"meta"}]  # no weight held by the driver
    assert len(driver_models) == 2  # the search's checks, then finalize's training
    assert len(data_loads) == 1
    assert {p.device.type for p in driver_models[1].model.parameters()} == {"cpu"}
    assert driver_passes == []  # finalize's run read the workers' passes from the store
    assert "estimate: " in out and "per trial (median" in out
    assert out.count("] trial ") == 3 + 1  # the search, then finalize's run
    assert "finalize: 1 runs" in out
    # the workers' own lines reach the driver's output, each saying which worker it is: one
    # computed each split's pass, and no other computed it again
    pass_line = r"^worker (\d): frozen pass over (\d+ \w+) examples .*\.\.\.$"
    started = dict((split, worker) for worker, split in re.findall(pass_line, out, re.M))
    assert len(re.findall(pass_line, out, re.M)) == 2 and set(started) == {"96 train", "48 dev"}
    spec = load_spec(study)
    trials = optuna.load_study(study_name=spec.name, storage=spec.storage).get_trials()
    # a trial a worker asked once the budget was met never ran (past_budget): no threads
    ran = [t for t in trials if TrialRecord.of(t).past_budget is None]
    assert {TrialRecord.of(t).threads for t in ran} == {2}
    # the other worker, if it trained a search trial (the first can run all three before
    # the second has started: they take a second each), read the train pass from the store
    records = [TrialRecord.of(t) for t in ran]
    search_workers = {r.worker for r in records if r.finalize_of is None}
    reader = re.findall(r"^worker (\d): frozen .* of 96 train examples read from ", out, re.M)
    if len(search_workers) == 2:
        assert reader and started["96 train"] not in reader
    assert not ray_processes_started_after(began)
