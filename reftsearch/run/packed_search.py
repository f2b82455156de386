"""A worker's trials ``k`` at a time: how many fit (``pack_size``), and the threads that run
them (``optimize``).

Each packed trial stays a normal Optuna trial with its own objective call, optimizer,
schedule, dev scores and pruning decision: the worker runs ``study.optimize`` with ``k``
threads, and every thread's call to the trainer joins one shared pack instead of training
alone (reftsearch.engine.packing). Whichever member is waiting steps the pack; a trial that
finishes, is pruned or fails returns to its thread, which asks the study for the next trial,
and that one joins at the next step (its slot is refilled).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import optuna
import torch

from reftsearch.engine.packing import PackedTrainer
from reftsearch.errors import SpecError, TrialFailed
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
    if k > 1:
        study = OneAskAtATime(study)
    study.optimize(
        objective,
        n_trials=1 if k == 1 else max(missing, 1),
        n_jobs=k,
        callbacks=list(callbacks),
        catch=(TrialFailed,),
    )


class OneAskAtATime(optuna.Study):
    """``study`` for threads that ask it for trials one at a time.

    Optuna takes an enqueued trial (a warm start, a config given to run) by reading it
    WAITING and then marking it RUNNING; SQLite does not lock the row between the two, so two
    threads of one process may both take it and train the same trial twice, and the second to
    finish fails the whole ``optimize`` with "Cannot tell a COMPLETE trial" (optuna#4002;
    measured with Optuna 5.1: 4 enqueued trials on 4 threads crashed 2 runs in 5). A lock
    around ``ask`` also keeps the sampler, which is not thread-safe, to one thread."""

    def __init__(self, study: optuna.Study) -> None:
        super().__init__(study.study_name, study._storage, study.sampler, study.pruner)
        self._asking = threading.Lock()

    def ask(self, fixed_distributions=None) -> optuna.Trial:
        with self._asking:
            return super().ask(fixed_distributions)
