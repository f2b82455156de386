"""ReFT-aware search: warm starts, seed-robust finalize, duplicate and invalid configs."""

import json
from contextlib import nullcontext
from dataclasses import replace

import optuna
import pytest
import torch
from conftest import tiny_study
from test_predict import assert_same_predictions, predictions

from reftsearch.cli import main
from reftsearch.errors import SpecError
from reftsearch.models.base import emulated_on
from reftsearch.results.best_table import BY_MEAN, best_summaries, format_table
from reftsearch.run.lines import ProgressPrinter
from reftsearch.search.ranking import best_trials, seed_summary, top_search_trials, why_it_leads
from reftsearch.search.record import TrialRecord, pack_hits, unpack_hits
from reftsearch.search.study import open_study
from reftsearch.search.warm_start import Recipe, map_onto_space, paper_recipes, study_recipes
from reftsearch.spec.space import Choice, Fixed, FloatRange, IntRange
from reftsearch.spec.study_file import load_spec, parse_spec


def trials_of(path):
    spec = load_spec(path)
    return optuna.load_study(study_name=spec.name, storage=spec.storage).get_trials()


def test_paper_recipes_scale_layer_sets_to_the_model():
    names = [r.name for r in paper_recipes("classification", 12)]
    assert names == ["paper-glue-lr0.003", "paper-glue-lr0.01", "paper-glue-rank4-lr0.01"]
    glue = [r.values for r in paper_recipes("classification", 12)]
    assert [(v["layers"], v["prefix"], v["suffix"]) for v in glue] == [("all", 1, 0)] * 3
    assert [(v["rank"], v["lr"]) for v in glue] == [(1, 3e-3), (1, 1e-2), (4, 1e-2)]
    instruct = paper_recipes("generation", 30)[0].values
    assert instruct["layers"] == "3;8;17;22"  # 3;9;18;24 of 32 layers, on 30
    assert (instruct["prefix"], instruct["suffix"], instruct["rank"]) == (5, 5, 4)


def test_recipes_are_mapped_onto_the_space():
    space = {
        "intervention": Choice(("loreft", "direft")),
        "layers": Choice(("0-3", "1;2")),
        "prefix": IntRange(0, 2),
        "suffix": Fixed(1),
        "rank": Choice((4, 8)),
        "lr": FloatRange(1e-3, 1e-2, True),
        "tied": Choice((True, False)),
    }
    recipe = Recipe(
        "r",
        {
            "intervention": "loreft",
            "layers": "all",
            "prefix": 5,
            "suffix": 0,
            "rank": 1,
            "lr": 3e-4,
            "tied": False,
        },
    )
    params, notes = map_onto_space(recipe, space, num_layers=4)
    assert params == {
        "intervention": "loreft",
        "layers": "0-3",
        "prefix": 2,
        "rank": 4,
        "lr": 1e-3,
        "tied": False,
    }
    assert "prefix=5 -> 2" in notes and "rank=1 -> 4" in notes
    assert "suffix=0 is fixed to 1 in this space" in notes
    skipped, why = map_onto_space(Recipe("x", {"intervention": "noreft"}), space, 4)
    assert skipped is None and "not among" in why[0]

    # a structure the space holds one of, listed or fixed: it ran as that one, unsaid
    for single in (Choice(("loreft",)), Fixed("loreft")):
        narrow = {**space, "intervention": single, "layers": Fixed("all")}
        skipped, why = map_onto_space(Recipe("d", {"intervention": "direft"}), narrow, 4)
        assert skipped is None and why == ["intervention='direft' is not among ['loreft']"]
        kept, _ = map_onto_space(
            Recipe("l", {"intervention": "loreft", "layers": "0-3"}), narrow, 4
        )
        assert kept == {}  # "0-3" is "all" on 4 layers; both fixed: nothing left to enqueue


