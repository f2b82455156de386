"""A validated spec -> loaded model and data, sampler, pruner, and the Optuna study.

``prepare`` does every check that needs the model or the data, and ``check_storage`` checks
the storage URL, all before ``open_study`` writes anything: a refused study leaves the
storage exactly as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna

from reftsearch.data import TaskData, encode, load_task_data
from reftsearch.errors import BadInputError, SpecError
from reftsearch.finalize import search_trials
from reftsearch.models import BaseModel, ModelLoadError, load_base_model
from reftsearch.space import grid, layer_choices, parse_layers
from reftsearch.spec import StudySpec
from reftsearch.storage import check_storage, open_storage, sqlite_path
from reftsearch.train import SplitData

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


def prepare(spec: StudySpec) -> PreparedStudy:
    """Load data and model once, and check the space against them."""
    data = load_task_data(spec.task, spec.seed)
    head = "classification" if spec.task.kind == "classification" else "causal_lm"
    try:
        base = load_base_model(
            spec.model.path, head, num_labels=max(data.num_labels, 2), dtype=spec.model.dtype
        )
    except ModelLoadError as err:
        raise SpecError("model.path", str(err)) from None
    _check_layers(spec, base.num_layers)
    split = SplitData(
        train=encode(data.train, base.tokenizer, spec.task),
        dev=encode(data.dev, base.tokenizer, spec.task),
        kind=spec.task.kind,
        metric=spec.metric,
        max_new_tokens=spec.task.max_new_tokens,
    )
    return PreparedStudy(spec, base, data, split)


def _check_layers(spec: StudySpec, num_layers: int) -> None:
    dimension = spec.space["layers"]
    for i, text in enumerate(layer_choices(dimension)):
        path = "space.layers" if len(layer_choices(dimension)) == 1 else f"space.layers[{i}]"
        try:
            parse_layers(text, num_layers)
        except ValueError as err:
            raise SpecError(path, str(err)) from None


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    seed = spec.sampler.seed if spec.sampler.seed is not None else spec.seed
    kind = spec.sampler.type
    if kind == "grid":
        return optuna.samplers.GridSampler(grid(spec.space, "space"), seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "cmaes":
        # CMA-ES handles the numeric parameters; categorical ones fall back to random.
        return optuna.samplers.CmaEsSampler(
            seed=seed,
            warn_independent_sampling=False,
            n_startup_trials=spec.sampler.n_startup_trials,
        )
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.sampler.n_startup_trials)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    p, max_epochs = spec.pruner, spec.budget.max_epochs
    if p.type == "none":
        return optuna.pruners.NopPruner()
    if p.type == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=p.n_startup_trials, n_warmup_steps=p.min_resource - 1
        )
    if p.type == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=p.min_resource, reduction_factor=p.reduction_factor
        )
    return optuna.pruners.HyperbandPruner(
        min_resource=p.min_resource, max_resource=max_epochs, reduction_factor=p.reduction_factor
    )


def open_study(spec: StudySpec, storage_url: str, heartbeat: bool = True) -> optuna.Study:
    """Create the study, or load it if it exists (resume)."""
    storage = open_storage(storage_url, spec.resources.heartbeat_s if heartbeat else None)
    study = optuna.create_study(
        study_name=spec.name,
        storage=storage,
        direction=spec.direction,
        sampler=make_sampler(spec),
        pruner=make_pruner(spec),
        load_if_exists=True,
    )
    if study.direction.name.lower() != spec.direction:
        raise BadInputError(
            f"study {spec.name!r} in this storage is to "
            f"{study.direction.name.lower()}, the spec says {spec.direction}"
        )
    study.set_user_attr("metric", spec.metric)
    study.set_user_attr("task_kind", spec.task.kind)
    study.set_user_attr("model", spec.model.path)
    return study


def load_existing_study(spec: StudySpec, storage_url: str) -> optuna.Study:
    """The stored study, for read-only commands; it must exist."""
    check_storage(storage_url)
    path = sqlite_path(storage_url)
    if path is not None and not path.exists():
        raise BadInputError(
            f"no study named {spec.name!r}: {path} does not exist yet (run the study first)"
        )
    storage = open_storage(storage_url, heartbeat_s=None)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if spec.name not in names:
        raise BadInputError(f"no study named {spec.name!r} in this storage; it has {names}")
    return optuna.load_study(study_name=spec.name, storage=storage)


def count_finished(study: optuna.Study) -> int:
    """Finished search trials: what the budget counts (finalize reruns do not)."""
    return len(search_trials(study, FINISHED_STATES))
