"""Trial packing: ``k`` trials of one worker trained side by side in one batch.

A small model leaves an accelerator mostly idle: one trial's step is launch-bound, and the
step of ``k`` trials' batches stacked into one is barely slower. ``Pack`` extends
``train.train_trial``'s loop to ``k`` members: one ``forward_losses`` over all their batches
(each trial's rows through its own interventions and head), then each member's own
optimizer step, schedule, dev pass and pruning decision. A member that ends leaves the pack
and another may join. ``PackedTrainer`` is ``train_trial`` for threads that share one pack
(reftsearch.run.packed_search runs them).

Packing is for ReFT trials: LoRA edits the weights every row goes through.
"""

from __future__ import annotations

import copy
import math
import threading
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn

from reftsearch.data.batches import SplitData
from reftsearch.engine.activation_cache import PrefixCache
from reftsearch.engine.scoring import DevScores, evaluate_examples
from reftsearch.engine.train import (
    EpochCallback,
    TrainConfig,
    Trained,
    build_optimizer,
    build_scheduler,
    diverged,
    epoch_batches,
    forward_losses,
    optimizer_step,
    reset_head,
    routed_heads,
    trainable,
)
from reftsearch.methods.adapter import GLOBAL_RNG_LOCK, Adapter
from reftsearch.models.base import BaseModel


class TrialRun:
    """One trial's training state, advanced a step at a time so that several trials can
    share one forward pass (``Pack``): its batches, optimizer, schedule and dev scores."""

    def __init__(
        self,
        adapter: Adapter,
        data: SplitData,
        config: TrainConfig,
        head: nn.Module | None,
        on_epoch: EpochCallback | None = None,
    ) -> None:
        self.adapter = adapter
        self.data = data
        self.config = config
        self.head = head
        self.on_epoch = on_epoch
        self.params = trainable(adapter, head)
        self.optimizer = build_optimizer(adapter, head, config)
        self.scheduler = build_scheduler(self.optimizer, config, len(data.train))
        self.epoch = 1
        self.score = math.nan
        self._lengths = [len(e.input_ids) for e in data.train]
        self._order = torch.Generator().manual_seed(config.seed)
        self._batches = epoch_batches(self._lengths, config.batch_size, self._order)

    @property
    def finished(self) -> bool:
        return self.epoch > self.config.epochs

    @property
    def epoch_over(self) -> bool:
        return not self._batches

    @property
    def batches_left(self) -> list[list[int]]:
        """Rows of each batch this epoch has still to train, in order."""
        return list(self._batches)

    def take_rows(self) -> list[int]:
        """Rows (of the train split) of this trial's next batch."""
        return self._batches.pop(0)

    def step(self) -> None:
        """Apply the gradients of the last backward pass."""
        optimizer_step(self.params, self.optimizer, self.scheduler)

    def end_epoch(self, scores: DevScores) -> None:
        """Record the dev score of the epoch just trained (``on_epoch`` may raise)."""
        self.score = scores.score
        if self.on_epoch is not None:
            self.on_epoch(self.epoch, scores)
        self.epoch += 1
        if not self.finished:
            self._batches = epoch_batches(self._lengths, self.config.batch_size, self._order)


Ended = tuple[TrialRun, BaseException | None]


class Pack:
    """Trials trained side by side: one frozen forward per step over all their batches,
    each trial's rows through its own interventions (and its own classification head).

    Each trial keeps its own optimizer, schedule, dev scores and pruning decision; a trial
    that ends leaves the pack and another may join.
    """

    def __init__(self, base: BaseModel, cache: PrefixCache | None = None) -> None:
        self.base = base
        self.cache = cache
        self.runs: list[TrialRun] = []
        self._detach: dict[int, ExitStack] = {}

    def __enter__(self) -> Pack:
        return self

    def __exit__(self, *exc) -> None:
        for run in list(self.runs):
            self.remove(run)

    def add(self, run: TrialRun) -> None:
        stack = ExitStack()
        stack.enter_context(run.adapter.attached(self.base.blocks))
        self._detach[id(run)] = stack
        self.runs.append(run)

    def remove(self, run: TrialRun) -> None:
        self.runs.remove(run)
        self._detach.pop(id(run)).close()

    def step(self) -> list[Ended]:
        """One training step of every member, then the dev pass of those whose epoch ended.

        Returns the members that ended (finished, or stopped by an error, e.g. a diverged
        loss or ``optuna.TrialPruned`` from ``on_epoch``); they have left the pack.
        """
        ended: list[Ended] = []
        runs = list(self.runs)
        members = [(run.adapter, run.data.train, run.take_rows()) for run in runs]
        heads = [run.head for run in runs]
        losses = forward_losses(self.base, self.cache, members, heads)
        kept = []
        for run, loss in zip(runs, losses, strict=True):
            if torch.isfinite(loss):
                kept.append((run, loss))
            else:
                ended.append((run, diverged(loss, run.epoch)))
        if kept:
            torch.stack([loss for _, loss in kept]).sum().backward()
        for run, _ in kept:
            run.step()
            if run.epoch_over:
                try:
                    run.end_epoch(self.score(run))
                except Exception as error:  # pruned, or the dev pass failed: this trial only
                    ended.append((run, error))
                    continue
                if run.finished:
                    ended.append((run, None))
        for run, _ in ended:
            self.remove(run)
        return ended

    def score(self, run: TrialRun) -> DevScores:
        """``run``'s dev scores, the other members passing everything through untouched."""
        for other in self.runs:
            other.adapter.clear_locations()
        with routed_heads(self.base, [(run.head, slice(None))]):
            return evaluate_examples(self.base, run.adapter, run.data, cache=self.cache)


def own_head(base: BaseModel, seed: int) -> nn.Module | None:
    """A classification head of a packed trial's own, initialised as ``reset_head(seed)``."""
    return copy.deepcopy(reset_head(base, seed))


@dataclass
class _Member:
    adapter: Adapter
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
        adapter: Adapter,
        data: SplitData,
        config: TrainConfig,
        on_epoch: EpochCallback | None = None,
        cache: PrefixCache | None = None,
    ) -> Trained:
        """Same contract as ``train_trial`` (``base`` and ``cache`` are the trainer's own)."""
        member = _Member(adapter, data, config, on_epoch)
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
        return Trained(member.run.score, member.run.head)

    def _step(self) -> None:
        with self._lock:
            joining, self._joining = self._joining, []
        for member in joining:
            try:
                # built here, between steps, as a fresh head re-initialises the model's own
                head = own_head(self.base, member.config.seed)
                run = TrialRun(member.adapter, member.data, member.config, head, member.on_epoch)
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
