"""A validated spec -> loaded model and data, sampler, pruner, and the Optuna study.

``prepare`` does every check that needs the model or the data, and ``check_storage`` checks
the storage URL, all before ``open_study`` writes anything: a refused study leaves the
storage exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial

from reftsearch.data.batches import SplitData, encode, with_response
from reftsearch.data.splits import TaskData, load_task_data
from reftsearch.engine.activation_cache import PrefixCache
from reftsearch.engine.frozen_store import FrozenStore
from reftsearch.engine.threads import use_threads, worker_threads
from reftsearch.errors import BadInputError, SpecError, TrialFailed
from reftsearch.methods.adapter import AdapterConfig
from reftsearch.methods.full.memory import check_fits
from reftsearch.methods.lora.module import check_targets
from reftsearch.methods.reft.config import ReftConfig
from reftsearch.methods.reft.constraints import Limits, check_space, limits_of
from reftsearch.models.base import BaseModel, load_base_model, resolve_device
from reftsearch.models.sources import ModelLoadError, cache_dir, shape_of
from reftsearch.search.fidelity import rung_count
from reftsearch.search.fit import check_lengths
from reftsearch.search.kept_weights import WEIGHTS_DIR, weights_dir
from reftsearch.search.majority_baseline import keep_majority
from reftsearch.search.pruners import LeadersKept, WarmStartsKept
from reftsearch.search.record import TrialRecord, is_search_trial, search_trials, store
from reftsearch.search.storage import load_named_study, open_storage
from reftsearch.spec.space import (
    Choice,
    Dimension,
    IntRange,
    grid,
    largest,
    lowest_layers,
    searched,
)
from reftsearch.spec.study_file import PrunerSpec, StudySpec

NO_GRID_POINT = -1  # the grid_id of a trial that gave its point back
LABELS_ATTR = "label_names"  # a classification study's classes: class id i is the i-th
ROWS_ATTR = "rows_sha256"  # a digest of each search split's rows: {"train": ..., "dev": ...}
INTERRUPTED = "interrupted"  # the fail_reason of a trial stopped by Ctrl-C or SIGTERM
FROZEN_STORE_ENV = "REFTSEARCH_FROZEN_STORE"  # the frozen store's folder unless the spec says

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
    left_out: int = 0  # train rows without a response token once truncated (generation)

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
        store = None
        if resources.store_mb > 0:
            default = os.environ.get(FROZEN_STORE_ENV) or cache_dir() / "frozen"
            folder = Path(resources.store_dir or default).expanduser()
            store = FrozenStore(folder, resources.store_mb)
        return PrefixCache(resources.cache_mb, expected, resources.spill_mb, spill_dir, store)

    def cache_for(self, config: AdapterConfig) -> PrefixCache | None:
        """The cache a trial of ``config`` replays: none for LoRA, which changes every block
        it is in."""
        return self.cache if isinstance(config, ReftConfig) else None


def prepare(spec: StudySpec, device: str | None = None, dtype: str | None = None) -> PreparedStudy:
    """Load data and model once, and check the space against them. The model goes to
    ``device``, by default the spec's ``model.device``, in ``dtype`` (default
    ``model.dtype``)."""
    device = spec_device(spec) if device is None else device
    use_threads(worker_threads(spec.resources))  # a Ray worker's share: in its environment
    data = load_task_data(spec.task, spec.seed)
    base = _load_model(spec, data, device, dtype or spec.model.dtype)
    encoded = encode(data.train, base.tokenizer, spec.task)
    train = with_response(encoded)
    if not train:
        raise SpecError(
            "task.max_length",
            f"every train prompt fills its {spec.task.max_length} tokens: no response token "
            "is left to learn from; raise it",
        )
    split = SplitData(
        train=train,
        dev=encode(data.dev, base.tokenizer, spec.task),
        kind=spec.task.kind,
        metric=spec.metric,
        max_new_tokens=spec.task.max_new_tokens,
    )
    prepared = PreparedStudy(spec, base, data, split, left_out=len(encoded) - len(train))
    check_lengths(spec.task, shape_of(base.model.config.to_dict()).max_positions)
    if spec.method == "reft":
        check_space(spec.space, prepared.limits)
    elif spec.method == "full":
        tokens = max(len(e.input_ids) for e in split.train)
        check_fits(base, largest(spec.space["batch_size"]), tokens, spec.resources.memory_mb)
    else:
        check_targets(spec.space, base, "space.target_modules")
    return prepared


def with_model_on(prepared: PreparedStudy, device: str, dtype: str) -> PreparedStudy:
    """``prepared`` with its model loaded again, on ``device`` in ``dtype``: a Ray run's driver
    dropped its weights during the search, a 16-bit search's reruns train in float32. The
    data stays as loaded and tokenized (its tokens do not depend on either)."""
    return replace(prepared, base=_load_model(prepared.spec, prepared.data, device, dtype))


def _load_model(spec: StudySpec, data: TaskData, device: str, dtype: str) -> BaseModel:
    head = "classification" if spec.task.kind == "classification" else "causal_lm"
    try:
        base = load_base_model(
            spec.model.path,
            head,
            num_labels=max(data.num_labels, 2),
            dtype=dtype,
            device=device,
        )
    except ModelLoadError as err:
        raise SpecError("model.path", str(err)) from None
    if data.label_names:  # so save_pretrained and HF pipelines say "Sports", not LABEL_2
        base.model.config.id2label = dict(enumerate(data.label_names))
        base.model.config.label2id = {name: i for i, name in enumerate(data.label_names)}
    return base


def keep_task_data(study: optuna.Study, data: TaskData) -> None:
    """Store what the study's trials train and are scored on: its classes (classification)
    and a digest of each split's rows. A resumed study must find the same: class ids would
    change meaning, and trials scored on other dev rows (another file, a carve of other
    rows, another max_dev_examples) were ranked beside the first ones as if comparable."""
    _keep_label_names(study, data.label_names)
    keep_majority(study, data)
    digests = {"train": _rows_digest(data.train), "dev": _rows_digest(data.dev)}
    stored = study.user_attrs.get(ROWS_ATTR)
    if stored is None:  # a new study, or one from before digests were kept
        study.set_user_attr(ROWS_ATTR, digests)
        return
    changed = [split for split, digest in digests.items() if stored.get(split) != digest]
    if changed:
        raise BadInputError(
            f"task.data: the {' and '.join(changed)} rows differ from those study "
            f"{study.study_name!r} was searched on; its trials' scores belong to those: "
            "restore them to resume it, or run the new data as a study of another name "
            "(--set name=NEW)"
        )


def _rows_digest(rows: list[dict]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()


def _keep_label_names(study: optuna.Study, label_names: list[str] | None) -> None:
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


def make_sampler(spec: StudySpec) -> SeededByFirstTrial:
    """The spec's sampler, seeded by the first trial this process asks (SeededByFirstTrial)."""
    seed = spec.sampler.seed if spec.sampler.seed is not None else spec.seed
    return SeededByFirstTrial(lambda seed: SAMPLERS[spec.sampler.type](spec, seed), seed)


