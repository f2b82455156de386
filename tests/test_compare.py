"""``reftsearch compare`` with three studies: one budget, the pick of each rerun with the same
seeds and tested once per seed, its costs, and a table and plots."""

import csv
import statistics

import optuna
import pytest
from conftest import tiny_study

from reftsearch.cli import main
from reftsearch.run.compare import pareto_front
from reftsearch.search.record import TrialRecord
from reftsearch.spec.study_file import load_spec

BUDGET = {"n_trials": 2, "max_epochs": 1}
FINALIZE = {"top_k": 1, "seeds": [7]}


def arm(data, method: str, dtype: str = "float32") -> dict:
    """One arm of a comparison, in ``dtype`` (``auto`` would differ between machines)."""
    raw = tiny_study(
        data, name=method, method=method, budget=BUDGET, sampler="grid", finalize=FINALIZE
    )
    raw["model"] = {"path": "tiny:llama", "dtype": dtype}
    raw["space"] = {
        "reft": {"rank": [1, 2], "suffix": 1, "lr": 5e-3},
        "lora": {"rank": [1, 2], "target_modules": "default", "lr": 5e-3},
        "full": {"lr": [1e-3, 3e-3]},
    }[method]
    raw["space"]["batch_size"] = 16
    return raw


def test_compare_three_methods_on_one_budget(write_study, easy_task_files, capsys):
    paths = [write_study(arm(easy_task_files, m), f"{m}.yaml") for m in ("reft", "lora", "full")]
    assert main(["compare", *map(str, paths)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split()[:4] == ["study", "method", "trials", "best"]
    assert [line.split()[1] for line in lines[1:4]] == ["reft", "lora", "full"]
    out = paths[0].with_name("compare-reft-vs-lora-vs-full.csv")
    assert lines[-1] == f"wrote {out} and {out.with_suffix('.png').name}"
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["reft", "lora", "full"]
    for row, path in zip(rows, paths, strict=True):
        study = optuna.load_study(study_name=row["study"], storage=load_spec(path).storage)
        best = max((t for t in study.trials if t.number < 2), key=lambda t: t.value)
        assert int(row["best trial"]) == best.number
        # the pick rerun with seed 7, both scored on test once: mean and std over the two
        (rerun,) = [t for t in study.trials if TrialRecord.of(t).finalize_of == best.number]
        assert TrialRecord.of(rerun).seed == 7 and rerun.state.name == "COMPLETE"
        scores = [study.user_attrs[f"test_score_trial_{t.number}"] for t in (best, rerun)]
        assert float(row["test accuracy"]) == pytest.approx(statistics.fmean(scores))
        assert float(row["test accuracy std"]) == pytest.approx(statistics.stdev(scores))
        assert row["seeds"] == "2"
        record = TrialRecord.of(best)
        assert int(row["trainable params"]) == record.n_params
        share = 100 * record.n_params / record.base_params
        assert float(row["% of model"]) == pytest.approx(share)
        assert float(row["export (MB)"]) == pytest.approx(record.export_bytes / 2**20)
        assert float(row["s/epoch"]) > 0 and float(row["peak memory (MB)"]) > 0
    # full fine-tuning trains every weight but the head's: nearly all of the model
    assert float(rows[2]["% of model"]) > 90 > float(rows[1]["% of model"])
    assert " +- " in lines[1]
    assert captured.err.count("once on 48 test examples") == 6


def test_a_16_bit_search_is_compared_on_its_float32_reruns(write_study, easy_task_files, capsys):
    """After a bfloat16-mixed search the pick is tested as finalize reran it in float32, with
    its own seed and with the finalize seed: never the 16-bit run itself."""
    arms = [arm(easy_task_files, m, dtype="bfloat16-mixed") for m in ("reft", "lora")]
    paths = [write_study(raw, f"{raw['name']}.yaml") for raw in arms]
    assert main(["compare", *map(str, paths)]) == 0
    for path in paths:
        spec = load_spec(path)
        study = optuna.load_study(study_name=spec.name, storage=spec.storage)
        best = max((t for t in study.trials if t.number < 2), key=lambda t: t.value)
        reruns = [t for t in study.trials if TrialRecord.of(t).finalize_of == best.number]
        own_seed = TrialRecord.of(best).config["seed"]
        assert sorted(TrialRecord.of(t).seed for t in reruns) == sorted([own_seed, 7])
        assert {TrialRecord.of(t).dtype for t in reruns} == {"float32"}
        tested = {int(k.rsplit("_", 1)[1]) for k in study.user_attrs if k.startswith("test_score")}
        assert tested == {t.number for t in reruns}
    assert capsys.readouterr().err.count("once on 48 test examples") == 4


def test_compare_refuses_studies_on_other_budgets_naming_what_differs(
    write_study, easy_task_files, capsys
):
    a = write_study(arm(easy_task_files, "reft"), "a.yaml")
    other = arm(easy_task_files, "lora")
    b = write_study({**other, "budget": {"n_trials": 2, "max_epochs": 2}}, "b.yaml")
    c = write_study(arm(easy_task_files, "full"), "c.yaml")
    assert main(["compare", str(a), str(c), str(b)]) == 2
    assert "every study must use the same budget.max_epochs; 'reft' has 1, 'lora' has 2" in (
        capsys.readouterr().err
    )
    d = write_study({**other, "finalize": {"top_k": 1, "seeds": [8]}}, "d.yaml")
    assert main(["compare", str(a), str(d)]) == 2
    assert "same finalize.seeds; 'reft' has (7,), 'lora' has (8,)" in capsys.readouterr().err
    assert main(["compare", str(a)]) == 2
    assert "give two or more study files" in capsys.readouterr().err


def test_compare_refuses_what_a_later_arm_cannot_do_before_the_first_arm_runs(
    write_study, easy_task_files, tmp_path, capsys
):
    """A missing test split, a bad storage or the same study twice were found only when
    their arm came, after the arms before it had run; a task that differed in one setting
    printed both tasks whole."""
    a = write_study(arm(easy_task_files, "reft"), "a.yaml")
    lora = arm(easy_task_files, "lora")
    cases = {
        "task.max_length; 'reft' has 32, 'lora' has 64": {
            **lora,
            "task": {**lora["task"], "max_length": 64},
        },
        "task.data.test: the studies have no test split": {
            **lora,
            "task": {**lora["task"], "data": {**easy_task_files, "test": None}},
        },
        f"directory {tmp_path / 'no'} does not exist": {
            **lora,
            "storage": f"sqlite:///{tmp_path / 'no' / 'x.db'}",
        },
        "two of the study files name the same study": {**lora, "name": "reft"},
    }
    for said, other in cases.items():
        first = a
        if "test split" in said:
            first = write_study({**arm(easy_task_files, "reft"), "task": other["task"]}, "a2.yaml")
        assert main(["compare", str(first), str(write_study(other, "b.yaml"))]) == 2
        assert said in capsys.readouterr().err
        assert not list(tmp_path.glob("*.db")), said  # no arm ran


def test_the_pareto_front_keeps_what_nothing_beats_on_both():
    costs, scores = [1, 2, 3, 4, 2], [0.5, 0.7, 0.6, 0.9, 0.7]
    # 2 (cost 3) is beaten by 1 (cheaper, better); 1 and 4 tie, both kept
    assert pareto_front(costs, scores) == [0, 1, 4, 3]
