"""A worker: one process's share of a study, the model and data loaded once.

The same ``Worker`` runs in the ``reftsearch run`` process (one worker), as a Ray actor (several
workers, reftsearch.run.driver), or on its own for clusters without Ray::

    REFTSEARCH_STORAGE=postgresql+psycopg://user:pass@db/studies \\
        reftsearch worker --study sst2-minilm

A stand-alone worker joins a study that ``reftsearch run`` created: the driver publishes the
study's spec (without storage URLs, which may hold passwords) and its trial budget as study
user attributes, and the worker rebuilds the spec from them, so every worker searches the
same space with the same data. Relative data paths resolve against the study file's
directory on the driver's machine: workers elsewhere need it at the same path (a shared
filesystem), or hub/builtin data.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import optuna
from optuna.trial import TrialState

from reftsearch.errors import BadInputError, TrialFailed
from reftsearch.processes import worker_id
from reftsearch.progress import Log
from reftsearch.run.estimate import EstimateRequest, estimate_study
from reftsearch.run.packed_search import make_objective, optimize, pack_size
from reftsearch.search.record import TrialRecord, owner_runs_here, search_trials, store
from reftsearch.search.storage import owned_trials_storage, storage_cause
from reftsearch.search.study import (
    INTERRUPTED,
    PreparedStudy,
    asked_past_budget,
    count_finished,
    give_back,
    give_back_grid_point,
    open_study,
    prepare,
    refuse_duplicate,
)
from reftsearch.spec.study_file import StudySpec, parse_spec

Callback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]

SPEC_ATTR, SPEC_DIR_ATTR, N_TRIALS_ATTR = "spec", "spec_dir", "n_trials"
# keys that may hold storage URLs (passwords) and that only the driver needs
DRIVER_ONLY_KEYS = ("storage", "warm_start")
IDLE_POLL_S = 1.0

_model_loads = 0  # in this process; recorded on every trial: 1 means each trial reused the model


class Worker:
    """Loads the model and data once, then runs trial after trial of the shared study until
    its budget (finished search trials, all workers together) is met."""

    def __init__(
        self,
        spec: StudySpec,
        storage_url: str,
        prepared: PreparedStudy | None = None,
        log: Log = print,
    ) -> None:
        self.prepared = prepared or load(spec)
        self.log = log
        self.prepared.cache.log = log  # its frozen passes run for minutes on a CPU: say so
        # each worker's sampler is seeded by its first trial's number (SeededByFirstTrial):
        # workers on one study draw different configs
        self.study = open_study(spec, storage_url)
        self.pack_size = pack_size(self.prepared, log)  # trials trained side by side
        self.objective = make_objective(self.prepared, log, self.pack_size)
        self.unstarted = UnstartedTrials(2 * spec.resources.heartbeat_s)
        self.given_up: set[int] = set()  # trials of this process another one failed as stale

    def run(
        self,
        n_trials: int,
        timeout: float | None = None,
        callbacks: Sequence[Callback] = (),
        stop: Callable[[optuna.Study], bool] | None = None,
    ) -> int:
        """Run trials until the study holds ``n_trials`` finished ones, or until ``stop(study)``
        is true; returns how many ran here. While the trials still missing are all running
        elsewhere, wait: one of them may die, and its retry must then be run."""
        if stop is not None:  # packed trials run several per optimize call: stop those too
            callbacks = [*callbacks, lambda study, _: stop(study) and study.stop()]
        with own_trials_interrupted(self.study):
            return self._run(n_trials, timeout, callbacks, stop)

    def _run(
        self,
        n_trials: int,
        timeout: float | None,
        callbacks: Sequence[Callback],
        stop: Callable[[optuna.Study], bool] | None,
    ) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        ran = 0
        waited_for: set[int] = set()
        while deadline is None or time.monotonic() < deadline:
            optuna.storages.fail_stale_trials(self.study)  # a dead worker's trial -> FAIL, retry
            self.unstarted.end_orphans(self.study, self.log)
            finished = count_finished(self.study)
            if finished >= n_trials or (stop is not None and stop(self.study)):
                break
            sampler = self.study.sampler.sampler  # SeededByFirstTrial's
            if isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(
                self.study
            ):
                break
            in_progress = [t.number for t in search_trials(self.study, (TrialState.RUNNING,))]
            if finished + len(in_progress) >= n_trials:
                if not waited_for.issuperset(in_progress):
                    self.log(self._waiting_line(in_progress))
                    waited_for.update(in_progress)
                time.sleep(IDLE_POLL_S)
                continue
            missing = n_trials - finished - len(in_progress)
            run_trial = partial(self._trial, n_trials=n_trials)
            try:
                optimize(self.study, run_trial, self.pack_size, missing, callbacks)
            except (ValueError, AssertionError):
                # Optuna's tell of a trial another process failed: "Cannot tell a FAIL
                # trial", or its assertion when the trial's own call had returned
                if not self._give_up_stale_trials():
                    raise
            ran += 1
        return ran

    def _give_up_stale_trials(self) -> list[int]:
        """This process's trials that another process failed as stale (no heartbeat for
        twice ``resources.heartbeat_s``: this process was suspended, or the storage out of
        its reach, and no process on another host can tell that from a dead one), newly
        found: each is left to its retry, which the stale check enqueued, and said so."""
        trials = self.study.get_trials(deepcopy=False)
        mine = {t.number for t in trials if TrialRecord.of(t).worker == worker_id()}
        retries = {
            t.system_attrs["failed_trial"]: t.number
            for t in trials
            if t.system_attrs.get("failed_trial") in mine - self.given_up
        }
        grace = 2 * self.prepared.spec.resources.heartbeat_s
        for number, retry in sorted(retries.items()):
            self.log(
                f"trial {number}: another process failed it as stale (no heartbeat from this "
                f"one for over {grace} s: suspended, or the storage out of reach); it runs "
                f"again as trial {retry}"
            )
        self.given_up.update(retries)
        return sorted(retries)

    def _waiting_line(self, in_progress: list[int]) -> str:
        """Said once per trial waited for: the wait may last minutes with nothing printed."""
        interval = self.study._storage.get_heartbeat_interval()
        if interval is None:
            return f"waiting for trials {in_progress}, running in other processes"
        return (
            f"waiting for trials {in_progress}: other processes run them, or were killed (a killed "
            f"one's trial is failed and retried here once its heartbeat is {2 * interval} s "
            "old: resources.heartbeat_s x 2)"
        )

    def identity(self) -> str:
        """``host:pid`` of this worker, as its trials record it (their ``worker``)."""
        return worker_id()

    def estimate(self, request: EstimateRequest) -> str:
        """The line that predicts the study's cost, timed here (the study's enqueued configs
        first: its next trials run them): the cache builds it triggers are the ones this
        worker's trials then reuse."""
        waiting = self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        try:
            estimate = estimate_study(
                self.prepared,
                request,
                enqueued=[trial.system_attrs.get("fixed_params", {}) for trial in waiting],
            )
        except ValueError as err:  # e.g. no valid config drawn: the trials will say why
            return f"estimate: not available ({err})"
        return estimate.line()

    def _trial(self, trial: optuna.Trial, n_trials: int) -> float:
        refuse_duplicate(trial)
        if asked_past_budget(self.study, trial, n_trials):
            reason = f"not run: {n_trials} trials asked before it meet the budget"
            store(trial, past_budget=reason)  # it counts nowhere (is_search_trial)
            give_back_grid_point(trial)
            raise TrialFailed(f"trial {trial.number} {reason}")
        try:
            store(trial, model_loads=_model_loads)
            value = self.objective(trial)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (reftsearch.cli): not this config's fault
            give_back(trial, fail_reason=INTERRUPTED)
            raise
        except optuna.exceptions.UpdateFinishedTrialError:  # failed as stale by another process
            raise FailedElsewhere(trial.number) from None
        except Exception as err:
            if storage_cause(err) is None:
                raise
            # the storage or the disk failed, not this config: it ends as an interrupted one
            # (not counted, its config trained again) if the storage takes that; Optuna's
            # tell of FAIL that follows may succeed (a cut connection is made again), and a
            # plain failure would count against the budget with its config never trained
            _give_back_if_reachable(trial)
            raise
        if self.study._storage.get_trial(trial._trial_id).state.is_finished():
            raise FailedElsewhere(trial.number)  # the same, found before Optuna's tell fails
        return value