class SeededByFirstTrial(optuna.samplers.BaseSampler):
    """A sampler seeded ``seed + n``, ``n`` the number of the first trial this process
    samples (enqueued trials, warm starts or retries, come with their config).

    Trial numbers are unique across processes: two runs or workers on one study get two
    seeds, where one seed each drew the very same configs (a budget of 4 trained 2). A lone
    run gets the seeds it always got: a new study's first trial is trial 0 (the spec's
    seed), and a resumed study's comes after those stored, so it does not draw its first
    configs again."""

    def __init__(self, build: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self._build = build
        self._seed = seed
        self.sampler = build(seed)  # the one that samples (GridSampler.is_exhausted)
        self._seeded = False
        self._lock = threading.Lock()  # packed trials ask from several threads

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        with self._lock:
            if not self._seeded and "fixed_params" not in trial.system_attrs:
                self.sampler = self._build(self._seed + trial.number)
                self._seeded = True
        self.sampler.before_trial(study, trial)

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self.sampler.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self.sampler.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, name: str, distribution: BaseDistribution
    ) -> Any:
        return self.sampler.sample_independent(study, trial, name, distribution)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: optuna.trial.TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self.sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()


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
        return WarmStartsKept(optuna.pruners.WilcoxonPruner(p_threshold=p.p_threshold))
    return WarmStartsKept(LeadersKept(_rung_pruner(p, max_epochs)))


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
    """Create the study, or load it if it exists (resume): then the spec must search the
    space its trials were drawn from."""
    storage = open_storage(storage_url, spec.resources.heartbeat_s if heartbeat else None)
    study = optuna.create_study(
        study_name=spec.name,
        storage=storage,
        directions=list(spec.directions),
        sampler=make_sampler(spec),
        pruner=make_pruner(spec),
        load_if_exists=True,
    )
    stored = tuple(d.name.lower() for d in study.directions)
    if stored != spec.directions:
        raise BadInputError(
            f"study {spec.name!r} in this storage is to {' and '.join(stored)} "
            f"({len(stored)} objectives), the spec says {' and '.join(spec.directions)}"
        )
    check_same_space(spec, study.get_trials(deepcopy=False))
    check_same_setup(spec, study)
    for attr, (_, value) in _setup(spec).items():
        study.set_user_attr(attr, value)
    # the dashboard's axes say "dev accuracy" / "trainable params", not "Objective 0"
    names = {"score": f"dev {spec.metric}", "n_params": "trainable params"}
    study.set_metric_names([names[o] for o in spec.objectives])
    if WEIGHTS_DIR not in study.user_attrs:  # fixed at creation: trials already point there
        study.set_user_attr(WEIGHTS_DIR, str(weights_dir(spec, storage_url)))
    return study