def test_paper_warm_start_runs_first_and_is_marked(write_study, easy_task_files, capsys):
    raw = tiny_study(
        easy_task_files, warm_start={"recipes": "paper"}, budget={"n_trials": 4, "max_epochs": 1}
    )
    raw["space"].update(prefix={"low": 0, "high": 1}, suffix={"low": 0, "high": 1})
    raw["space"]["lr"] = {"low": 1e-2, "high": 3e-2, "log": True}
    study = write_study(raw)
    assert main(["run", str(study)]) == 0
    trials = trials_of(study)
    marked = [t for t in trials if "warm_start" in t.user_attrs]
    # lr 3e-3 is clipped to the space's 1e-2, which makes the 1e-2 recipe a duplicate; rank 4
    # moves to the nearest listed rank
    assert [t.number for t in marked] == [0, 1]
    assert [t.user_attrs["warm_start"] for t in marked] == [
        "paper-glue-lr0.003",
        "paper-glue-rank4-lr0.01",
    ]
    assert [t.params["lr"] for t in marked] == [pytest.approx(1e-2)] * 2
    assert [t.params["rank"] for t in marked] == [1, 2]
    for t in marked:
        assert (t.params["prefix"], t.params["suffix"]) == (1, 0)
    out = capsys.readouterr().out
    assert "paper-glue-lr0.01: skipped, same as an earlier one" in out
    assert "paper-glue-rank4-lr0.01: enqueued (rank=4 -> 2)" in out
    # a resumed study does not enqueue the recipes again
    assert main(["run", str(study), "--n-trials", "5"]) == 0
    assert sum("warm_start" in t.user_attrs for t in trials_of(study)) == 2


def test_warm_start_from_another_study(write_study, easy_task_files):
    source = write_study(tiny_study(easy_task_files, name="source"), "source.yaml")
    assert main(["run", str(source)]) == 0
    best = sorted((t for t in trials_of(source)), key=lambda t: -t.value)[:2]
    target = write_study(
        tiny_study(
            easy_task_files,
            name="target",
            warm_start={"study": "source", "storage": "sqlite:///source.db", "top_k": 2},
            budget={"n_trials": 2, "max_epochs": 1},
        ),
        "target.yaml",
    )
    assert main(["run", str(target)]) == 0
    trials = trials_of(target)
    assert [t.user_attrs["warm_start"] for t in trials] == [
        f"study:source#{t.number}" for t in best
    ]
    assert [t.params for t in trials] == [t.params for t in best]


def test_a_warm_start_from_a_study_without_completed_trials_says_so(
    write_study, easy_task_files, capsys
):
    """It enqueued nothing and said nothing: the run looked warm-started."""
    source = load_spec(write_study(tiny_study(easy_task_files, name="source"), "source.yaml"))
    open_study(source, source.storage, heartbeat=False)  # created, no trial yet
    warm = {"study": "source", "storage": source.storage}
    raw = tiny_study(easy_task_files, name="t2", warm_start=warm, budget={"n_trials": 1})
    assert main(["run", str(write_study(raw, "t2.yaml"))]) == 0
    assert (
        "warm start from study 'source': it has no completed trial yet" in capsys.readouterr().out
    )


def test_warm_start_from_a_study_of_another_model_keeps_all_layers(tmp_path):
    """A 4-layer model's trial on "all" layers resolved them to [0, 1, 2, 3]: on a 6-layer
    model that set is not "all", and the recipe would be skipped; its searched value is."""
    storage = f"sqlite:///{tmp_path / 'source.db'}"
    source = optuna.create_study(study_name="source", storage=storage, direction="maximize")
    layers = optuna.distributions.CategoricalDistribution(("all", "1;2"))
    record = TrialRecord(config={**CONFIG, "layers": [0, 1, 2, 3]}, n_params=10)
    source.add_trial(
        optuna.trial.create_trial(
            value=0.9,
            params={"layers": "all"},
            distributions={"layers": layers},
            user_attrs=record.to_user_attrs(),
        )
    )
    (recipe,) = study_recipes("source", storage, top_k=1, method="reft")
    space = {"layers": Choice(("all", "4;5")), "rank": Fixed(1), "lr": FloatRange(1e-3, 1e-2)}
    params, _ = map_onto_space(recipe, space, num_layers=6)
    assert params == {"layers": "all", "lr": 1e-3}


