"""Workers as Ray actors: a local cluster started and stopped by the run, or an existing one.

Ray only places the workers: each actor talks to the study's storage itself, and the driver
prints their trials by reading the storage. Their own log lines reach the driver through a
``LineBuffer`` actor.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
import uuid

import optuna

from reftsearch.engine.threads import cluster_worker_threads, worker_env, worker_threads
from reftsearch.errors import BadInputError, ReftSearchError
from reftsearch.processes import pid_here, running
from reftsearch.progress import Log
from reftsearch.run.estimate import EstimateRequest
from reftsearch.run.lines import ProgressPrinter, StoragePrinter
from reftsearch.run.worker import Worker, interrupt_trials_of
from reftsearch.spec.study_file import StudySpec

# a worker killed this many times (OOM killer, preemption) ends the run instead of looping
MAX_WORKER_RESTARTS = 3
POLL_S = 1.0
GONE_WAIT_S = 10.0  # at a Ctrl-C, the most it waits for this host's actor processes to end


def run_on_ray(
    study: optuna.Study,
    spec: StudySpec,
    storage_url: str,
    n_trials: int,
    workers: int,
    address: str | None,
    log: Log,
    estimate: EstimateRequest,
) -> None:
    """``workers`` Ray actors run trials until the budget is met; a killed actor is restarted
    (its trial goes FAIL and is retried once by the heartbeat). The local cluster this starts
    is stopped on every exit: done, error or Ctrl-C.

    The first actor times the ``estimate`` before its trials while the others start theirs:
    the frozen activations it caches serve its own trials, where the driver's would serve
    none."""
    import ray

    res = spec.resources
    sigterm = signal.getsignal(signal.SIGTERM)  # reftsearch.cli's: SIGTERM stops as Ctrl-C does
    if address is None:
        # an explicit local cluster: a leftover `ray start` cluster must not be joined
        cpus = max(os.cpu_count() or 1, math.ceil(workers * res.cpus_per_trial))
        ray.init(
            address="local",
            num_cpus=cpus,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
        )
    else:
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    if sigterm is not None and threading.current_thread() is threading.main_thread():
        # ray.init's crash handler takes SIGTERM and aborts the process, cluster left running
        signal.signal(signal.SIGTERM, sigterm)
    identities: list = []  # the actors' answers to identity(), asked before their trials
    known: set[str] = set()  # those answers, as they arrive
    try:
        _check_cluster_fits(ray.cluster_resources(), workers, spec, local=address is None, log=log)
        log(
            f"{workers} workers on {'a local Ray cluster' if address is None else address} "
            f"({res.cpus_per_trial:g} CPUs, {res.gpus_per_trial:g} GPUs each)"
        )
        threads = worker_threads(res, workers) if address is None else cluster_worker_threads(res)
        actor = ray.remote(Worker).options(
            # set before the worker's torch loads OpenMP (reftsearch.engine.threads)
            runtime_env={"env_vars": worker_env(threads)},
            num_cpus=res.cpus_per_trial,
            num_gpus=res.gpus_per_trial,
            max_restarts=MAX_WORKER_RESTARTS,
            max_task_retries=MAX_WORKER_RESTARTS,
        )
        lines_name = f"reftsearch-lines-{uuid.uuid4().hex}"
        worker_lines = ray.remote(LineBuffer).options(name=lines_name, num_cpus=0).remote()
        actors = [
            actor.remote(spec, storage_url, log=ForwardedLog(lines_name, f"worker {index}"))
            for index in range(workers)
        ]
        # asked first: an actor runs its calls in order, and a Ctrl-C needs its trials' owners
        identities = [a.identity.remote() for a in actors]
        # an actor runs its calls in order: the first one's trials start after its estimate
        estimating = [actors[0].estimate.remote(estimate)]
        runs = [a.run.remote(n_trials, spec.budget.timeout) for a in actors]
        progress = StoragePrinter(study, ProgressPrinter(n_trials, log))
        while runs:
            done, runs = ray.wait(runs, timeout=POLL_S)
            known |= _known(identities, timeout=0)
            ray.get(done)  # raises a worker's error here
            ready, estimating = ray.wait(estimating, timeout=0)
            for line in ray.get(ready):
                log(line)
            _drain(worker_lines, log)
            progress.poll()
        _drain(worker_lines, log)
        progress.poll()
    except ray.exceptions.RayError as err:
        raise ReftSearchError(f"a worker failed: {_first_line(err)}") from None
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (reftsearch.cli)
        _stop(known | _known(identities, timeout=0), study, log)
        raise
    finally:
        ray.shutdown()  # a no-op after a Ctrl-C's


class LineBuffer:
    """Lines Ray workers log, kept (as a Ray actor of its own) until the driver takes them."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(line)

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