def check_same_setup(spec: StudySpec, study: optuna.Study) -> None:
    """Refuse a spec whose metric, task kind, model or method differ from those ``study`` was
    searched with: its stored scores would be read as the new metric's, a new trial of a
    config already tried would copy the old model's result, and a LoRA spec would add LoRA
    trials to a ReFT study (a copied study file whose name was not changed). A model
    directory that moved (the same name elsewhere, as when a project is cloned again) is the
    same model."""
    stored = study.user_attrs
    for attr, (key, now) in _setup(spec).items():
        then = stored.get(attr)
        if then is None or then == now or (key == "model" and _moved(then, now)):
            continue
        raise BadInputError(
            f"{key}: study {spec.name!r} was searched with {then!r}, the spec now says {now!r}; "
            f"its trials' scores and weights belong to the first: keep it to resume or read "
            f"this study, or start a new one (--set name=NEW)"
        )


def _setup(spec: StudySpec) -> dict[str, tuple[str, str]]:
    """What a study is searched with, as it stores it: user attribute -> (spec key, value)."""
    return {
        "metric": ("metric", spec.metric),
        "task_kind": ("task.kind", spec.task.kind),
        "model": ("model", spec.model.path),
        "method": ("method", spec.method),
    }


def load_study_of(spec: StudySpec, storage_url: str) -> optuna.Study:
    """The stored study ``spec`` names, which must be the one it describes (same metric, task
    kind, model and method): what export, predict and best rebuild from the spec must be what
    ran."""
    study = load_named_study(spec.name, storage_url)
    check_same_setup(spec, study)
    return study


def _moved(then: str, now: str) -> bool:
    """Whether two model paths name one model directory in two places."""
    return then.startswith("/") and now.startswith("/") and Path(then).name == Path(now).name


def check_same_space(spec: StudySpec, trials: Sequence[optuna.trial.FrozenTrial]) -> None:
    """Refuse a spec whose space Optuna cannot resume ``trials`` in: a list's values changed
    (``space.rank: [1, 2, 4]`` widened, other ``space.layers``), or a list became a range.
    Optuna fails every new trial of such a study; this says so before any is asked."""
    wanted = _distributions(spec.space)
    for trial in trials:
        for name, old in trial.distributions.items():
            new = wanted.get(name)
            if new is None:
                continue  # no longer searched: fixed values are not Optuna parameters
            try:
                optuna.distributions.check_distribution_compatibility(old, new)
            except ValueError:
                raise BadInputError(
                    f"space.{name}: study {spec.name!r} searched {_describe(old)}, the spec "
                    f"now says {_describe(new)}, and a study cannot change a parameter's "
                    f"values; keep them to resume, or start a new study (--set name=NEW) and "
                    f"give it this one's best configs with warm_start: [{{study: {spec.name}}}]"
                ) from None


def _distributions(
    space: dict[str, Dimension],
) -> dict[str, optuna.distributions.BaseDistribution]:
    """What ``reftsearch.spec.space.sample`` suggests for each searched parameter."""
    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for name, dim in searched(space).items():
        if isinstance(dim, Choice):
            out[name] = optuna.distributions.CategoricalDistribution(dim.choices)
        elif isinstance(dim, IntRange):
            out[name] = optuna.distributions.IntDistribution(
                dim.low, dim.high, log=dim.log, step=dim.step
            )
        else:
            out[name] = optuna.distributions.FloatDistribution(dim.low, dim.high, log=dim.log)
    return out


def _describe(distribution: optuna.distributions.BaseDistribution) -> str:
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return str(list(distribution.choices))
    assert isinstance(
        distribution, optuna.distributions.IntDistribution | optuna.distributions.FloatDistribution
    )
    log = ", log" if distribution.log else ""
    return f"a range {distribution.low} to {distribution.high}{log}"


