"""A validated spec -> loaded model and data, sampler, pruner, and the Optuna study.

``prepare`` does every check that needs the model or the data, and ``check_storage`` checks
the storage URL, all before ``open_study`` writes anything: a refused study leaves the
storage exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import optuna

from reftsearch.data.batches import SplitData, encode
from reftsearch.data.splits import TaskData, load_task_data
from reftsearch.engine.activation_cache import PrefixCache
from reftsearch.errors import BadInputError, SpecError
from reftsearch.methods.adapter import AdapterConfig
from reftsearch.methods.lora.module import check_targets
from reftsearch.methods.reft.config import ReftConfig
from reftsearch.methods.reft.constraints import Limits, check_space, limits_of
from reftsearch.models.base import BaseModel, load_base_model, resolve_device
from reftsearch.models.sources import ModelLoadError, cache_dir, shape_of
from reftsearch.search.fidelity import rung_count
from reftsearch.search.fit import check_lengths
from reftsearch.search.kept_weights import WEIGHTS_DIR, weights_dir
from reftsearch.search.pruners import SparingPruner
from reftsearch.search.record import is_search_trial, search_trials
from reftsearch.search.storage import open_storage
from reftsearch.spec.space import grid, lowest_layers
from reftsearch.spec.study_file import PrunerSpec, StudySpec

NO_GRID_POINT = -1  # the grid_id of a trial that gave its point back
LABELS_ATTR = "label_names"  # a classification study's classes: class id i is the i-th

FINISHED_STATES = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.PRUNED,
    optuna.trial.TrialState.FAIL,
)


@dataclass
class PreparedStudy:
    spec: StudySpec
    base: BaseModel
    data: TaskData
    split: SplitData

    @cached_property
    def limits(self) -> Limits:
        """What this model and training data allow a ReFT config
        (reftsearch.methods.reft.constraints)."""
        lengths = [e.prompt_length for e in self.split.train]
        return limits_of(self.base.num_layers, self.base.hidden_size, lengths)

    @cached_property
    def cache(self) -> PrefixCache:
        """This worker's frozen-prefix activations, shared by its trials
        (reftsearch.engine.activation_cache)."""
        expected = ()
        if self.spec.method == "reft":
            expected = lowest_layers(self.spec.space, self.base.num_layers)
        resources = self.spec.resources
        spill_dir = Path(resources.spill_dir) if resources.spill_dir else cache_dir() / "spill"
        return PrefixCache(resources.cache_mb, expected, resources.spill_mb, spill_dir)

    def cache_for(self, config: AdapterConfig) -> PrefixCache | None:
        """The cache a trial of ``config`` replays: none for LoRA, which changes every block
        it is in."""
        return self.cache if isinstance(config, ReftConfig) else None


def prepare(spec: StudySpec, device: str | None = None) -> PreparedStudy:
    """Load data and model once, and check the space against them. The model goes to
    ``device``, by default the spec's ``model.device``."""
    device = spec_device(spec) if device is None else device
    data = load_task_data(spec.task, spec.seed)
    base = _load_model(spec, data, device)
    split = SplitData(
        train=encode(data.train, base.tokenizer, spec.task),
        dev=encode(data.dev, base.tokenizer, spec.task),
        kind=spec.task.kind,
        metric=spec.metric,
        max_new_tokens=spec.task.max_new_tokens,
    )
    prepared = PreparedStudy(spec, base, data, split)
    check_lengths(spec.task, shape_of(base.model.config.to_dict()).max_positions)
    if spec.method == "reft":
        check_space(spec.space, prepared.limits)
    else:
        check_targets(spec.space, base, "space.target_modules")
    return prepared


def with_model_on(prepared: PreparedStudy, device: str) -> PreparedStudy:
    """``prepared`` with its model loaded again, on ``device``: a Ray run's driver dropped
    its weights during the search. The data stays as loaded and tokenized."""
    return replace(prepared, base=_load_model(prepared.spec, prepared.data, device))


def _load_model(spec: StudySpec, data: TaskData, device: str) -> BaseModel:
    head = "classification" if spec.task.kind == "classification" else "causal_lm"
    try:
        base = load_base_model(
            spec.model.path,
            head,
            num_labels=max(data.num_labels, 2),
            dtype=spec.model.dtype,
            device=device,
        )
    except ModelLoadError as err:
        raise SpecError("model.path", str(err)) from None
    if data.label_names:  # so save_pretrained and HF pipelines say "Sports", not LABEL_2
        base.model.config.id2label = dict(enumerate(data.label_names))
        base.model.config.label2id = {name: i for i, name in enumerate(data.label_names)}
    return base


def keep_label_names(study: optuna.Study, label_names: list[str] | None) -> None:
    """Store a classification study's classes on it; a resumed study must find the same
    ones, or the ids its trials' heads learned would now mean other classes."""
    if label_names is None:
        return
    stored = study.user_attrs.get(LABELS_ATTR)
    if stored is None:
        study.set_user_attr(LABELS_ATTR, list(label_names))
    elif stored != list(label_names):
        raise BadInputError(
            f"task.data: study {study.study_name!r} was run with the classes {stored}, "
            f"the data now gives {list(label_names)}: class ids would change meaning; "
            "run the new data as a study of another name"
        )


def spec_device(spec: StudySpec) -> str:
    """The device ``model.device`` names on this machine (``auto`` resolved)."""
    try:
        return str(resolve_device(spec.model.device))
    except ModelLoadError as err:
        raise SpecError("model.device", str(err)) from None


