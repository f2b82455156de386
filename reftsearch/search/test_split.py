"""The one evaluation on the test split, of the config the search picked.

The search never sees test data. Here the picked trial's trained weights (kept when it
completed, else its config retrained with its seed) are scored on test once; the score is
stored on the study, so asking again reads it back instead of touching the test split a
second time.
"""

from __future__ import annotations

import optuna

from reftsearch.data.batches import encode
from reftsearch.data.splits import load_test_rows
from reftsearch.engine.scoring import evaluate
from reftsearch.engine.train import TrainConfig, train_trial
from reftsearch.methods.adapter import Adapter, AdapterConfig, adapter_config, build_adapter
from reftsearch.models.base import EXACT_DTYPE
from reftsearch.progress import Log
from reftsearch.search.kept_weights import restore
from reftsearch.search.record import TrialRecord
from reftsearch.search.study import PreparedStudy, prepare
from reftsearch.spec.study_file import StudySpec

TRAIN_FIELDS = ("lr", "epochs", "batch_size", "warmup_ratio", "weight_decay", "seed")


def configs_of(trial: optuna.trial.FrozenTrial) -> tuple[AdapterConfig, TrainConfig]:
    """The resolved configs a trial recorded when it ran."""
    config = TrialRecord.of(trial).config
    return adapter_config(config), TrainConfig(**{k: config[k] for k in TRAIN_FIELDS})


def trained_adapter(
    prepared: PreparedStudy,
    study: optuna.Study,
    trial: optuna.trial.FrozenTrial,
    log: Log,
) -> tuple[Adapter, str]:
    """The trial's trained adapter (its head loaded into the model) and where it came from:
    the weights kept when the trial, or a seed rerun of it with the same seed, completed in
    the model's dtype, else its config retrained with its seed (a 16-bit search's pick is
    exported from float32 training: the weights its 16-bit run kept are not those)."""
    config, train_config = configs_of(trial)
    base = prepared.base
    adapter = build_adapter(config, base, train_config.seed)
    for run in same_runs(study, trial, base.dtype):
        source = restore(study, run, adapter, base.head)
        if source is not None:
            return adapter, f"kept artifact {source} ({base.dtype}, trial {run.number})"
    dtype = TrialRecord.of(trial).dtype
    kept = "were not kept (or are gone or unreadable)"
    why = kept if dtype in (None, base.dtype) else f"are {dtype}"
    log(
        f"trial {trial.number}: its trained weights {why}; retraining its config with seed "
        f"{train_config.seed} in {base.dtype}"
    )
    # through the frozen-activation cache, as the trial trained: the same arithmetic (and
    # steps that skip the frozen blocks)
    cache = prepared.cache_for(config)
    train_trial(base, adapter, prepared.split, train_config, cache=cache)
    return adapter, f"retrained with seed {train_config.seed} in {base.dtype}"


def same_runs(
    study: optuna.Study, trial: optuna.trial.FrozenTrial, dtype: str
) -> list[optuna.trial.FrozenTrial]:
    """``trial`` and its completed seed reruns with its own seed, those trained in ``dtype``
    (or recorded before dtypes were)."""
    seed = TrialRecord.of(trial).config["seed"]
    reruns = [
        other
        for other in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if TrialRecord.of(other).finalize_of == trial.number and TrialRecord.of(other).seed == seed
    ]
    return [run for run in (trial, *reruns) if TrialRecord.of(run).dtype in (None, dtype)]


def test_score(
    spec: StudySpec,
    study: optuna.Study,
    trial: optuna.trial.FrozenTrial,
    log: Log = print,
    trained: tuple[PreparedStudy, Adapter] | None = None,
) -> float:
    """The trial's test score, evaluated at most once per study.

    ``trained``: the loaded study and the trial's trained interventions (with its head in the
    model), e.g. from export; without it they are the trial's kept float32 weights, else its
    config retrained with its seed in float32.
    """
    key = f"test_score_trial_{trial.number}"
    if key in study.user_attrs:
        log(f"test score of trial {trial.number} was evaluated before; not touching test again")
        return study.user_attrs[key]
    if trained is None:
        # in float32, as export ships it and compare tests it: a 16-bit search's pick is
        # scored from its float32 rerun (or retrained in float32)
        prepared = prepare(spec, dtype=EXACT_DTYPE)
        adapter, source = trained_adapter(prepared, study, trial, log)
    else:
        (prepared, adapter), source = trained, "as given"
    test = encode(
        load_test_rows(spec.task, prepared.data.label_names), prepared.base.tokenizer, spec.task
    )
    log(f"scoring trial {trial.number} ({source}) once on {len(test)} test examples")
    with adapter.attached(prepared.base.blocks):
        score = evaluate(prepared.base, adapter, prepared.split, test)
    study.set_user_attr(key, score)
    return score
