"""An Optuna trial -> a resolved config -> trained interventions -> a dev score.

Every trial records what a person needs to read it later: the resolved config, trainable
parameters, wall time, what its training cost (``epochs_trained``, in epochs over the whole
train split) and the worker (``host:pid``) that trained it. A config this model and data cannot
train ends PRUNED with ``invalid_reason`` before anything is built
(reftsearch.methods.reft.constraints); one
identical to a finished trial copies its result (``copied_from``). A diverging or
out-of-memory trial ends FAIL with its reason; the study goes on.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import optuna
import torch

from reftsearch.engine.scoring import DevScores
from reftsearch.engine.train import DivergedError, TrainConfig, Trained, train_trial
from reftsearch.errors import TrialFailed
from reftsearch.methods.adapter import Adapter, AdapterConfig, build_adapter
from reftsearch.methods.full.config import FullConfig
from reftsearch.methods.lora.config import LoraConfig
from reftsearch.methods.lora.module import resolve_targets
from reftsearch.methods.reft.config import ReftConfig
from reftsearch.methods.reft.constraints import Limits, capped_share, why_invalid
from reftsearch.models.base import BaseModel
from reftsearch.processes import this_process
from reftsearch.search.costs import PeakMemory, weights_bytes
from reftsearch.search.fidelity import Rung, data_ladder, example_steps
from reftsearch.search.kept_weights import keep
from reftsearch.search.record import TrialRecord, pack_hits, store
from reftsearch.search.study import PreparedStudy
from reftsearch.spec.space import parse_layers, sample


@dataclass
class Spent:
    """What a trial's training cost: epochs over the whole train split (``epochs_trained``)."""

    epochs: float = 0.0


def resolve(
    values: Mapping[str, Any], base: BaseModel, seed: int, method: str = "reft"
) -> tuple[AdapterConfig, TrainConfig]:
    """Sampled/fixed parameter values -> the configs the trainer takes."""
    train = TrainConfig(
        lr=values["lr"],
        epochs=values["epochs"],
        batch_size=values["batch_size"],
        warmup_ratio=values["warmup_ratio"],
        weight_decay=values["weight_decay"],
        seed=seed,
    )
    if method in ("lora", "dora"):
        lora = LoraConfig(
            rank=values["rank"],
            alpha=values["alpha"],
            dropout=values["dropout"],
            target_modules=resolve_targets(values["target_modules"], base.model.config.model_type),
            use_dora=method == "dora",
        )
        return lora, train
    if method == "full":
        return FullConfig(), train
    reft = ReftConfig(
        intervention=values["intervention"],
        layers=parse_layers(values["layers"], base.num_layers),
        prefix=values["prefix"],
        suffix=values["suffix"],
        tied=values["tied"],
        rank=values["rank"],
        dropout=values["dropout"],
    )
    return reft, train


def invalid_reason(config: AdapterConfig, limits: Limits) -> str | None:
    """Why a sampled config cannot be trained on this model and data, or None if it can."""
    if not isinstance(config, ReftConfig):
        return None  # LoRA's target modules and full's memory were checked in study.prepare
    return why_invalid(config, limits)


def finished_twin(trial: optuna.Trial, config: dict, dtype: str) -> optuna.trial.FrozenTrial | None:
    """An earlier complete or pruned trial with the very same resolved config (seed included)
    trained in the same ``dtype`` (a float32 rerun of a 16-bit trial is not its twin)."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    for other in trial.study.get_trials(deepcopy=False, states=states):
        record = TrialRecord.of(other)
        same_dtype = record.dtype in (None, dtype)  # None: recorded before dtypes were
        if record.config == config and same_dtype and record.invalid_reason is None:
            return other
    return None


def copy_result(trial: optuna.Trial, twin: optuna.trial.FrozenTrial) -> list[float]:
    """Finish ``trial`` with ``twin``'s outcome instead of training the same thing again."""
    done = TrialRecord.of(twin)
    store(
        trial,
        copied_from=twin.number,
        n_params=done.n_params,
        n_head_params=done.n_head_params,
        pruned_at_epoch=done.pruned_at_epoch,
        pruned=done.pruned,
        base_params=done.base_params,
        export_bytes=done.export_bytes,
        weights_artifact=done.weights_artifact,
        dev_curve=done.dev_curve,
        dev_hits=done.dev_hits,
    )
    for epoch, score in sorted(twin.intermediate_values.items()):
        trial.report(score, epoch)
    if twin.state == optuna.trial.TrialState.PRUNED:
        raise optuna.TrialPruned(f"same config as trial {twin.number}, which was pruned")
    return twin.values  # Optuna takes a list for one objective too