def _give_back_if_reachable(trial: optuna.Trial) -> None:
    """``give_back`` ``trial`` as interrupted, unless the storage fails again (then Optuna's
    tell most likely fails too: the trial, left RUNNING, is failed and retried once its
    heartbeat is stale, as a dead worker's is)."""
    try:
        give_back(trial, fail_reason=INTERRUPTED)
    except Exception as err:
        if storage_cause(err) is None:
            raise


class FailedElsewhere(optuna.TrialPruned):
    """Another process ended this process's trial (failed it as stale): its result cannot be
    told. A ``TrialPruned``, so that Optuna logs one line for it, not a traceback."""

    def __init__(self, number: int) -> None:
        super().__init__(f"trial {number} was failed as stale by another process")


def interrupt_trials_of(study: optuna.Study, workers: set[str]) -> list[int]:
    """End the trials that ``workers`` (``host:pid``, stopped now) left RUNNING as a Ctrl-C
    ends a trial in-process: FAIL, ``interrupted``, counted nowhere, their configs enqueued
    again; without this they would wait out the heartbeat, counted as failures. Returns
    their numbers."""
    unfinished = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return [
        frozen.number
        for frozen in unfinished
        if TrialRecord.of(frozen).worker in workers and _end_interrupted(study, frozen)
    ]