def test_finalize_reruns_top_configs_and_best_picks_the_mean(write_study, easy_task_files, capsys):
    raw = tiny_study(easy_task_files, finalize={"top_k": 2, "seeds": [11, 12]})
    study = write_study(raw)
    assert main(["run", str(study)]) == 0
    trials = trials_of(study)
    reruns = [t for t in trials if TrialRecord.of(t).finalize_of is not None]
    assert len(reruns) == 4 and all(t.state.name == "COMPLETE" for t in reruns)
    records = [TrialRecord.of(t) for t in reruns]
    assert {r.seed for r in records} == {11, 12}
    assert all(r.config["seed"] == r.seed for r in records)
    # each run's dev hits, for best's noise margin: as many as dev examples, their share the score
    for run in [t for t in trials if t.state.name == "COMPLETE"]:
        hits = unpack_hits(TrialRecord.of(run).dev_hits)
        assert len(hits) == 48 and sum(hits) / 48 == pytest.approx(run.value)
    capsys.readouterr()
    assert main(["best", str(study), "--json", "--top", "3"]) == 0
    best = json.loads(capsys.readouterr().out)
    finalized = [b for b in best if "mean" in b]
    assert len(finalized) == 2 and best[:2] == finalized
    assert finalized[0]["std"] >= 0  # order: test_best_prefers_the_smaller_config_of_a_tie
    assert set(finalized[0]["seed_scores"]) == {"3", "11", "12"}
    # resumed: nothing is rerun twice
    assert main(["run", str(study)]) == 0
    assert sum(TrialRecord.of(t).finalize_of is not None for t in trials_of(study)) == 4


CONFIG = {
    "intervention": "loreft", "layers": [0], "positions": "f1", "tied": False,
    "rank": 1, "seed": 3, "lr": 1e-3, "epochs": 1, "batch_size": 8,
}  # fmt: skip


def add_trial(study: optuna.Study, score: float, record: TrialRecord) -> None:
    attrs = record.to_user_attrs()
    study.add_trial(
        optuna.trial.create_trial(value=score, params={}, distributions={}, user_attrs=attrs)
    )


def finalized_study(
    configs: list[tuple[int, list[float]]], hits: list[list[bool]] | None = None
) -> optuna.Study:
    """A study of finalized configs: (trainable parameters, dev score per seed 3, 4, 5);
    with ``hits``, each config's dev hits (the same for its three seeds)."""
    study = optuna.create_study(direction="maximize")
    for index, (n_params, scores) in enumerate(configs):
        number = len(study.trials)
        dev_hits = None if hits is None else pack_hits(hits[index])
        for seed, score in zip((3, 4, 5), scores, strict=True):
            rerun = {"finalize_of": number, "seed": seed} if seed != 3 else {}
            record = TrialRecord(config=CONFIG, n_params=n_params, dev_hits=dev_hits, **rerun)
            add_trial(study, score, record)
    return study


def test_best_prefers_the_smaller_config_of_a_tie():
    """Within the best mean's standard error over seeds, the fewest parameters lead; beyond
    it, the better mean does; unfinalized trials follow the finalized ones."""
    # 18,456 params: mean 0.87, std 0.02, standard error 0.0115; 4,614 params: mean 0.86
    tie = finalized_study([(18_456, [0.85, 0.87, 0.89]), (4_614, [0.86, 0.86, 0.86])])
    assert [t.number for t in best_trials(tie, 2)] == [3, 0]
    # a seed-stable gain of 1 point is no tie (standard error 0): the bigger config leads
    clear = finalized_study([(18_456, [0.87, 0.87, 0.87]), (4_614, [0.86, 0.86, 0.86])])
    assert [t.number for t in best_trials(clear, 2)] == [0, 3]
    # a lone trial scoring above both means still ranks after them
    add_trial(clear, 0.9, TrialRecord(config=CONFIG, n_params=10))
    assert [t.number for t in best_trials(clear, 3)] == [0, 3, 6]