class Objective:
    """Callable for ``study.optimize``; holds the loaded model and data across trials."""

    def __init__(self, prepared: PreparedStudy, log=print, trainer=train_trial) -> None:
        self.prepared = prepared
        self.log = log
        self.trainer = trainer  # train_trial, or a packed trainer (reftsearch.run.packed_search)
        pruner = prepared.spec.pruner
        self.per_example = pruner.type == "wilcoxon"
        self.rungs = None  # train on the whole split; else climb the data ladder
        if pruner.type in ("successive_halving", "hyperband") and pruner.resource != "epochs":
            self.rungs = data_ladder(
                prepared.split.train,
                pruner.reduction_factor,
                pruner.min_fraction,
                prepared.spec.seed,
            )

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        spec, base = self.prepared.spec, self.prepared.base
        values = sample(trial, spec.space)
        # finalize runs repeat a config with another seed (reftsearch.search.seed_reruns)
        rerun_seed = TrialRecord.of(trial).seed
        seed = spec.seed if rerun_seed is None else rerun_seed
        adapter_config, train_config = resolve(values, base, seed, spec.method)
        reason = invalid_reason(adapter_config, self.prepared.limits)
        if reason:
            # costs milliseconds, and a pruned trial tells the sampler to look elsewhere
            store(trial, invalid_reason=reason)
            raise optuna.TrialPruned(f"invalid config: {reason}")
        config = {**adapter_config.to_dict(), **vars(train_config)}
        store(
            trial,
            config=config,
            dtype=base.dtype,
            threads=torch.get_num_threads(),
            **this_process(),
        )
        if isinstance(adapter_config, ReftConfig):
            capped = capped_share(adapter_config, self.prepared.limits)
            store(
                trial,
                n_interventions=adapter_config.num_interventions,
                # pyreft's n // 2 cap: these prompts get fewer edited tokens
                positions_capped=round(capped, 4) if capped else None,
            )
        twin = finished_twin(trial, config, base.dtype)
        if twin is not None:
            return copy_result(trial, twin)
        spent = Spent()
        peak = PeakMemory(base.device, base.model)
        start = time.perf_counter()
        try:
            adapter, trained = self._train(trial, adapter_config, train_config, spent)
        except DivergedError as err:
            raise self._fail(trial, f"diverged: {err}") from err
        except torch.OutOfMemoryError as err:
            raise self._fail(trial, f"out of memory: {str(err).splitlines()[0]}") from err
        finally:
            wall_s = time.perf_counter() - start
            store(
                trial,
                wall_time_s=round(wall_s, 3),
                epochs_trained=round(spent.epochs, 4),
                epoch_s=round(wall_s / spent.epochs, 3) if spent.epochs else None,
                peak_memory_mb=round(peak.mb(), 1),
            )
        keep(trial, adapter, trained.head, self.log)  # so that export needs no retraining
        if len(spec.objectives) == 1:
            return trained.score
        return trained.score, float(adapter.num_parameters())  # objectives: [score, n_params]

    def _train(
        self, trial: optuna.Trial, config: AdapterConfig, train_config: TrainConfig, spent: Spent
    ) -> tuple[Adapter, Trained]:
        """Train on the whole train split, or up the data ladder (reftsearch.search.fidelity)."""
        base, split = self.prepared.base, self.prepared.split
        # a finalize run must finish: it measures seed variance, not promise
        finalize = TrialRecord.of(trial).finalize_of is not None
        rungs = self.rungs if self.rungs and not finalize else [Rung(1, 1.0, split.train)]
        for rung in rungs:
            # the seed fixes the adapter's init too; every rung starts from the same one
            adapter = build_adapter(config, base, train_config.seed)
            n_head_params = sum(p.numel() for p in base.head_parameters())
            store(
                trial,
                n_params=adapter.num_parameters(),
                n_head_params=n_head_params,
                base_params=sum(p.numel() for p in base.model.parameters()),
                export_bytes=weights_bytes(adapter, base.head),
            )
            report = len(rungs) == 1 and not finalize
            on_epoch = partial(
                self._epoch_done, trial, spent, rung.fraction, report, train_config.epochs
            )
            subset = replace(split, train=rung.train)
            cache = self.prepared.cache_for(config)
            trained = self.trainer(base, adapter, subset, train_config, on_epoch, cache)
            if len(rungs) > 1:
                self._report_rung(trial, rung, trained.score, last=rung is rungs[-1])
        return adapter, trained

    def _epoch_done(
        self,
        trial: optuna.Trial,
        spent: Spent,
        fraction: float,
        report: bool,
        last_epoch: int,
        epoch: int,
        dev: DevScores,
    ) -> None:
        spent.epochs += fraction
        if epoch == last_epoch and fraction == 1.0 and dev.per_example is not None:
            store(trial, dev_hits=pack_hits(dev.per_example))  # the trained config's
        if report:
            self._report(trial, epoch, dev, last=epoch == last_epoch)

    def _report(self, trial: optuna.Trial, epoch: int, dev: DevScores, last: bool) -> None:
        """Report the epoch's dev score and prune if the pruner says so; after the last
        epoch the trial has spent all it will, so it completes whatever the pruner says
        (pruned there it would only drop out of the ranking, finalize and the sampler's
        view of complete trials: Hyperband's top rung falls on the last epoch)."""
        pareto = len(trial.study.directions) > 1
        if pareto or self.per_example:
            # the epochs' scores are not Optuna's intermediate values here: keep the curve
            store(trial, dev_curve=(*TrialRecord.of(trial).dev_curve, dev.score))
        if pareto:  # Optuna cannot prune a two-objective trial (Trial.report raises)
            return
        if self.per_example:  # Wilcoxon: one step per dev example (reftsearch.search.fidelity)
            hits = dev.per_example
            for step, hit in zip(example_steps(epoch, len(hits)), hits, strict=True):
                trial.report(float(hit), step)
        else:
            trial.report(dev.score, epoch)
        if not last and trial.should_prune():
            store(trial, pruned_at_epoch=epoch, pruned=f"after epoch {epoch} (dev={dev.score:.4f})")
            raise optuna.TrialPruned(f"pruned after epoch {epoch} with dev score {dev.score:.4f}")

    def _report_rung(self, trial: optuna.Trial, rung: Rung, score: float, last: bool) -> None:
        trial.report(score, rung.step)
        if not last and trial.should_prune():
            where = f"at {rung.fraction:.3g} of the training data"
            store(trial, pruned=f"{where} (dev={score:.4f})")
            raise optuna.TrialPruned(f"pruned {where} with dev score {score:.4f}")

    def _fail(self, trial: optuna.Trial, reason: str) -> TrialFailed:
        store(trial, fail_reason=reason)
        return TrialFailed(f"trial {trial.number} failed: {reason}")
