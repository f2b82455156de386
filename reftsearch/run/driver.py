"""Run a study: trials pulled from the Optuna study until its budget of finished trials is met.

The budget counts finished trials (complete, pruned or failed) across every process that
works on the study, so running the same study again resumes it instead of starting over. An
interrupted trial (Ctrl-C, SIGTERM) does not count: its config runs again on resume. A run
whose trials all failed ends with exit code 1 and their reasons; one whose storage fails
mid-run ends with one line (``storage_errors``), and the same command resumes it.
One worker runs in this process; several run as Ray actors (each a ``reftsearch.run.worker.Worker``
holding its own model) on a local Ray cluster that the run starts and stops, or on an existing
cluster (``address``). The study storage is the single source of truth: Ray only places the
workers, and this process prints their trials by reading the storage.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from functools import partial

import optuna
from optuna.trial import TrialState

from reftsearch.errors import ReftSearchError, SpecError, TrialFailed
from reftsearch.models.base import EXACT_DTYPE
from reftsearch.progress import Log
from reftsearch.run.estimate import Estimate, EstimateRequest, estimate_study
from reftsearch.run.lines import ProgressPrinter, print_now
from reftsearch.run.ray_cluster import run_on_ray
from reftsearch.run.worker import Worker, load, own_trials_interrupted, publish_spec
from reftsearch.search.objective import Objective
from reftsearch.search.record import TrialRecord, store
from reftsearch.search.seed_reruns import enqueue_finalize, finalize_runs
from reftsearch.search.storage import check_storage, mask_url, storage_errors
from reftsearch.search.study import (
    INTERRUPTED,
    PreparedStudy,
    budget_trials,
    count_finished,
    give_back,
    keep_task_data,
    open_study,
    refuse_duplicate,
    spec_device,
    with_model_on,
)
from reftsearch.search.warm_start import (
    Recipe,
    enqueue_warm_starts,
    paper_recipes,
    study_recipes,
    warm_start_params,
)
from reftsearch.spec.study_file import StudySpec


def run_study(
    spec: StudySpec,
    storage_url: str,
    n_trials: int | None = None,
    log: Log | None = None,
    workers: int = 1,
    address: str | None = None,
    stop: Callable[[optuna.Study], bool] | None = None,
) -> optuna.Study:
    """Validate everything, then run trials until ``n_trials`` have finished: in this process
    (one worker) or on Ray actors (several, or any number on the cluster at ``address``).

    ``stop`` (one worker only) ends the search sooner, before the next trial, once
    ``stop(study)`` is true (e.g. ``reftsearch.run.epoch_budget.EpochBudget``); finalize then
    runs as after a met budget."""
    if stop is not None and (workers > 1 or address is not None):
        raise ValueError("run_study: stop works with one worker, in this process")
    with storage_errors(storage_url):
        study = _run_study(spec, storage_url, n_trials, log, workers, address, stop)
    check_some_completed(study)
    return study


def _run_study(
    spec: StudySpec,
    storage_url: str,
    n_trials: int | None,
    log: Log | None,
    workers: int,
    address: str | None,
    stop: Callable[[optuna.Study], bool] | None,
) -> optuna.Study:
    n_trials = n_trials or spec.budget.n_trials
    log = log or print_now
    check_storage(storage_url, writing=True)
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
    if prepared.left_out:
        log(
            f"left out of training: {prepared.left_out} train prompts that fill "
            f"task.max_length ({spec.task.max_length} tokens), which leaves them no response "
            "token to learn from; raise it to train on them"
        )
    # read before the study is created: a warm start from a study that is not there is refused
    # with the storage unchanged
    recipes = warm_start_recipes(spec, storage_url, prepared, log)
    study = open_study(spec, storage_url)
    keep_task_data(study, prepared.data)
    publish_spec(study, spec, n_trials)
    optuna.storages.fail_stale_trials(study)
    done = count_finished(study)
    log(f"study {spec.name!r} on {mask_url(storage_url)}: {done} of {n_trials} trials finished")
    if done < n_trials and not (stop is not None and stop(study)):
        enqueue_warm_starts(study, recipes, spec.space, prepared.base.num_layers, log)
        runs = finalize_runs(spec, prepared.base.dtype)
        estimate = EstimateRequest(n_trials - done, workers, runs)
        if not on_ray:
            worker = Worker(spec, storage_url, prepared, log)
            log(worker.estimate(estimate))
            worker.run(n_trials, spec.budget.timeout, [ProgressPrinter(n_trials, log)], stop)
        else:
            prepared.base.drop_weights()  # the workers beside it may need the memory
            run_on_ray(study, spec, storage_url, n_trials, workers, address, log, estimate)
    elif not spec.finalize:
        log("nothing to do: the budget is already met (raise --n-trials to continue)")
    stopped = stop is not None and stop(study)
    if spec.finalize and (count_finished(study) >= n_trials or stopped):
        run_finalize(study, prepared, log)
    return study


def check_some_completed(study: optuna.Study) -> None:
    """A study whose every counted trial failed has no result: say why they failed (exit 1)
    instead of printing an empty table."""
    trials = budget_trials(study)
    if not trials or any(t.state != optuna.trial.TrialState.FAIL for t in trials):
        return
    reasons = Counter(
        TrialRecord.of(t).fail_reason or f"worker {TrialRecord.of(t).worker or '?'} stopped"
        for t in trials
    )
    summary = "; ".join(f"{count} x {reason}" for reason, count in reasons.most_common())
    raise ReftSearchError(f"all {len(trials)} trials failed: {summary}")


def warm_start_recipes(
    spec: StudySpec, storage_url: str, prepared: PreparedStudy, log: Log = lambda _: None
) -> list[Recipe]:
    recipes: list[Recipe] = []
    for source in spec.warm_start:
        if source.recipes:
            recipes += paper_recipes(spec.task.kind, prepared.base.num_layers)
            continue
        found = study_recipes(
            source.study, source.storage or storage_url, source.top_k, spec.method
        )
        if not found:  # it may still be running: no error, but not silence either
            log(f"warm start from study {source.study!r}: it has no completed trial yet")
        recipes += found
    return recipes


def estimate_new_study(
    spec: StudySpec, storage_url: str, prepared: PreparedStudy, workers: int, samples: int | None
) -> Estimate:
    """What ``run_study`` would predict for ``spec`` as a new study, stored nowhere: the same
    estimate on the same configs (its warm starts first)."""
    recipes = warm_start_recipes(spec, storage_url, prepared)
    kept = warm_start_params(recipes, spec.space, prepared.base.num_layers, log=lambda _: None)
    runs = finalize_runs(spec, prepared.base.dtype)
    request = EstimateRequest(spec.budget.n_trials, workers, runs, samples)
    return estimate_study(prepared, request, enqueued=[params for _, params in kept])


def run_finalize(
    study: optuna.Study,
    prepared: PreparedStudy,
    log: Log,
    picks: list[optuna.trial.FrozenTrial] | None = None,
) -> PreparedStudy:
    """Retrain the top configs (or ``picks``) with the extra seeds (only the runs still
    missing). Returns the loaded study they trained on, to use from then on: after a 16-bit
    search that is a float32 copy, and ``prepared``'s own weights are gone."""
    reruns = enqueue_finalize(study, prepared.spec.finalize, log, picks)
    if not reruns:
        return prepared
    log(f"finalize: {reruns} runs of the top configs with other seeds")
    # the queue may still hold search trials ahead of the reruns (warm starts a budget met
    # early left): each pops first and is given back to wait for a larger budget
    waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    exact = _on_finalize_device(prepared, log)
    rerun = partial(_seed_rerun, Objective(exact, log))
    printer = ProgressPrinter(reruns, log, finalize=True)
    # one call per trial: a grid sampler stops optimize once every grid point is visited,
    # which they all are before the first rerun
    with own_trials_interrupted(study):
        for _ in range(waiting):
            study.optimize(rerun, n_trials=1, callbacks=[printer], catch=(TrialFailed,))
    return exact