def budget_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The finished search trials that the budget counts. Finalize reruns do not count, nor
    does a trial whose worker died and that was retried (its retry counts instead), one
    interrupted (its config runs again), or one whose config cannot train here (pruned in
    milliseconds with its ``invalid_reason``: ``n_trials`` buys trained configs)."""
    trials = search_trials(study)
    skipped = _not_counted(trials)
    return [t for t in trials if t.state in FINISHED_STATES and t.number not in skipped]


def asked_past_budget(study: optuna.Study, trial: optuna.Trial, n_trials: int) -> bool:
    """Whether ``trial`` is a search trial asked when ``n_trials`` search trials asked before
    it counted toward the budget already (finished, running or waiting to run): workers that
    each saw the last trial missing ask one each at once, and only the first one asked is to
    run. A finalize rerun (which a worker may pop as the search ends) is never past it."""
    if not is_search_trial(trial):
        return False
    trials = search_trials(study)
    skipped = _not_counted(trials)
    return sum(t.number < trial.number and t.number not in skipped for t in trials) >= n_trials


def refuse_duplicate(trial: optuna.Trial) -> None:
    """End ``trial`` unrun (FAIL, counted nowhere: ``duplicate_of``) when it is a second copy
    of an enqueued run an earlier trial runs or ran: the same warm start, or the same
    config's rerun with the same seed. Two processes that start a study at once both enqueue
    its warm starts, and two that end its search at once both enqueue its reruns; the
    earliest copy runs. A failed copy does not count (its run was enqueued again)."""
    record = TrialRecord.of(trial)
    key = _enqueued_run(record)
    if key is None:
        return
    alive = [state for state in optuna.trial.TrialState if state != optuna.trial.TrialState.FAIL]
    first = min(
        (
            t.number
            for t in trial.study.get_trials(deepcopy=False, states=alive)
            if t.number < trial.number and _enqueued_run(TrialRecord.of(t)) == key
        ),
        default=None,
    )
    if first is None:
        return
    store(trial, duplicate_of=first)
    give_back_grid_point(trial)
    raise TrialFailed(f"trial {trial.number} {TrialRecord.of(trial).unrun}")


def _enqueued_run(record: TrialRecord) -> tuple | None:
    """What names an enqueued run: its warm start, or the trial and seed it reruns."""
    if record.finalize_of is not None:
        return ("rerun", record.finalize_of, record.seed)
    if record.warm_start is not None:
        return ("warm start", record.warm_start)
    return None


def give_back(trial: optuna.Trial, **record: Any) -> None:
    """Record why ``trial`` ends unrun or unfinished (``record``: its ``TrialRecord`` fields,
    e.g. ``fail_reason="interrupted"``) and give its config back: its grid point stays
    unvisited, and its config, when it was enqueued (a warm start) or already drawn, is
    enqueued again, so a later trial of this or a later run trains it. A finalize rerun is not
    enqueued here: ``enqueue_finalize`` enqueues what is missing."""
    frozen = trial.study._storage.get_trial(trial._trial_id)
    store(trial, **record)
    origin = TrialRecord.of(frozen)
    if not origin.is_search_trial:
        return
    give_back_grid_point(trial)
    params = {**frozen.system_attrs.get("fixed_params", {}), **frozen.params}
    if params:  # a trial asked but not yet drawn has nothing to keep
        again = TrialRecord(warm_start=origin.warm_start)
        trial.study.enqueue_trial(params, user_attrs=again.to_user_attrs())


def give_back_grid_point(trial: optuna.Trial) -> None:
    """Let ``trial``, which is about to fail unrun, leave its grid point unvisited.

    GridSampler assigns a point as a trial starts and counts every finished trial's point as
    visited, a failed one too: a trial refused past the budget would take its point with it,
    and no later run (with a raised budget) would ever train that config. Its ``grid_id`` is
    rewritten to one no grid holds."""
    storage, trial_id = trial.study._storage, trial._trial_id
    if "grid_id" in storage.get_trial_system_attrs(trial_id):
        storage.set_trial_system_attr(trial_id, "grid_id", NO_GRID_POINT)


def _not_counted(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    """The trials whose worker died and that were retried (by a later trial), those
    interrupted, whose config was enqueued again, and those refused as invalid configs."""
    retried = {number for t in trials for number in t.system_attrs.get("retry_history", [])}
    records = {t.number: TrialRecord.of(t) for t in trials}
    interrupted = {n for n, r in records.items() if r.fail_reason == INTERRUPTED}
    invalid = {n for n, r in records.items() if r.invalid_reason is not None}
    return retried | interrupted | invalid


def count_finished(study: optuna.Study) -> int:
    return len(budget_trials(study))