def test_best_counts_the_dev_splits_noise_in_a_tie():
    """Two configs 2 points apart on 100 dev examples, steady over seeds: a tie when they
    disagree on many examples (the gap is within the dev split's noise), no tie when the
    bigger config gets right every example the smaller one does, and two more."""
    smaller = [True] * 50 + [False] * 50
    disagreeing = [True] * 26 + [False] * 24 + [True] * 26 + [False] * 24  # 52 right
    dominating = [True] * 52 + [False] * 48
    configs = [(18_456, [0.52, 0.52, 0.52]), (4_614, [0.50, 0.50, 0.50])]
    noisy = finalized_study(configs, hits=[disagreeing, smaller])
    assert [t.number for t in best_trials(noisy, 2)] == [3, 0]
    # best says why the lower mean leads
    table = format_table(best_summaries(noisy, best_trials(noisy, 2)), "accuracy")
    assert table.splitlines()[-1] == (
        "trial 3 ranks first: fewest trainable parameters (4,614 vs 18,456) among the "
        "configs within noise of the best mean (trial 0: 0.5200 vs 0.5000)"
    )
    clear = finalized_study(configs, hits=[dominating, smaller])
    assert [t.number for t in best_trials(clear, 2)] == [0, 3]
    assert best_summaries(clear, best_trials(clear, 2))[0]["picked_by"] == BY_MEAN
    # without hits on record (an f1 metric) only the seeds' spread counts: no tie
    assert [t.number for t in best_trials(finalized_study(configs), 2)] == [0, 3]


def warm_start_beside(sampled_hits: list[bool] | None, warm_hits: list[bool] | None):
    """A study of one warm start (0.50) and two sampled trials (0.52) with these dev hits."""
    study = optuna.create_study(direction="maximize")
    warm = TrialRecord(config=CONFIG, n_params=4_614, warm_start="paper-glue-lr0.01")
    add_trial(study, 0.50, replace(warm, dev_hits=warm_hits and pack_hits(warm_hits)))
    sampled = TrialRecord(config=CONFIG, n_params=18_456)
    for score in (0.52, 0.52):
        add_trial(study, score, replace(sampled, dev_hits=sampled_hits and pack_hits(sampled_hits)))
    return study


def test_a_warm_start_keeps_its_place_unless_beaten_by_more_than_noise():
    """The best warm start ranks (and is finalized, and exported) ahead of sampled configs
    that beat it by no more than the dev split's noise; ahead of none where they beat it on
    every row, or where no dev hits are recorded (an f1 metric)."""
    warm = [True] * 50 + [False] * 50
    disagreeing = [True] * 26 + [False] * 24 + [True] * 26 + [False] * 24  # 52 right
    dominating = [True] * 52 + [False] * 48
    noisy = warm_start_beside(disagreeing, warm)
    assert [t.number for t in top_search_trials(noisy)] == [0, 1, 2]
    assert [t.number for t in best_trials(noisy, 2)] == [0, 1]
    table = format_table(best_summaries(noisy, best_trials(noisy, 2)), "accuracy")
    assert table.splitlines()[-1] == (
        "trial 0 ranks first: warm start paper-glue-lr0.01, which trial 1 leads by no more "
        "than the dev split's noise (0.5200 vs 0.5000)"
    )
    # the progress lines' best so far is the same pick, with the score it leads within noise
    lines = []
    ProgressPrinter(3, lines.append)(noisy, noisy.trials[-1])
    assert "| best=0.5000 (#0, a warm start; #1's 0.5200 is within noise) |" in lines[0]
    clear = warm_start_beside(dominating, warm)
    assert [t.number for t in top_search_trials(clear)] == [1, 2, 0]
    ProgressPrinter(3, lines.append)(clear, clear.trials[-1])
    assert "| best=0.5200 (#1) |" in lines[1]
    assert "picked_by" not in best_summaries(clear, best_trials(clear, 1))[0]
    assert [t.number for t in top_search_trials(warm_start_beside(None, None))] == [1, 2, 0]