class ForwardedLog:
    """A Ray worker's log: its lines (a frozen pass starting on a CPU, the pack size chosen)
    go to the driver's ``LineBuffer`` actor named ``buffer``, and the driver prints them
    between the trial lines, prefixed with ``name``. A Ray actor's own output goes to Ray's
    log files, unseen.

    The buffer is found by name when first used: a handle among a restartable actor's
    constructor arguments would put them in Ray's object store, which Ray warns about."""

    def __init__(self, buffer: str, name: str) -> None:
        self.buffer = buffer
        self.name = name
        self._handle = None

    def __call__(self, line: str) -> None:
        import ray

        if self._handle is None:
            self._handle = ray.get_actor(self.buffer)
        # waited for (a millisecond): a line still in flight when the worker dies (its last
        # words, as like as not) would be lost
        ray.get(self._handle.add.remote(f"{self.name}: {line}"))


def _stop(owners: set[str], study: optuna.Study, log: Log) -> None:
    """At a Ctrl-C: shut the cluster down at once (waiting on the actors first let one
    finish the trial it ran), then end the trials that its actors ``owners`` (``host:pid``)
    left RUNNING as interrupted (``interrupt_trials_of``), once this host's actor processes
    are gone: none may still finish one of them."""
    import ray

    ray.shutdown()
    _wait_until_gone(owners)
    ended = interrupt_trials_of(study, owners)
    if ended:
        log(f"interrupted trials {', '.join(map(str, ended))}: their configs run again")


def _known(identities: list, timeout: float) -> set[str]:
    """The actors' ``host:pid`` among ``identities`` (object refs) that have answered. An
    actor answers before its first trial: the run collects the answers as they arrive, so
    that a Ctrl-C needs no wait for them."""
    import ray

    ready, _ = ray.wait(identities, num_returns=len(identities), timeout=timeout)
    known = set()
    for ref in ready:
        try:
            known.add(ray.get(ref))
        except ray.exceptions.RayError:  # the actor died before it answered: it ran no trial
            continue
    return known


def _wait_until_gone(workers: set[str]) -> None:
    """Wait (up to ``GONE_WAIT_S``) until the processes of ``workers`` (``host:pid``) on this
    host have ended; those elsewhere end with the cluster's connection to them."""
    pids = {pid for pid in map(pid_here, workers) if pid is not None}
    deadline = time.monotonic() + GONE_WAIT_S
    while pids and time.monotonic() < deadline:
        pids = {pid for pid in pids if running(pid)}
        time.sleep(0.05)


def _drain(buffer, log: Log) -> None:
    """Print the lines waiting in ``buffer`` (a ``LineBuffer`` actor), oldest first."""
    import ray

    for line in ray.get(buffer.take.remote()):
        log(line)


def _check_cluster_fits(
    cluster: dict, workers: int, spec: StudySpec, local: bool, log: Log
) -> None:
    res = spec.resources
    need = {"CPU": workers * res.cpus_per_trial, "GPU": workers * res.gpus_per_trial}
    for kind, amount in need.items():
        have = cluster.get(kind, 0)
        if amount > have:
            message = (
                f"{workers} workers x resources.{kind.lower()}s_per_trial need {amount:g} "
                f"{kind}s, the Ray cluster has {have:g}"
            )
            if local:
                raise BadInputError(message)
            log(f"warning: {message}: workers wait until the cluster grows")


def _first_line(err: Exception) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
