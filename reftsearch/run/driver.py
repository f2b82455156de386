"""Run a study: trials pulled from the Optuna study until its budget of finished trials is met.

The budget counts finished trials (complete, pruned or failed) across every process that
works on the study, so running the same study again resumes it instead of starting over.
One worker runs in this process; several run as Ray actors (each a ``reftsearch.run.worker.Worker``
holding its own model) on a local Ray cluster that the run starts and stops, or on an existing
cluster (``address``). The study storage is the single source of truth: Ray only places the
workers, and this process prints their trials by reading the storage.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from collections.abc import Callable

import optuna

from reftsearch.errors import BadInputError, ReftSearchError, SpecError, TrialFailed
from reftsearch.progress import format_duration
from reftsearch.run.worker import EstimateRequest, Worker, load, publish_spec
from reftsearch.search.describe import describe_config
from reftsearch.search.objective import Objective
from reftsearch.search.seed_reruns import (
    FINALIZE_OF,
    PAST_BUDGET,
    SEED,
    enqueue_finalize,
    search_trials,
    top_search_trials,
)
from reftsearch.search.storage import check_storage, mask_url
from reftsearch.search.study import (
    FINISHED_STATES,
    PreparedStudy,
    budget_trials,
    count_finished,
    open_study,
    spec_device,
    with_model_on,
)
from reftsearch.search.warm_start import Recipe, enqueue_warm_starts, paper_recipes, study_recipes
from reftsearch.spec.study_file import StudySpec

Log = Callable[[str], None]

# a worker killed this many times (OOM killer, preemption) ends the run instead of looping
MAX_WORKER_RESTARTS = 3
POLL_S = 1.0


def run_study(
    spec: StudySpec,
    storage_url: str,
    n_trials: int | None = None,
    log: Log | None = None,
    workers: int = 1,
    address: str | None = None,
) -> optuna.Study:
    """Validate everything, then run trials until ``n_trials`` have finished: in this process
    (one worker) or on Ray actors (several, or any number on the cluster at ``address``)."""
    n_trials = n_trials or spec.budget.n_trials
    log = log or print_now
    check_storage(storage_url)
    on_ray = workers > 1 or address is not None
    start = time.perf_counter()
    # a driver whose workers train loads its copy on the CPU (on the workers' GPU it would
    # take their memory, and it may have none itself), to refuse a model that cannot load
    # before any worker starts, and to check the spec against; it frees the weights once the
    # workers take over, and loads them again for finalize's reruns
    prepared = load(spec, device="cpu" if on_ray else None)
    log(
        f"loaded {spec.model.path} ({prepared.base.num_layers} layers, hidden "
        f"{prepared.base.hidden_size}, {prepared.base.dtype}) and "
        f"{len(prepared.split.train)} train / {len(prepared.split.dev)} dev examples in "
        f"{time.perf_counter() - start:.1f}s"
    )
    study = open_study(spec, storage_url)
    publish_spec(study, spec, n_trials)
    optuna.storages.fail_stale_trials(study)
    done = count_finished(study)
    log(f"study {spec.name!r} on {mask_url(storage_url)}: {done} of {n_trials} trials finished")
    if done < n_trials:
        enqueue_warm_starts(
            study,
            warm_start_recipes(spec, storage_url, prepared),
            spec.space,
            prepared.base.num_layers,
            log,
        )
        estimate = EstimateRequest(n_trials - done, workers)
        if not on_ray:
            worker = Worker(spec, storage_url, prepared, log, alone=True)
            log(worker.estimate(estimate))
            worker.run(n_trials, spec.budget.timeout, [ProgressPrinter(n_trials, log)])
        else:
            prepared.base.drop_weights()  # the workers beside it may need the memory
            run_on_ray(study, spec, storage_url, n_trials, workers, address, log, estimate)
    elif not spec.finalize:
        log("nothing to do: the budget is already met (raise --n-trials to continue)")
    if spec.finalize and count_finished(study) >= n_trials:
        run_finalize(study, prepared, log)
    return study


def print_now(line: str) -> None:
    """Progress lines reach a redirected log (``> run.log``) as they happen, not in blocks."""
    print(line, flush=True)


def warm_start_recipes(spec: StudySpec, storage_url: str, prepared: PreparedStudy) -> list[Recipe]:
    recipes: list[Recipe] = []
    for source in spec.warm_start:
        if source.recipes:
            recipes += paper_recipes(spec.task.kind, prepared.base.num_layers)
        else:
            recipes += study_recipes(
                source.study, source.storage or storage_url, source.top_k, spec.method
            )
    return recipes


def run_finalize(study: optuna.Study, prepared: PreparedStudy, log: Log) -> None:
    """Retrain the top configs with the extra seeds (only the runs still missing)."""
    waiting = enqueue_finalize(study, prepared.spec.finalize, log)
    if waiting:
        log(f"finalize: {waiting} runs of the top configs with other seeds")
        study.optimize(
            Objective(_on_finalize_device(prepared, log), log),
            n_trials=waiting,
            callbacks=[ProgressPrinter(waiting, log, finalize=True)],
            catch=(TrialFailed,),
        )


def _on_finalize_device(prepared: PreparedStudy, log: Log) -> PreparedStudy:
    """The driver's model, with its weights, on the spec's device when this machine has it,
    else on its CPU (where a Ray run's driver loaded it, keeping only its structure during
    the search)."""
    try:
        device = spec_device(prepared.spec)
    except SpecError as err:
        device = "cpu"
        log(f"finalize runs on cpu: {err}")
    if prepared.base.device.type == "meta":
        return with_model_on(prepared, device)
    prepared.base.model.to(device)
    return prepared


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
    try:
        _check_cluster_fits(ray.cluster_resources(), workers, spec, local=address is None, log=log)
        log(
            f"{workers} workers on {'a local Ray cluster' if address is None else address} "
            f"({res.cpus_per_trial:g} CPUs, {res.gpus_per_trial:g} GPUs each)"
        )
        actor = ray.remote(Worker).options(
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
        # an actor runs its calls in order: the first one's trials start after its estimate
        estimating = [actors[0].estimate.remote(estimate)]
        runs = [a.run.remote(n_trials, spec.budget.timeout) for a in actors]
        progress = StoragePrinter(study, ProgressPrinter(n_trials, log))
        while runs:
            done, runs = ray.wait(runs, timeout=POLL_S)
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
    finally:
        ray.shutdown()


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


class StoragePrinter:
    """Prints, through ``printer``, the search trials that finished since the last poll."""

    def __init__(self, study: optuna.Study, printer: ProgressPrinter) -> None:
        self.study = study
        self.printer = printer
        self.seen = {t.number for t in search_trials(study, FINISHED_STATES)}

    def poll(self) -> None:
        new = [t for t in search_trials(self.study, FINISHED_STATES) if t.number not in self.seen]
        counted = budget_trials(self.study)
        for trial in sorted(new, key=lambda t: t.datetime_complete):
            self.seen.add(trial.number)
            done = sum(c.datetime_complete <= trial.datetime_complete for c in counted)
            self.printer(self.study, trial, done)


class ProgressPrinter:
    """One line per finished trial: outcome, dev score, best so far, config, time, and the
    time the trials still to run should take at the pace of those finished since it started
    (wall clock: right for several workers and packed trials alike)."""

    def __init__(self, n_trials: int, log: Log, finalize: bool = False) -> None:
        self.n_trials = n_trials
        self.log = log
        self.finalize = finalize
        self.printed = 0
        self.started = time.monotonic()

    def __call__(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial, done: int | None = None
    ) -> None:
        """``done``: finished trials up to this one (default: all finished so far)."""
        if PAST_BUDGET in trial.user_attrs:  # asked in a race between workers, never run
            return
        self.printed += 1
        if done is None:
            done = self.printed if self.finalize else count_finished(study)
        attrs = trial.user_attrs
        if trial.state == optuna.trial.TrialState.COMPLETE:
            outcome = f"dev={trial.values[0]:.4f}"
        elif "invalid_reason" in attrs:
            outcome = f"not trained, invalid config: {attrs['invalid_reason']}"
        elif trial.state == optuna.trial.TrialState.PRUNED:
            outcome = f"pruned {attrs.get('pruned', '')}".rstrip()
        else:
            # no reason recorded: the worker died mid-trial and its heartbeat stopped
            reason = attrs.get("fail_reason", f"worker {attrs.get('worker', '?')} stopped")
            outcome = f"FAILED: {reason}"
        self.log(
            f"[{done}/{self.n_trials}] trial {trial.number}{_origin(trial)}: {outcome} | "
            f"{_best(study)} | {describe_config(attrs.get('config', {}))} | "
            f"{attrs.get('n_params', '?')} params | {attrs.get('wall_time_s', 0):.1f}s"
            f"{self._time_left(done)}"
        )

    def _time_left(self, done: int) -> str:
        left = self.n_trials - done
        if left <= 0:
            return ""
        pace = (time.monotonic() - self.started) / self.printed
        return f" | ~{format_duration(left * pace)} left"


def _origin(trial: optuna.trial.FrozenTrial) -> str:
    """Where a trial's config came from, when not from the sampler."""
    attrs = trial.user_attrs
    if "failed_trial" in trial.system_attrs:  # set by RetryHeartbeatStaleTrialCallback
        return f" (retry of trial {trial.system_attrs['failed_trial']})"
    if FINALIZE_OF in attrs:
        return f" (trial {attrs[FINALIZE_OF]} with seed {attrs[SEED]})"
    if "copied_from" in attrs:
        return f" (same config as trial {attrs['copied_from']}: result copied)"
    if "warm_start" in attrs:
        return f" (warm start {attrs['warm_start']})"
    return ""


def _best(study: optuna.Study) -> str:
    best = top_search_trials(study, 1)
    return f"best={best[0].values[0]:.4f} (#{best[0].number})" if best else "best: none yet"