def test_ranking_reads_the_trials_a_fixed_number_of_times(monkeypatch):
    """``best`` read every trial once per completed trial (to find its reruns): seconds at
    1,000 trials. It now reads them a fixed number of times, however many there are."""
    reads = []
    for n_configs in (2, 40):
        study = finalized_study([(4_614 + i, [0.8, 0.8, 0.8]) for i in range(n_configs)])
        for score in range(n_configs):  # trials without reruns, as most of a search's are
            add_trial(study, score / 100, TrialRecord(config=CONFIG, n_params=10))
        get_trials = study.get_trials
        counted = []

        def counting(*args, get_trials=get_trials, counted=counted, **kwargs):
            counted.append(1)
            return get_trials(*args, **kwargs)

        monkeypatch.setattr(study, "get_trials", counting)
        why_it_leads(study, best_trials(study, 5)[0])
        reads.append(len(counted))
    assert reads[0] == reads[1]


def test_dev_hits_pack_and_unpack():
    for hits in ([], [True], [False, True, True, False, True], [True] * 9 + [False] * 500):
        assert unpack_hits(pack_hits(hits)) == hits
    assert pack_hits([True, False, True, True, True]) == "5:b8"


def test_a_16_bit_search_finalizes_and_exports_in_float32(
    write_study, easy_task_files, capsys, tmp_path
):
    """Fast search, exact pick: the reruns (its own seed too) train in float32, the mean over
    seeds holds float32 scores only, and the export retrains its weights in float32."""
    raw = tiny_study(
        easy_task_files,
        model={"path": "tiny:llama", "dtype": "bfloat16-mixed"},
        budget={"n_trials": 2, "max_epochs": 1},
        finalize={"top_k": 1, "seeds": [11]},
    )
    study = write_study(raw)
    with pytest.warns(UserWarning, match="emulated") if emulated() else nullcontext():
        assert main(["run", str(study)]) == 0
    assert "its reruns train in float32" in capsys.readouterr().out
    trials = trials_of(study)
    records = {t.number: TrialRecord.of(t) for t in trials}
    search = [n for n, r in records.items() if r.finalize_of is None]
    reruns = {r.seed: n for n, r in records.items() if r.finalize_of is not None}
    assert all(records[n].dtype == "bfloat16-mixed" for n in search)
    assert set(reruns) == {3, 11} and all(records[n].dtype == "float32" for n in reruns.values())
    assert records[reruns[3]].copied_from is None  # not the 16-bit run's twin: trained again
    picked = records[reruns[3]].finalize_of
    value = {t.number: t.value for t in trials}
    summary = seed_summary(optuna_study(study), next(t for t in trials if t.number == picked))
    assert summary["seed_scores"] == {"3": value[reruns[3]], "11": value[reruns[11]]}

    capsys.readouterr()  # the test split is scored once, from what export ships
    assert main(["best", str(study), "--test"]) == 0
    said = capsys.readouterr().err
    assert f"scoring trial {picked} (kept artifact" in said
    assert f"(float32, trial {reruns[3]})) once on" in said
    out = tmp_path / "export"
    assert main(["export", str(study), str(out), "--trial", str(picked)]) == 0
    sidecar = json.loads((out / "reftsearch.json").read_text())
    assert sidecar["dev_score_dtype"] == "bfloat16-mixed"
    assert sidecar["base_model"]["dtype"] == "float32"
    # the float32 rerun with the trial's own seed kept what export needs: no retraining
    assert f"(float32, trial {reruns[3]})" in sidecar["weights"]
    # predict on the study runs what the export ships: those float32 weights
    inputs = ["--input", easy_task_files["dev"], "--trial", str(picked)]
    from_study, said = predictions(capsys, str(study), *inputs)
    assert f"(float32, trial {reruns[3]})" in said
    from_export, _ = predictions(capsys, str(out), *inputs[:2])
    assert_same_predictions(from_study, from_export)


def emulated() -> bool:
    return emulated_on(torch.bfloat16, torch.device("cpu"))


def optuna_study(path):
    spec = load_spec(path)
    return optuna.load_study(study_name=spec.name, storage=spec.storage)