def make_sampler(spec: StudySpec, resumed_after: int = 0) -> optuna.samplers.BaseSampler:
    """The spec's sampler, seeded; a study resumed after ``n`` trials seeds it ``seed + n``,
    or a random sampler would draw again the very configs its first trials drew."""
    seed = spec.sampler.seed if spec.sampler.seed is not None else spec.seed
    return SAMPLERS[spec.sampler.type](spec, seed + resumed_after)


# sampler.type -> the sampler, given the spec and the seed; the names are the spec's SAMPLERS
# (a test holds the two equal: reading a spec must not import this module)
SAMPLERS: dict[str, Callable[[StudySpec, int], optuna.samplers.BaseSampler]] = {
    "tpe": lambda spec, seed: optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=spec.sampler.n_startup_trials
    ),
    "random": lambda spec, seed: optuna.samplers.RandomSampler(seed=seed),
    "grid": lambda spec, seed: optuna.samplers.GridSampler(grid(spec.space, "space"), seed=seed),
    # CMA-ES handles the numeric parameters; categorical ones fall back to random
    "cmaes": lambda spec, seed: optuna.samplers.CmaEsSampler(
        seed=seed, warn_independent_sampling=False, n_startup_trials=spec.sampler.n_startup_trials
    ),
    "nsga2": lambda spec, seed: optuna.samplers.NSGAIISampler(seed=seed),
}


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    p, max_epochs = spec.pruner, spec.budget.max_epochs
    if p.type == "none":
        return optuna.pruners.NopPruner()
    if p.type == "wilcoxon":  # steps are single dev examples: no score to compare
        return optuna.pruners.WilcoxonPruner(p_threshold=p.p_threshold)
    return SparingPruner(_rung_pruner(p, max_epochs))


def _rung_pruner(p: PrunerSpec, max_epochs: int) -> optuna.pruners.BasePruner:
    if p.type == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=p.n_startup_trials, n_warmup_steps=p.min_resource - 1
        )
    min_resource, max_resource = p.min_resource, max_epochs
    if p.resource == "data_fraction":  # rungs report at steps 1, rf, rf**2, ... (fidelity.py)
        min_resource = 1
        max_resource = p.reduction_factor ** (rung_count(p.reduction_factor, p.min_fraction) - 1)
    if p.type == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=min_resource, reduction_factor=p.reduction_factor
        )
    return optuna.pruners.HyperbandPruner(
        min_resource=min_resource, max_resource=max_resource, reduction_factor=p.reduction_factor
    )


def open_study(spec: StudySpec, storage_url: str, heartbeat: bool = True) -> optuna.Study:
    """Create the study, or load it if it exists (resume)."""
    storage = open_storage(storage_url, spec.resources.heartbeat_s if heartbeat else None)
    study = optuna.create_study(
        study_name=spec.name,
        storage=storage,
        directions=list(spec.directions),
        sampler=make_sampler(spec),
        pruner=make_pruner(spec),
        load_if_exists=True,
    )
    existing = len(study.get_trials(deepcopy=False))
    if existing:
        study.sampler = make_sampler(spec, resumed_after=existing)
    stored = tuple(d.name.lower() for d in study.directions)
    if stored != spec.directions:
        raise BadInputError(
            f"study {spec.name!r} in this storage is to {' and '.join(stored)} "
            f"({len(stored)} objectives), the spec says {' and '.join(spec.directions)}"
        )
    study.set_user_attr("metric", spec.metric)
    # the dashboard's axes say "dev accuracy" / "trainable params", not "Objective 0"
    names = {"score": f"dev {spec.metric}", "n_params": "trainable params"}
    study.set_metric_names([names[o] for o in spec.objectives])
    study.set_user_attr("task_kind", spec.task.kind)
    study.set_user_attr("model", spec.model.path)
    if WEIGHTS_DIR not in study.user_attrs:  # fixed at creation: trials already point there
        study.set_user_attr(WEIGHTS_DIR, str(weights_dir(spec, storage_url)))
    return study


def budget_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The finished search trials that the budget counts. Finalize reruns do not count, nor
    does a trial whose worker died and that was retried: its retry counts instead."""
    trials = search_trials(study)
    retried = _retried(trials)
    return [t for t in trials if t.state in FINISHED_STATES and t.number not in retried]


def asked_past_budget(study: optuna.Study, trial: optuna.Trial, n_trials: int) -> bool:
    """Whether ``trial`` is a search trial asked when ``n_trials`` search trials asked before
    it counted toward the budget already (finished, running or waiting to run): workers that
    each saw the last trial missing ask one each at once, and only the first one asked is to
    run. A finalize rerun (which a worker may pop as the search ends) is never past it."""
    if not is_search_trial(trial):
        return False
    trials = search_trials(study)
    retried = _retried(trials)
    return sum(t.number < trial.number and t.number not in retried for t in trials) >= n_trials


def give_back_grid_point(trial: optuna.Trial) -> None:
    """Let ``trial``, which is about to fail unrun, leave its grid point unvisited.

    GridSampler assigns a point as a trial starts and counts every finished trial's point as
    visited, a failed one too: a trial refused past the budget would take its point with it,
    and no later run (with a raised budget) would ever train that config. Its ``grid_id`` is
    rewritten to one no grid holds."""
    storage, trial_id = trial.study._storage, trial._trial_id
    if "grid_id" in storage.get_trial_system_attrs(trial_id):
        storage.set_trial_system_attr(trial_id, "grid_id", NO_GRID_POINT)


def _retried(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    """The trials whose worker died and that were retried (by a later trial)."""
    return {number for t in trials for number in t.system_attrs.get("retry_history", [])}


def count_finished(study: optuna.Study) -> int:
    return len(budget_trials(study))