def _end_interrupted(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> bool:
    """End the RUNNING trial ``frozen`` as an interrupted one (FAIL, not counted, its config
    given back); False if it ended meanwhile (a worker on another host finished it)."""
    try:
        if TrialRecord.of(frozen).fail_reason != INTERRUPTED:  # else given back, its tell cut
            give_back(optuna.Trial(study, frozen._trial_id), fail_reason=INTERRUPTED)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    study.tell(frozen.number, state=TrialState.FAIL, skip_if_finished=True)
    return True


@contextmanager
def own_trials_interrupted(study: optuna.Study) -> Iterator[None]:
    """At a Ctrl-C, end this process's trials still RUNNING as interrupted: one signalled in
    Optuna's ``ask`` or ``tell``, outside the objective that gives an interrupted trial back,
    stayed RUNNING (and, before its first heartbeat, was waited for by every later run).
    Optuna turns a Ctrl-C in its ``tell`` into an UnboundLocalError (its clean-up reads a
    value the cut-short tell never set): that is an interrupt here too."""
    try:
        yield
    except BaseException as err:
        if not _interrupted(err):
            raise
        interrupt_trials_of(study, {worker_id()})
        if isinstance(err, KeyboardInterrupt):
            raise
        raise KeyboardInterrupt from err


def _interrupted(err: BaseException | None) -> bool:
    """Whether ``err`` is, or was raised while handling, a KeyboardInterrupt."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


class UnstartedTrials:
    """RUNNING trials whose process died before their heartbeat began: Optuna never finds
    them stale, and a run waiting for them would wait forever. A live process starts a
    trial's heartbeat milliseconds after asking for it; one seen without a heartbeat for
    ``grace_s`` (the stale-heartbeat grace, ``resources.heartbeat_s`` x 2) is ended as an
    interrupted trial: not counted, its config enqueued again. Timed by this process's clock
    from when it first saw the trial, so hosts' clocks need not agree. A trial whose process
    runs on this host is never ended, however late its first beat: ending a live process's
    trial fails that process when it reports (Optuna's "has already finished")."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self._first_seen: dict[int, float] = {}  # trial id -> monotonic time

    def end_orphans(self, study: optuna.Study, log: Log) -> None:
        storage = owned_trials_storage(study)
        if storage is None or storage.get_heartbeat_interval() is None:
            return
        now = time.monotonic()
        unstarted = storage.running_without_heartbeat(study._study_id)
        self._first_seen = {i: self._first_seen.get(i, now) for i in unstarted}
        for trial_id, seen in list(self._first_seen.items()):
            if now - seen < self.grace_s:
                continue
            frozen = storage.get_trial(trial_id)
            if owner_runs_here(frozen) or not _end_interrupted(study, frozen):
                continue
            del self._first_seen[trial_id]
            owner = TrialRecord.of(frozen).worker or "a process"
            log(
                f"trial {frozen.number}: {owner} ended before it began training (no heartbeat "
                f"in {self.grace_s:.0f} s); its config runs again"
            )


def load(spec: StudySpec, device: str | None = None) -> PreparedStudy:
    """The model (on ``device``, by default the spec's) and tokenized data, counted in
    ``model_loads``."""
    global _model_loads
    _model_loads += 1
    return prepare(spec, device)


def publish_spec(study: optuna.Study, spec: StudySpec, n_trials: int) -> None:
    """Store what stand-alone workers need to join ``study``: the spec and the budget."""
    raw = {key: value for key, value in spec.raw.items() if key not in DRIVER_ONLY_KEYS}
    study.set_user_attr(SPEC_ATTR, json.dumps(raw))
    study.set_user_attr(SPEC_DIR_ATTR, str(spec.base_dir or Path.cwd()))
    study.set_user_attr(N_TRIALS_ATTR, n_trials)


def published_spec(study: optuna.Study) -> tuple[StudySpec, int]:
    """The spec and budget that ``publish_spec`` stored on ``study``."""
    attrs = study.user_attrs
    if SPEC_ATTR not in attrs:
        raise BadInputError(
            f"study {study.study_name!r} has no published spec: start it with "
            f"`reftsearch run STUDY.yaml` before starting workers"
        )
    spec = parse_spec(json.loads(attrs[SPEC_ATTR]), base_dir=Path(attrs[SPEC_DIR_ATTR]))
    return spec, attrs[N_TRIALS_ATTR]
