"""The one evaluation on the test split, of the config the search picked.

The search never sees test data. Here the picked trial's config is retrained with its seed
and scored on test once; the score is stored on the study, so asking again reads it back
instead of touching the test split a second time.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna

from reftsearch.data import encode, load_test_rows
from reftsearch.reft import ReftConfig, ReftModule
from reftsearch.spec import StudySpec
from reftsearch.study import PreparedStudy, prepare
from reftsearch.train import TrainConfig, evaluate, train_trial

REFT_FIELDS = ("intervention", "layers", "prefix", "suffix", "tied", "rank", "dropout")
TRAIN_FIELDS = ("lr", "epochs", "batch_size", "warmup_ratio", "weight_decay", "seed")


def configs_of(trial: optuna.trial.FrozenTrial) -> tuple[ReftConfig, TrainConfig]:
    """The resolved configs a trial recorded when it ran."""
    config = trial.user_attrs["config"]
    reft = ReftConfig(
        **{k: config[k] for k in REFT_FIELDS if k != "layers"}, layers=tuple(config["layers"])
    )
    return reft, TrainConfig(**{k: config[k] for k in TRAIN_FIELDS})


def retrain(prepared: PreparedStudy, trial: optuna.trial.FrozenTrial) -> ReftModule:
    """Train a recorded trial's config again, with the same seed, on the same data."""
    reft_config, train_config = configs_of(trial)
    reft = ReftModule(reft_config, prepared.base.hidden_size).to(prepared.base.device)
    train_trial(prepared.base, reft, prepared.split, train_config)
    return reft


def test_score(
    spec: StudySpec,
    study: optuna.Study,
    trial: optuna.trial.FrozenTrial,
    log: Callable[[str], None] = print,
) -> float:
    key = f"test_score_trial_{trial.number}"
    if key in study.user_attrs:
        log(f"test score of trial {trial.number} was evaluated before; not touching test again")
        return study.user_attrs[key]
    prepared = prepare(spec)
    test = encode(
        load_test_rows(spec.task, prepared.data.label_names), prepared.base.tokenizer, spec.task
    )
    log(f"retraining trial {trial.number} and scoring it once on {len(test)} test examples")
    reft = retrain(prepared, trial)
    with reft.attached(prepared.base.blocks):
        score = evaluate(prepared.base, reft, prepared.split, test)
    study.set_user_attr(key, score)
    return score
