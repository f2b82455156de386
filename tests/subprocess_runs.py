"""``reftsearch run`` in a child process, and waiting on its study's storage for a trial in
a given state (to stop or kill the run there): the fault and distributed tests' helpers."""

import functools
import os
import subprocess
import sys
import time
from collections.abc import Callable

import optuna
from conftest import sigint_as_in_a_terminal

from reftsearch.search.record import TrialRecord

State = optuna.trial.TrialState
# one torch thread per process: 2 threads per process on a busy 2-core machine run 20x slower
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
WAIT_S = 300


def start_run(study, *args) -> subprocess.Popen:
    command = [sys.executable, "-m", "reftsearch.cli", "run", str(study), *args]
    return subprocess.Popen(
        command,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=sigint_as_in_a_terminal,
    )


def stored(url: str, name: str = "t") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=_storage(url))


@functools.cache
def _storage(url: str) -> optuna.storages.RDBStorage:
    """One storage, and so one connection pool, per database: a new one per poll (every
    50 ms) held its connection until garbage collection, and PostgreSQL refused every client
    past its 100 connections, the run's own included. A pooled connection is checked before
    use: a test that cuts the server's connections must not find its own cut."""
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})


def wait_for_trial(
    url: str,
    process: subprocess.Popen,
    wanted: Callable[[list[optuna.trial.FrozenTrial]], optuna.trial.FrozenTrial | None],
    what: str,
) -> optuna.trial.FrozenTrial:
    """The trial ``wanted`` picks from the study's trials, polled while ``process`` runs."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            trials = stored(url).get_trials()
        except KeyError:  # the study is not created yet
            trials = []
        found = wanted(trials)
        if found is not None:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {WAIT_S} s")


def wait_for_trial_mid_way(
    url: str, process: subprocess.Popen, completed: int = 0
) -> optuna.trial.FrozenTrial:
    """A RUNNING trial that has reported an epoch and has epochs left to run, once at least
    ``completed`` trials are complete."""

    def mid_way(trials: list[optuna.trial.FrozenTrial]) -> optuna.trial.FrozenTrial | None:
        if sum(t.state == State.COMPLETE for t in trials) < completed:
            return None
        running = [t for t in trials if t.state == State.RUNNING and "worker" in t.user_attrs]
        return next((t for t in running if len(t.intermediate_values) == 1), None)

    return wait_for_trial(url, process, mid_way, "trial mid-way")


def wait_for_running_rerun(url: str, process: subprocess.Popen) -> optuna.trial.FrozenTrial:
    """A finalize rerun that has started training (reruns report no epochs)."""

    def rerun(trials: list[optuna.trial.FrozenTrial]) -> optuna.trial.FrozenTrial | None:
        records = [(t, TrialRecord.of(t)) for t in trials if t.state == State.RUNNING]
        started = [t for t, r in records if r.finalize_of is not None and r.config is not None]
        return next(iter(started), None)

    return wait_for_trial(url, process, rerun, "seed rerun started")