def _seed_rerun(objective: Objective, trial: optuna.Trial) -> float:
    refuse_duplicate(trial)
    if TrialRecord.of(trial).finalize_of is None:
        reason = "not run: finalize trains seed reruns only, and the search's budget was met"
        give_back(trial, past_budget=reason)
        raise TrialFailed(f"trial {trial.number} {reason}")
    try:
        return objective(trial)
    except KeyboardInterrupt:  # the next run enqueues the missing rerun (enqueue_finalize)
        store(trial, fail_reason=INTERRUPTED)
        raise


def _on_finalize_device(prepared: PreparedStudy, log: Log) -> PreparedStudy:
    """The driver's model, with its weights, in float32, on the spec's device when this
    machine has it, else on its CPU (where a Ray run's driver loaded it, keeping only its
    structure during the search). A search in 16 bits is fast; the pick's numbers must be
    exact: its reruns train in float32 (``EXACT_DTYPE``)."""
    try:
        device = spec_device(prepared.spec)
    except SpecError as err:
        device = "cpu"
        log(f"finalize runs on cpu: {err}")
    if prepared.base.dtype != EXACT_DTYPE:
        log(f"finalize: the search ran in {prepared.base.dtype}; its reruns train in float32")
        prepared.base.drop_weights()
        return with_model_on(prepared, device, EXACT_DTYPE)
    if prepared.base.device.type == "meta":
        return with_model_on(prepared, device, EXACT_DTYPE)
    prepared.base.model.to(device)
    return prepared
