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
import torch

from reftsearch.engine.activation_cache import PrefixCache
from reftsearch.engine.train import (
    EpochCallback,
    Pack,
    SplitData,
    TrainConfig,
    TrialRun,
    keep_head,
    own_head,
)
from reftsearch.errors import SpecError, TrialFailed
from reftsearch.methods.adapter import GLOBAL_RNG_LOCK
from reftsearch.methods.reft.module import ReftModule
from reftsearch.models.base import BaseModel
from reftsearch.progress import Log
from reftsearch.run.estimate import step_bytes
from reftsearch.search.objective import Objective
from reftsearch.search.study import PreparedStudy

Callback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]

# ``auto`` packs at most this many: on an H100, 16 SmolLM2-sized trials took 2x the step of 8,
# so past ~16 the GPU is busy and more trials per pack only delay each trial's result
AUTO_MAX_PACK = 16
# of the free memory, what packed steps may take: the rest for the allocator's fragmentation,
# dev passes and configs heavier than the ones measured
MEMORY_SHARE = 0.7


def make_objective(prepared: PreparedStudy, log: Log, k: int) -> Objective:
    """The worker's objective: trials train alone (``k`` = 1), or join a shared pack."""
    if k == 1:
        return Objective(prepared, log)
    return Objective(prepared, log, trainer=PackedTrainer(prepared.base, prepared.cache))


def pack_size(prepared: PreparedStudy, log: Log) -> int:
    """How many trials this worker packs: ``resources.trials_per_worker``, or for ``auto`` as
    many as fit its GPU's free memory (at most ``AUTO_MAX_PACK``); one on a CPU."""
    wanted = prepared.spec.resources.trials_per_worker
    method = getattr(prepared.spec, "method", "reft")
    device = prepared.base.device
    if wanted == "auto" and method == "reft" and device.type == "cuda":
        return _trials_fitting_the_gpu(prepared, device, log)
    if wanted == "auto":
        reason = "ReFT trials only" if method != "reft" else "a CPU step's cost grows with its rows"
        log(f"resources.trials_per_worker auto: 1 on {device} ({reason})")
        return 1
    if wanted > 1 and method != "reft":
        raise SpecError(
            "resources.trials_per_worker",
            f"packing trains ReFT trials only (LoRA edits every row's weights), got {wanted} "
            f"with method {method!r}: set it to 1",
        )
    return wanted


def _trials_fitting_the_gpu(prepared: PreparedStudy, device: torch.device, log: Log) -> int:
    try:
        per_trial = step_bytes(prepared)
    except torch.cuda.OutOfMemoryError:  # one trial alone barely fits: nothing to pack beside it
        torch.cuda.empty_cache()
        log(f"resources.trials_per_worker auto: 1 on {device} (one trial ran out of memory)")
        return 1
    free, total = torch.cuda.mem_get_info(device)
    share = prepared.spec.resources.gpus_per_trial
    if 0 < share < 1:  # workers sharing the GPU, each measuring at once: each takes its share
        free = min(free, int(share * total) - torch.cuda.memory_allocated(device))
    k = trials_that_fit(free, per_trial)
    log(
        f"resources.trials_per_worker auto: {k} on {device} ({per_trial / 2**20:.0f} MB per "
        f"trial's steps, {free / 2**30:.1f} GB free)"
    )
    return k


def trials_that_fit(free_bytes: int, per_trial_bytes: int, limit: int = AUTO_MAX_PACK) -> int:
    """Trials whose steps fit ``MEMORY_SHARE`` of ``free_bytes`` together: 1 to ``limit``."""
    fit = int(free_bytes * MEMORY_SHARE) // max(per_trial_bytes, 1)
    return max(1, min(limit, fit))


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
