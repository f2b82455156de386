import json
from types import SimpleNamespace

import optuna
import pytest
import torch
from conftest import tiny_study

from reftsearch.cli import main
from reftsearch.engine.train import TrainConfig
from reftsearch.methods.adapter import build_adapter
from reftsearch.methods.reft.config import ReftConfig
from reftsearch.run import worker
from reftsearch.run.estimate import (
    TIMED_STEPS,
    EstimateRequest,
    _batch_tokens,
    _step_run,
    estimate_study,
)
from reftsearch.run.worker import Worker
from reftsearch.search.seed_reruns import finalize_runs
from reftsearch.search.study import open_study, prepare
from reftsearch.spec.study_file import load_spec

DEV_EXAMPLE = 10  # the work a dev example counts for, in tokens of a training step


def test_estimate_predicts_the_work_a_trial_then_does(
    write_study, easy_task_files, capsys, monkeypatch
):
    """The estimate times a few training steps and a dev batch, then scales them by a trial's
    steps, epochs and dev examples. Timed on a clock that counts work instead of seconds (a
    training forward: the tokens it computes; a dev example: ``DEV_EXAMPLE`` of them), it
    must predict the work the trial then does: its steps of the same batches and its dev
    passes. (Seconds on a busy machine would measure the machine's load, not the estimate.)"""
    from reftsearch.run import estimate as estimate_module

    raw = tiny_study(easy_task_files, budget={"n_trials": 4, "max_epochs": 2})
    raw["space"].update(rank=2, lr=0.005, suffix=1)  # a single config: estimate vs reality
    study = write_study(raw)
    train, dev, batch_size = 96, 48, 16  # easy_task_files' rows; tiny_study's batches
    clock = [0.0]
    timing = [False]  # within the estimate's own timed steps
    trial_forwards: list[int] = []  # the tokens of each training forward outside them

    def count_work(module, args):
        if not isinstance(module, torch.nn.Embedding):  # the tiny Llama's only one: once a pass
            return
        if torch.is_grad_enabled():
            clock[0] += args[0].numel()
            if not timing[0]:
                trial_forwards.append(args[0].numel())
        else:  # dev scoring (and frozen passes, which the estimate leaves out of its timing)
            clock[0] += len(args[0]) * DEV_EXAMPLE

    def estimate_study(*args, **kwargs):
        timing[0] = True
        try:
            return estimate_module.estimate_study(*args, **kwargs)
        finally:
            timing[0] = False

    monkeypatch.setattr(estimate_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(worker, "estimate_study", estimate_study)  # the one `run` prints
    hook = torch.nn.modules.module.register_module_forward_pre_hook(count_work)
    try:
        assert main(["estimate", str(study), "--json", "--samples", "2"]) == 0
        estimate = json.loads(capsys.readouterr().out)
        trial_forwards.clear()  # the CLI estimate's own steps
        assert main(["run", str(study), "--n-trials", "1"]) == 0
    finally:
        hook.remove()
    out = capsys.readouterr().out
    assert "estimate: " in out and "per trial (median" in out
    for key in ("cheapest", "median", "most_expensive"):
        assert estimate[key]["epoch_s"] > 0 and estimate[key]["trial_s"] > 0
    assert estimate["study_s"] == estimate["median"]["trial_s"] * 4

    spec = load_spec(study)
    (trial,) = optuna.load_study(study_name="t", storage=spec.storage).get_trials()
    epochs = len(trial.intermediate_values)  # one dev pass each
    steps = -(-train // batch_size)
    assert epochs == 2 and len(trial_forwards) == epochs * steps
    # the estimate's steps are the trial's first epoch's batches (same seed); a later epoch
    # draws other batches, whose padding differs a little
    first_epoch = sum(trial_forwards[:steps]) + dev * DEV_EXAMPLE
    assert estimate["median"]["epoch_s"] == pytest.approx(first_epoch, rel=1e-9)
    assert estimate["median"]["trial_s"] == pytest.approx(epochs * first_epoch, rel=1e-9)


def test_estimate_table(write_study, easy_task_files, capsys):
    study = write_study(tiny_study(easy_task_files))
    assert main(["estimate", str(study), "--samples", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].strip() for line in lines[:3]] == [
        "cheapest",
        "median",
        "most expensive",
    ]
    assert lines[-2].startswith("estimate: ")
    assert lines[-1].startswith("score gain per trial: not measured")


def test_estimate_times_the_enqueued_configs_first(write_study, easy_task_files):
    """The next trials run the study's enqueued configs: those are the ones worth timing."""
    raw = tiny_study(easy_task_files)
    raw["space"].update(rank=[1, 2, 3, 4, 5, 6, 7, 8], suffix=[0, 1, 2, 3], lr=[1e-3, 2e-3])
    spec = load_spec(write_study(raw))
    prepared = prepare(spec)
    enqueued = {"rank": 7, "suffix": 3, "lr": 2e-3}
    drawn = estimate_study(prepared, EstimateRequest(1, 1, samples=1))
    assert "r7" not in drawn.median.config.split()  # else the next check could not fail

    timed = estimate_study(prepared, EstimateRequest(1, 1, samples=1), enqueued=[enqueued])
    assert {"r7", "f1+l3", "lr=0.002"} <= set(timed.median.config.split())


def test_a_run_estimates_its_waiting_trials(write_study, easy_task_files, monkeypatch):
    raw = tiny_study(easy_task_files)
    spec = load_spec(write_study(raw))
    study = open_study(spec, spec.storage)
    study.enqueue_trial({"rank": 2, "suffix": 2, "lr": 5e-3})
    timed = []

    def estimate_and_record(*args, **kwargs):
        timed.extend(kwargs["enqueued"])
        return estimate_study(*args, **kwargs)

    monkeypatch.setattr(worker, "estimate_study", estimate_and_record)
    line = Worker(spec, spec.storage).estimate(EstimateRequest(3, 1))
    assert line.startswith("estimate: ") and "per trial" in line
    assert timed == [{"rank": 2, "suffix": 2, "lr": 5e-3}]


def test_estimate_and_run_predict_alike_finalize_included(
    write_study, easy_task_files, monkeypatch, capsys
):
    """``reftsearch estimate`` and the line ``run`` prints are one computation on the same
    inputs: the trials left, the warm starts timed first, and finalize's seed reruns."""
    raw = tiny_study(easy_task_files, budget={"n_trials": 4, "max_epochs": 1})
    raw["space"].update(rank=[1, 2, 4], lr=[1e-3, 3e-3], suffix=[1, 2], layers=["all", "0;1"])
    raw.update(warm_start={"recipes": "paper"}, finalize={"top_k": 2, "seeds": [5, 6, 7]})
    study = write_study(raw)
    asked = []

    def estimate_and_record(prepared, request, enqueued=(), seed=0):
        asked.append((request, list(enqueued)))
        return estimate_module.estimate_study(prepared, request, enqueued, seed)

    from reftsearch.run import driver
    from reftsearch.run import estimate as estimate_module

    monkeypatch.setattr(driver, "estimate_study", estimate_and_record)
    monkeypatch.setattr(worker, "estimate_study", estimate_and_record)
    assert main(["estimate", str(study), "--json"]) == 0
    predicted = json.loads(capsys.readouterr().out)
    assert main(["run", str(study)]) == 0
    (alone, timed_alone), (in_run, timed_in_run) = asked
    assert alone == in_run == EstimateRequest(4, 1, finalize_runs=6)
    assert timed_alone and timed_alone == timed_in_run  # the paper recipes, as run enqueues them
    assert predicted["finalize_runs"] == 6
    assert predicted["finalize_s"] == pytest.approx(6 * predicted["median"]["trial_s"])
    assert predicted["total_s"] == pytest.approx(predicted["study_s"] + predicted["finalize_s"])
    assert "then finalize" in capsys.readouterr().out


def test_a_16_bit_search_reruns_each_top_config_with_its_own_seed_too(
    write_study, easy_task_files, capsys
):
    raw = tiny_study(easy_task_files, finalize={"top_k": 2, "seeds": [5, 6, 7]})
    spec = load_spec(write_study(raw))
    assert finalize_runs(spec) == finalize_runs(spec, "float32") == 6
    assert finalize_runs(spec, "bfloat16-mixed") == 8
    raw["model"] = {"path": "tiny:llama", "dtype": "bfloat16-mixed"}
    assert main(["estimate", str(write_study(raw, "mixed.yaml")), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["finalize_runs"] == 8


def test_a_steps_cost_scales_with_the_tokens_its_batch_computes(write_study, easy_task_files):
    """Length-bucketed batches differ in cost by their tokens: the estimate counts them per
    batch, from each row's first edited token where the cache holds the unedited ones."""
    spec = load_spec(write_study(tiny_study(easy_task_files)))
    prepared = prepare(spec)
    train_config = TrainConfig(lr=1e-3, epochs=1, batch_size=8, seed=0)
    counts = {}
    for prefix, suffix in ((1, 1), (0, 1)):  # full rows; rows from the last prompt token on
        reft_config = ReftConfig("loreft", (1, 2), prefix, suffix, tied=False, rank=1)
        reft = build_adapter(reft_config, prepared.base, seed=0)
        run = _step_run(prepared, reft, train_config, prepared.cache)
        counts[prefix] = _batch_tokens(prepared, run, prepared.cache)
    lengths = [  # both runs' batches: same seed, same train split
        max(len(prepared.split.train[i].input_ids) for i in rows) * len(rows)
        for rows in run.batches_left
    ]
    assert counts[1] == lengths  # full rows: rows x the longest row
    assert len(set(counts[1])) > 1  # batches of different lengths
    assert all(0 < trimmed < full for trimmed, full in zip(counts[0], counts[1], strict=True))


def test_a_batch_larger_than_the_train_split_is_timed_at_the_splits_size(
    write_study, easy_task_files
):
    """Training never makes a batch larger than the split; timing one repeated the split to
    ``batch_size`` rows (a batch_size of 1e18 filled 21 GB before the OOM killer came)."""
    prepared = prepare(load_spec(write_study(tiny_study(easy_task_files))))
    reft = build_adapter(ReftConfig("loreft", (1,), 1, 0, False, 1), prepared.base, seed=0)
    rows = len(prepared.split.train)
    large = TrainConfig(lr=1e-3, epochs=1, batch_size=2 * rows, seed=0)
    run = _step_run(prepared, reft, large, prepared.cache)
    assert run.config.batch_size == rows
    assert len(run.data.train) == rows * (TIMED_STEPS + 2)