def test_finalize_runs_only_seed_reruns_and_leaves_warm_starts_waiting(
    write_study, easy_task_files
):
    """A budget met before every warm start ran leaves the rest enqueued: finalize, which
    pops enqueued trials too, trained one as a seed rerun slot (and a rerun went missing).
    Each is given back, still waiting for a later, larger budget."""
    raw = tiny_study(easy_task_files, finalize={"top_k": 1, "seeds": [11, 12]})
    # the rank-1 recipes' lrs 3e-3 and 1e-2 both map to this space's 1e-2: two warm starts
    raw["space"].update(rank=[1, 2, 4], suffix=[1, 2], lr={"low": 1e-2, "high": 3e-2})
    raw.update(warm_start={"recipes": "paper"}, budget={"n_trials": 1, "max_epochs": 1})
    study = write_study(raw)
    assert main(["run", str(study)]) == 0
    trials = trials_of(study)
    trained = [t for t in trials if t.state.name == "COMPLETE"]
    assert [TrialRecord.of(t).finalize_of for t in trained] == [None, 0, 0]
    assert {TrialRecord.of(t).seed for t in trained[1:]} == {11, 12}
    waiting = [t for t in trials if t.state.name == "WAITING"]
    assert len(waiting) == 1
    assert TrialRecord.of(waiting[0]).warm_start == "paper-glue-rank4-lr0.01"
    # a larger budget trains it first
    assert main(["run", str(study), "--n-trials", "2"]) == 0
    searched = [t for t in trials_of(study) if TrialRecord.of(t).is_search_trial]
    done = [t for t in searched if t.state.name == "COMPLETE"]
    assert [TrialRecord.of(t).warm_start for t in done] == [
        "paper-glue-lr0.003",
        "paper-glue-rank4-lr0.01",
    ]


def test_finalize_defaults_on_for_big_studies(tmp_path):
    base = {
        "name": "t",
        "model": "tiny:llama",
        "task": {"kind": "classification", "data": "builtin:sentiment"},
        "seed": 5,
    }
    assert parse_spec({**base, "budget": {"n_trials": 19}}, tmp_path).finalize is None
    big = parse_spec({**base, "budget": {"n_trials": 20}}, tmp_path).finalize
    assert big.top_k == 3 and big.seeds == (6, 7)
    assert (
        parse_spec({**base, "budget": {"n_trials": 50}, "finalize": False}, tmp_path).finalize
        is None
    )
    with pytest.raises(SpecError, match=r"finalize.seeds: must be distinct extra seeds"):
        parse_spec({**base, "finalize": {"seeds": [5, 6]}}, tmp_path)


def test_a_duplicate_config_is_not_trained_again(write_study, easy_task_files, capsys):
    raw = tiny_study(easy_task_files, budget={"n_trials": 5, "max_epochs": 1})
    raw["space"].update(rank=[1, 2], lr=0.005, suffix=1)  # two configs, five trials
    study = write_study(raw)
    spec = load_spec(study)
    created = open_study(spec, spec.storage)
    for rank in (1, 2, 1, 2, 1):
        created.enqueue_trial({"rank": rank})
    assert main(["run", str(study)]) == 0
    trials = trials_of(study)
    copies = [t for t in trials if "copied_from" in t.user_attrs]
    assert len(copies) == 3
    for copy in copies:
        twin = trials[copy.user_attrs["copied_from"]]
        assert "copied_from" not in twin.user_attrs and twin.params == copy.params
        assert copy.value == twin.value and "wall_time_s" not in copy.user_attrs
    assert "result copied" in capsys.readouterr().out


def test_an_invalid_sampled_config_is_pruned_with_its_reason(write_study, easy_task_files):
    raw = tiny_study(easy_task_files, budget={"n_trials": 1, "max_epochs": 1})
    raw["space"].update(prefix=[0, 1], suffix={"low": 0, "high": 1})  # drawn: never (0, 0)
    study = write_study(raw)
    spec = load_spec(study)
    open_study(spec, spec.storage).enqueue_trial({"prefix": 0, "suffix": 0})
    assert main(["run", str(study)]) == 0
    trial, trained = trials_of(study)
    assert trial.state.name == "PRUNED" and "no token" in trial.user_attrs["invalid_reason"]
    assert "n_params" not in trial.user_attrs and not trial.intermediate_values
    # it did not count against the budget of 1: a config was trained after it
    assert trained.state.name == "COMPLETE" and "invalid_reason" not in trained.user_attrs
