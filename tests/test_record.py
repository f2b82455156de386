"""The trial record: one typed schema for what a trial stores, read and written only through it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import optuna

from reftsearch.search.record import TrialRecord, is_search_trial, readable_columns, store

PACKAGE = Path(__file__).parents[1] / "reftsearch"
REFT_CONFIG = {
    "method": "reft",
    "intervention": "loreft",
    "layers": [1, 3],
    "positions": "f2+l2",
    "prefix": 2,
    "suffix": 2,
    "tied": True,
    "rank": 4,
    "dropout": 0.0,
    "lr": 1e-3,
    "epochs": 2,
    "batch_size": 8,
    "warmup_ratio": 0.0,
    "weight_decay": 0.0,
    "seed": 42,
}


def every_field_set() -> TrialRecord:
    values = {
        "config": REFT_CONFIG,
        "dev_curve": (0.5, 0.75),
        "positions_capped": 0.25,
        "wall_time_s": 1.5,
        "epochs_trained": 2.0,
    }
    for field in dataclasses.fields(TrialRecord):
        if field.name not in values:
            values[field.name] = 3 if "int" in str(field.type) else f"a {field.name}"
    return TrialRecord(**values)


def test_user_attributes_round_trip_every_field():
    record = every_field_set()
    assert TrialRecord.from_user_attrs(record.to_user_attrs()) == record


def test_the_config_brings_its_dashboard_columns():
    attrs = TrialRecord(config=REFT_CONFIG).to_user_attrs()
    assert attrs == {"config": REFT_CONFIG, **readable_columns(REFT_CONFIG)}
    assert attrs["layers"] == "1;3" and attrs["type"] == "loreft" and attrs["tied"] is True
    assert TrialRecord.from_user_attrs(attrs) == TrialRecord(config=REFT_CONFIG)


def test_unset_fields_are_not_stored():
    assert TrialRecord().to_user_attrs() == {}
    assert TrialRecord(dev_curve=(), seed=0).to_user_attrs() == {"seed": 0}


def test_store_writes_a_live_trial_and_of_reads_it_back():
    study = optuna.create_study()
    trial = study.ask()
    store(trial, config=REFT_CONFIG, worker="host:1")
    store(trial, dev_curve=(0.5,), n_params=10)
    study.tell(trial, 0.5)
    frozen = study.trials[0]
    assert TrialRecord.of(frozen) == TrialRecord(
        config=REFT_CONFIG, worker="host:1", dev_curve=(0.5,), n_params=10
    )


def test_reruns_and_trials_past_the_budget_are_not_search_trials():
    study = optuna.create_study()
    for record in (TrialRecord(), TrialRecord(finalize_of=0, seed=1), TrialRecord(past_budget="x")):
        study.enqueue_trial({}, user_attrs=record.to_user_attrs())
        study.tell(study.ask(), 0.0)
    assert [is_search_trial(t) for t in study.trials] == [True, False, False]


def test_no_module_but_the_record_reads_or_writes_a_trials_user_attributes():
    """Study attributes (``study.user_attrs``) are the study's own; trials go through the
    record. Enqueued trials take ``user_attrs=TrialRecord(...).to_user_attrs()``."""
    allowed = re.compile(
        r"study\.user_attrs|study\.set_user_attr|get_study_user_attrs|user_attrs=|to_user_attrs\(\)"
    )
    offending = [
        f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
        for path in PACKAGE.rglob("*.py")
        if path.name != "record.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "user_attr" in allowed.sub("", line)
    ]
    assert offending == []
