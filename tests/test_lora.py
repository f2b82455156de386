"""LoRA (peft) through the same trainer as ReFT, and ``reftsearch compare`` on one budget."""

import csv
import json
import warnings

import optuna
import pytest
import torch
from conftest import tiny_study

from reftsearch.cli import main
from reftsearch.methods.lora.config import LoraConfig
from reftsearch.methods.lora.module import LoraModule
from reftsearch.models.base import load_base_model
from reftsearch.spec.study_file import load_spec


@pytest.fixture(scope="module")
def base():
    return load_base_model("tiny:llama", "classification")


def logits(base, ids):
    with torch.no_grad():
        return base.model(input_ids=ids).logits


def test_lora_changes_the_model_only_while_attached(base):
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    before = logits(base, ids)
    lora = LoraModule(LoraConfig(2, 4.0, 0.0, ("q_proj", "v_proj")), base.blocks)
    # rank x (in + out) for each adapted layer: q_proj 64 -> 64, v_proj 64 -> 32 (grouped
    # query attention) in each of tiny:llama's 4 blocks
    assert lora.num_parameters() == 4 * 2 * ((64 + 64) + (64 + 32))
    # only the adapters are this module's: the frozen weights they wrap stay the model's
    assert {n.split(".")[-3] for n, _ in lora.named_parameters()} == {"A", "B"}
    with torch.no_grad():
        for adapter in lora.adapters.values():
            adapter["B"]["default"].weight.fill_(0.1)  # B starts at zero: make it do something
    with lora.attached(base.blocks):
        assert not torch.allclose(logits(base, ids), before)
    assert torch.equal(logits(base, ids), before)
    assert not any("lora" in type(m).__module__ for m in base.model.modules())


def lora_study(data, **changes) -> dict:
    budget = {"n_trials": 2, "max_epochs": 1}
    raw = tiny_study(data, method="lora", budget=budget, sampler="grid", **changes)
    raw["space"] = {"rank": [1, 2], "target_modules": "default", "lr": 5e-3, "batch_size": 16}
    return raw


def test_best_test_scores_a_lora_trials_kept_weights(write_study, easy_task_files, capsys):
    study = write_study(lora_study(easy_task_files))
    assert main(["run", str(study)]) == 0
    capsys.readouterr()
    assert main(["best", str(study), "--json", "--test"]) == 0
    captured = capsys.readouterr()
    assert "(kept artifact " in captured.err and "retraining" not in captured.err
    assert 0.0 <= json.loads(captured.out)["test_score"] <= 1.0


def test_lora_study_runs_and_records_its_config(write_study, easy_task_files):
    study = write_study(lora_study(easy_task_files))
    assert main(["run", str(study)]) == 0
    spec = load_spec(study)
    trials = optuna.load_study(study_name=spec.name, storage=spec.storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    for t in trials:
        config = t.user_attrs["config"]
        assert config["method"] == "lora" and config["target_modules"] == ["q_proj", "v_proj"]
        assert t.user_attrs["type"] == "lora" and t.user_attrs["rank"] == t.params["rank"]
        assert t.user_attrs["n_params"] == 4 * config["rank"] * ((64 + 64) + (64 + 32))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("space.layers=all", "space.layers: unknown key"),
        ("space.target_modules=nope", "space.target_modules: no module of the model's blocks"),
    ],
)
def test_bad_lora_space_is_bad_input(write_study, easy_task_files, capsys, override, message):
    study = write_study(lora_study(easy_task_files))
    assert main(["run", str(study), "--set", override]) == 2
    assert message in capsys.readouterr().err


def test_compare_gives_both_methods_one_budget_and_tests_each_best_once(
    write_study, easy_task_files, capsys
):
    budget = {"n_trials": 3, "max_epochs": 1}
    reft = tiny_study(easy_task_files, name="reft", budget=budget, sampler="grid")
    reft["space"].update(rank=[1, 2, 4], suffix=1, lr=5e-3)  # 3 distinct configs
    reft_path = write_study(reft, "reft.yaml")
    lora_path = write_study(lora_study(easy_task_files, name="lora"), "lora.yaml")
    # the ReFT study already ran past the budget: only its first 2 trials may count
    assert main(["run", str(reft_path)]) == 0
    capsys.readouterr()

    assert main(["compare", str(reft_path), str(lora_path), "--n-trials", "2"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split()[:4] == ["study", "method", "trials", "best"]
    assert lines[1].split()[:3] == ["reft", "reft", "2"]
    assert lines[2].split()[:3] == ["lora", "lora", "2"]
    out = reft_path.with_name("compare-reft-vs-lora.csv")
    assert lines[-1] == f"wrote {out} and {out.with_suffix('.png').name}"
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["reft", "lora"]
    for row, path in zip(rows, (reft_path, lora_path), strict=True):
        study = optuna.load_study(study_name=row["study"], storage=load_spec(path).storage)
        first_two = [t for t in study.trials if t.number < 2]
        best = max(first_two, key=lambda t: t.value)
        assert int(row["best trial"]) == best.number
        assert float(row["dev accuracy"]) == best.value
        assert 0.0 <= float(row["test accuracy"]) <= 1.0
        assert study.user_attrs[f"test_score_trial_{best.number}"] == float(row["test accuracy"])
        assert int(row["trainable params"]) == best.user_attrs["n_params"]
        assert float(row["epochs trained"]) == 2.0
    assert captured.err.count("once on 48 test examples") == 2


def test_compare_refuses_studies_of_different_tasks(write_study, easy_task_files, capsys):
    a = write_study(tiny_study(easy_task_files, name="a"), "a.yaml")
    b = write_study(lora_study(easy_task_files, name="b", metric="f1"), "b.yaml")
    assert main(["compare", str(a), str(b)]) == 2
    assert "every study must use the same metric" in capsys.readouterr().err


def test_lora_exports_for_peft_and_does_not_warm_start_a_reft_study(
    write_study, easy_task_files, capsys, tmp_path
):
    """A LoRA config is not a ReFT intervention: a warm start from one refuses with exit 2
    and says why. Its export is peft's own (tests/test_methods.py loads DoRA's)."""
    lora_path = write_study(lora_study(easy_task_files, name="lora"), "lora.yaml")
    assert main(["run", str(lora_path)]) == 0
    lora_storage = load_spec(lora_path).storage
    capsys.readouterr()
    with warnings.catch_warnings():  # peft's FutureWarning about transformers was printed
        warnings.simplefilter("error", FutureWarning)
        assert main(["export", str(lora_path), str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is False

    source = {"study": "lora", "storage": lora_storage}
    reft_path = write_study(tiny_study(easy_task_files, name="reft", warm_start=source), "r.yaml")
    assert main(["run", str(reft_path)]) == 2
    err = capsys.readouterr().err
    assert "warm_start.study: trial" in err and "is a lora config" in err

    paper = lora_study(easy_task_files, name="lora-paper", warm_start={"recipes": "paper"})
    assert main(["run", str(write_study(paper, "p.yaml"))]) == 2
    assert "warm_start.recipes: the paper's recipes are ReFT configs" in capsys.readouterr().err
