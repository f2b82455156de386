"""A best trial that does not beat always answering the dev split's most frequent label by
more than noise is flagged: in `best`, at the end of `run`, and in the report."""

import json
import random

import optuna
import pytest
from conftest import SHARED_DATA, tiny_study
from test_real_tasks import offline, smollm2_cache, study_file  # noqa: F401 (a fixture)

from reftsearch.cli import main
from reftsearch.data.splits import TaskData
from reftsearch.search.majority_baseline import MAJORITY_ATTR, keep_majority, majority_note
from reftsearch.search.record import TrialRecord, pack_hits

WARNING = "does not beat always answering"


def study_with_majority(labels: list[int]) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    rows = [{"text": f"row {i}", "label": label} for i, label in enumerate(labels)]
    keep_majority(study, TaskData(train=rows, dev=rows, label_names=["neg", "pos"]))
    return study


def add_trial(study: optuna.Study, hits: list[bool] | None, value: float) -> None:
    packed = None if hits is None else pack_hits(hits)
    record = TrialRecord(config={"method": "full", "seed": 42}, dev_hits=packed)
    study.add_trial(
        optuna.trial.create_trial(
            value=value,
            params={"lr": 0.01},
            distributions={"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1)},
            user_attrs=record.to_user_attrs(),
        )
    )


def test_the_majority_label_its_share_and_rows_are_kept():
    study = study_with_majority([1, 0, 1, 1])
    assert study.user_attrs[MAJORITY_ATTR] == {
        "label": "pos",
        "share": 0.75,
        "hits": pack_hits([True, False, True, True]),
    }
    generation = optuna.create_study()
    keep_majority(generation, TaskData(train=[], dev=[{"text": "q"}], label_names=None))
    assert MAJORITY_ATTR not in generation.user_attrs


def test_a_lead_within_two_standard_errors_is_flagged_and_a_real_one_is_not():
    rng = random.Random(0)
    labels = [int(rng.random() < 0.6) for _ in range(200)]
    study = study_with_majority(labels)
    majority = [label == 1 for label in labels]
    # a classifier at chance: wrong on 30 majority rows, right on 36 minority ones, +3
    # points on 200 rows where 66 differ from the majority's answer
    minority = [i for i, label in enumerate(labels) if label == 0]
    flipped = set(minority[:36]) | set([i for i, label in enumerate(labels) if label][:30])
    lucky = [hit != (i in flipped) for i, hit in enumerate(majority)]
    add_trial(study, lucky, sum(lucky) / 200)
    note = majority_note(study, study.trials[0])
    assert note is not None and WARNING in note and "'pos'" in note
    assert "+3.0 points" in note
    # the same +3 points from 6 rows the majority misses and no others: a sign test's 6 of 6
    # (p = 0.016), beyond two standard errors of the paired difference
    sure = [hit or i in minority[:6] for i, hit in enumerate(majority)]
    add_trial(study, sure, sum(sure) / 200)
    assert majority_note(study, study.trials[1]) is None
    learned = [True] * 180 + [False] * 20  # 90% against the majority's ~60%
    add_trial(study, learned, 0.9)
    assert majority_note(study, study.trials[2]) is None
    add_trial(study, None, 0.55)  # f1: no row hits recorded, nothing to compare
    assert majority_note(study, study.trials[3]) is None


def chance_task(tmp_path) -> dict:
    """Labels drawn independently of the text: no model can learn them."""
    rng = random.Random(1)
    files = {}
    for split, n in (("train", 64), ("dev", 48)):
        lines = ["text,label"] + [
            f"{' '.join(rng.choices(['red', 'blue', 'gold'], k=4))},{rng.randint(0, 1)}"
            for _ in range(n)
        ]
        (tmp_path / f"{split}.csv").write_text("\n".join(lines) + "\n")
        files[split] = str(tmp_path / f"{split}.csv")
    return files


def test_best_run_and_the_report_warn_on_a_task_at_chance(write_study, tmp_path, capsys):
    path = write_study(tiny_study(chance_task(tmp_path), budget={"n_trials": 2, "max_epochs": 1}))
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    assert main(["run", str(path), "--storage", storage]) == 0
    assert WARNING in capsys.readouterr().out  # the run's last lines: its best trial
    assert main(["best", str(path), "--storage", storage, "--json", "--top", "1"]) == 0
    assert WARNING in json.loads(capsys.readouterr().out)["not_learned"]
    report = tmp_path / "report"
    assert main(["report", str(path), "--storage", storage, "--out", str(report)]) == 0
    assert WARNING in (report / "index.html").read_text()


def test_a_task_that_learned_is_not_flagged(write_study, easy_task_files, tmp_path, capsys):
    raw = tiny_study(easy_task_files, budget={"n_trials": 1, "max_epochs": 3})
    raw["space"].update(rank=2, lr=0.01, suffix=0)
    path = write_study(raw)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    assert main(["run", str(path), "--storage", storage]) == 0
    out = capsys.readouterr().out
    trial = optuna.load_study(study_name="t", storage=storage).best_trial
    assert trial.value > 0.8, out
    assert WARNING not in out


needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent")


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize(
    "model, train_rows, epochs, learns",
    [("embedded:minilm", 300, 3, True), ("embedded:smollm2", 8, 1, False)],
)
def test_the_real_models_on_sst2(model, train_rows, epochs, learns, tmp_path, capsys, request):
    """MiniLM learns SST-2 from 300 rows in 3 epochs (the recipe at rank 4, lr 1e-2) and is
    not flagged; SmolLM2 on 8 rows for one epoch has learned nothing measurable and is."""
    if model.endswith("smollm2"):
        request.getfixturevalue("smollm2_cache")
    recipe = {"intervention": "loreft", "layers": "all", "prefix": 1, "suffix": 0, "rank": 4}
    overrides = [
        *offline("sst2-minilm"),
        f"model={model}",
        f"task.max_train_examples={train_rows}",
        "task.max_dev_examples=200",
        f"budget.max_epochs={epochs}",
        f"space={json.dumps({**recipe, 'lr': 0.01, 'batch_size': 32})}",
        "warm_start=null",
        "finalize=null",
        "pruner=none",
    ]
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    argv = ["run", str(study_file("sst2-minilm")), "--storage", storage, "--n-trials", "1"]
    assert main([*argv, *[f"--set={item}" for item in overrides]]) == 0
    out = capsys.readouterr().out
    assert (WARNING not in out) == learns, out
