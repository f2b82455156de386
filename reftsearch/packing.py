"""Trial packing: ``k`` trials of one worker trained side by side in one batch.

A small model leaves an accelerator mostly idle: one trial's step is launch-bound, and the
step of ``k`` trials' batches stacked into one is barely slower (``train.Pack``: one frozen
forward, each trial's rows through its own interventions and head). Each trial stays a
normal Optuna trial with its own objective call, optimizer, schedule, dev scores and pruning
decision: the worker runs ``study.optimize`` with ``k`` threads, and every thread's call to
the trainer joins one shared pack instead of training alone. Whichever member is waiting
steps the pack; a trial that finishes, is pruned or fails returns to its thread, which asks
the study for the next trial, and that one joins at the next step (its slot is refilled).

Packing is for ReFT trials: LoRA edits the weights every row goes through.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import optuna

from reftsearch.adapters import GLOBAL_RNG_LOCK
from reftsearch.cache import PrefixCache
from reftsearch.errors import SpecError
from reftsearch.models import BaseModel
from reftsearch.objective import Objective, TrialFailed
from reftsearch.reft import ReftModule
from reftsearch.study import PreparedStudy
from reftsearch.train import (
    EpochCallback,
    Pack,
    SplitData,
    TrainConfig,
    TrialRun,
    keep_head,
    own_head,
)

Callback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]


def make_objective(prepared: PreparedStudy, log: Callable[[str], None]) -> Objective:
    """The worker's objective: trials train alone, or join a shared pack when the spec asks
    for ``resources.trials_per_worker`` > 1."""
    k = prepared.spec.resources.trials_per_worker
    if k == 1:
        return Objective(prepared, log)
    if getattr(prepared.spec, "method", "reft") != "reft":
        raise SpecError(
            "resources.trials_per_worker",
            f"packing trains ReFT trials only (LoRA edits every row's weights), got {k} "
            f"with method {prepared.spec.method!r}: set it to 1",
        )
    return Objective(prepared, log, trainer=PackedTrainer(prepared.base, prepared.cache))


def optimize(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    k: int,
    missing: int,
    callbacks: Sequence[Callback] = (),
) -> None:
    """One trial, or (``k`` > 1) up to ``missing`` trials ``k`` at a time: Optuna's thread
    pool starts the next trial as soon as one ends, so a slot never waits for the others."""
    study.optimize(
        objective,
        n_trials=1 if k == 1 else max(missing, 1),
        n_jobs=k,
        callbacks=list(callbacks),
        catch=(TrialFailed,),
    )


@dataclass
class _Member:
    reft: ReftModule
    data: SplitData
    config: TrainConfig
    on_epoch: EpochCallback | None
    run: TrialRun | None = None
    done: bool = False
    error: BaseException | None = None


class PackedTrainer:
    """``train_trial`` for threads that share one model: each call joins a shared ``Pack``
    and returns (or raises) when its trial ends."""

    def __init__(self, base: BaseModel, cache: PrefixCache | None = None) -> None:
        self.base = base
        self.pack = Pack(base, cache)
        self._lock = threading.Condition()
        self._joining: list[_Member] = []
        self._members: dict[int, _Member] = {}  # id(run) -> member
        self._stepping = False

    def __call__(
        self,
        base: BaseModel,
        reft: ReftModule,
        data: SplitData,
        config: TrainConfig,
        on_epoch: EpochCallback | None = None,
        cache: PrefixCache | None = None,
    ) -> float:
        """Same contract as ``train_trial`` (``base`` and ``cache`` are the trainer's own)."""
        member = _Member(reft, data, config, on_epoch)
        with self._lock:
            self._joining.append(member)
        while True:
            with self._lock:
                while self._stepping and not member.done:
                    self._lock.wait()
                if member.done:
                    break
                self._stepping = True  # this thread steps the pack until its trial ends
            try:
                self._step()
            finally:
                with self._lock:
                    self._stepping = False
                    self._lock.notify_all()
        if member.error is not None:
            raise member.error
        keep_head(reft, member.run.head)
        return member.run.score

    def _step(self) -> None:
        with self._lock:
            joining, self._joining = self._joining, []
        for member in joining:
            try:
                # built here, between steps, as a fresh head re-initialises the model's own
                head = own_head(self.base, member.config.seed)
                run = TrialRun(member.reft, member.data, member.config, head, member.on_epoch)
            except Exception as error:  # this trial cannot start; the others go on
                with self._lock:
                    member.done, member.error = True, error
                continue
            member.run = run
            self._members[id(run)] = member
            self.pack.add(run)
        if not self.pack.runs:
            return
        try:
            with GLOBAL_RNG_LOCK:  # dropout draws; a joining trial's init must not interleave
                ended = self.pack.step()
        except Exception as error:  # e.g. out of memory: every member of this step fails
            ended = [(run, error) for run in list(self.pack.runs)]
            for run in list(self.pack.runs):
                self.pack.remove(run)
        with self._lock:
            for run, error in ended:
                member = self._members.pop(id(run))
                member.done, member.error = True, error
