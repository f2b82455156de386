"""An Optuna trial -> a resolved config -> trained interventions -> a dev score.

Every trial records what a person needs to read it later: the resolved config, trainable
parameters, wall time and the worker (``host:pid``) that trained it. A diverging or
out-of-memory trial ends FAIL with its reason; the study goes on.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from functools import partial
from typing import Any

import optuna
import torch

from reftsearch.errors import ReftSearchError
from reftsearch.finalize import FINALIZE_OF, SEED
from reftsearch.reft import ReftConfig, ReftModule
from reftsearch.space import parse_layers, sample
from reftsearch.study import PreparedStudy
from reftsearch.train import DivergedError, TrainConfig, train_trial


class TrialFailed(ReftSearchError):
    """This trial cannot finish (diverged, out of memory); the study continues."""


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def resolve(
    values: Mapping[str, Any], num_layers: int, seed: int
) -> tuple[ReftConfig, TrainConfig]:
    """Sampled/fixed parameter values -> the configs the trainer takes."""
    reft = ReftConfig(
        intervention=values["intervention"],
        layers=parse_layers(values["layers"], num_layers),
        prefix=values["prefix"],
        suffix=values["suffix"],
        tied=values["tied"],
        rank=values["rank"],
        dropout=values["dropout"],
    )
    train = TrainConfig(
        lr=values["lr"],
        epochs=values["epochs"],
        batch_size=values["batch_size"],
        warmup_ratio=values["warmup_ratio"],
        weight_decay=values["weight_decay"],
        seed=seed,
    )
    return reft, train


def invalid_reason(config: ReftConfig, hidden_size: int) -> str | None:
    """Why a sampled config cannot be trained, or None if it can."""
    if config.prefix == 0 and config.suffix == 0:
        return "prefix and suffix are both 0: no token would be intervened on"
    if config.rank > hidden_size:
        return f"rank {config.rank} exceeds the hidden size {hidden_size}"
    return None


def finished_twin(trial: optuna.Trial, config: dict) -> optuna.trial.FrozenTrial | None:
    """An earlier complete or pruned trial with the very same resolved config (seed included)."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    for other in trial.study.get_trials(deepcopy=False, states=states):
        if other.user_attrs.get("config") == config and "invalid_reason" not in other.user_attrs:
            return other
    return None


def copy_result(trial: optuna.Trial, twin: optuna.trial.FrozenTrial) -> float:
    """Finish ``trial`` with ``twin``'s outcome instead of training the same thing again."""
    trial.set_user_attr("copied_from", twin.number)
    for key in ("n_params", "n_head_params", "pruned_at_epoch"):
        if key in twin.user_attrs:
            trial.set_user_attr(key, twin.user_attrs[key])
    for epoch, score in sorted(twin.intermediate_values.items()):
        trial.report(score, epoch)
    if twin.state == optuna.trial.TrialState.PRUNED:
        raise optuna.TrialPruned(f"same config as trial {twin.number}, which was pruned")
    return twin.value


class Objective:
    """Callable for ``study.optimize``; holds the loaded model and data across trials."""

    def __init__(self, prepared: PreparedStudy, log=print) -> None:
        self.prepared = prepared
        self.log = log

    def __call__(self, trial: optuna.Trial) -> float:
        spec, base = self.prepared.spec, self.prepared.base
        values = sample(trial, spec.space)
        # finalize runs repeat a config with another seed (reftsearch.finalize)
        seed = trial.user_attrs.get(SEED, spec.seed)
        reft_config, train_config = resolve(values, base.num_layers, seed)
        reason = invalid_reason(reft_config, base.hidden_size)
        if reason:
            # costs milliseconds, and a pruned trial tells the sampler to look elsewhere
            trial.set_user_attr("invalid_reason", reason)
            raise optuna.TrialPruned(f"invalid config: {reason}")
        config = {**reft_config.to_dict(), **vars(train_config)}
        trial.set_user_attr("config", config)
        trial.set_user_attr("n_interventions", reft_config.num_interventions)
        trial.set_user_attr("worker", worker_id())
        twin = finished_twin(trial, config)
        if twin is not None:
            return copy_result(trial, twin)
        reft = ReftModule(reft_config, base.hidden_size).to(base.device)
        trial.set_user_attr("n_params", reft.num_parameters())
        trial.set_user_attr("n_head_params", sum(p.numel() for p in base.head_parameters()))
        # a finalize run must finish: it measures seed variance, not promise
        on_epoch = None if FINALIZE_OF in trial.user_attrs else partial(self._report, trial)
        start = time.perf_counter()
        try:
            return train_trial(base, reft, self.prepared.split, train_config, on_epoch)
        except DivergedError as err:
            raise self._fail(trial, f"diverged: {err}") from err
        except torch.OutOfMemoryError as err:
            raise self._fail(trial, f"out of memory: {str(err).splitlines()[0]}") from err
        finally:
            trial.set_user_attr("wall_time_s", round(time.perf_counter() - start, 3))

    def _report(self, trial: optuna.Trial, epoch: int, score: float) -> None:
        trial.report(score, epoch)
        if trial.should_prune():
            trial.set_user_attr("pruned_at_epoch", epoch)
            raise optuna.TrialPruned(f"pruned after epoch {epoch} with dev score {score:.4f}")

    def _fail(self, trial: optuna.Trial, reason: str) -> TrialFailed:
        trial.set_user_attr("fail_reason", reason)
        return TrialFailed(f"trial {trial.number} failed: {reason}")
