"""The one evaluation on the test split, of the config the search picked.

The search never sees test data. Here the picked trial's config is retrained with its seed
and scored on test once; the score is stored on the study, so asking again reads it back
instead of touching the test split a second time.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna

from reftsearch.adapters import Adapter, AdapterConfig, adapter_config, build_adapter
from reftsearch.data import encode, load_test_rows
from reftsearch.spec import StudySpec
from reftsearch.study import PreparedStudy, prepare
from reftsearch.train import TrainConfig, evaluate, train_trial

TRAIN_FIELDS = ("lr", "epochs", "batch_size", "warmup_ratio", "weight_decay", "seed")


def configs_of(trial: optuna.trial.FrozenTrial) -> tuple[AdapterConfig, TrainConfig]:
    """The resolved configs a trial recorded when it ran."""
    config = trial.user_attrs["config"]
    return adapter_config(config), TrainConfig(**{k: config[k] for k in TRAIN_FIELDS})


def retrain(prepared: PreparedStudy, trial: optuna.trial.FrozenTrial) -> Adapter:
    """Train a recorded trial's config again, with the same seed, on the same data."""
    reft_config, train_config = configs_of(trial)
    reft = build_adapter(reft_config, prepared.base, train_config.seed)
    train_trial(prepared.base, reft, prepared.split, train_config)
    return reft


def test_score(
    spec: StudySpec,
    study: optuna.Study,
    trial: optuna.trial.FrozenTrial,
    log: Callable[[str], None] = print,
    trained: tuple[PreparedStudy, Adapter] | None = None,
) -> float:
    """The trial's test score, evaluated at most once per study.

    ``trained``: the loaded study and the trial's trained interventions (with its head in the
    model), e.g. from export; without it the config is retrained with its seed.
    """
    key = f"test_score_trial_{trial.number}"
    if key in study.user_attrs:
        log(f"test score of trial {trial.number} was evaluated before; not touching test again")
        return study.user_attrs[key]
    prepared, reft = trained if trained is not None else (prepare(spec), None)
    test = encode(
        load_test_rows(spec.task, prepared.data.label_names), prepared.base.tokenizer, spec.task
    )
    if reft is None:
        log(f"retraining trial {trial.number} to score it on test")
        reft = retrain(prepared, trial)
    log(f"scoring trial {trial.number} once on {len(test)} test examples")
    with reft.attached(prepared.base.blocks):
        score = evaluate(prepared.base, reft, prepared.split, test)
    study.set_user_attr(key, score)
    return score
