"""Which search finds the better ReFT config for the same compute? A real task, several seeds.

SST-2 (``../shared/data/sst2``) with ``embedded:minilm``. As in the ReFT paper, GLUE's
validation split is cut in two halves: every search selects on one (its dev split) and the
config each search picks is scored once on the other (held out). Strategies, each given the
same compute budget (in full-trial equivalents: epochs trained over the whole train split /
max_epochs, so a pruned trial costs what it trained and a copied or invalid one nothing):

  random                        random sampler
  tpe                           TPE
  tpe+warm                      TPE, the paper's GLUE recipes enqueued first
  tpe+hyperband                 TPE with Hyperband over epochs
  tpe+warm+hyperband+finalize   all of it; the top configs rerun with another seed (their cost
                                comes out of the same budget) and the pick is the best mean

Every strategy runs through reftsearch's own study, objective, warm start and finalize code on
one loaded model. Prints a table (strategy, best dev score mean+-std over seeds, held-out-half
score, compute, trials), writes a PNG of best-so-far dev score against compute, and ends with
``best_strategy=NAME gain_vs_random=+X.X`` (held-out points over random search).

    .venv/bin/python benchmarks/search_strategies.py --quick   # ~12 min on 2 busy CPU cores
    .venv/bin/python benchmarks/search_strategies.py           # bigger data, budget and seeds
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import optuna

from reftsearch.data.batches import encode
from reftsearch.engine.scoring import evaluate
from reftsearch.errors import TrialFailed
from reftsearch.run.driver import run_finalize, warm_start_recipes
from reftsearch.search.objective import Objective
from reftsearch.search.ranking import best_trials, seed_summary
from reftsearch.search.record import is_search_trial, search_trials
from reftsearch.search.study import PreparedStudy, open_study, prepare
from reftsearch.search.test_split import trained_adapter
from reftsearch.search.warm_start import enqueue_warm_starts
from reftsearch.spec.study_file import parse_spec

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst2"

STRATEGIES: dict[str, dict] = {
    "random": {"sampler": {"type": "random"}},
    "tpe": {},
    "tpe+warm": {"warm_start": {"recipes": "paper"}},
    "tpe+hyperband": {"pruner": {"type": "hyperband", "min_resource": 1}},
    "tpe+warm+hyperband+finalize": {
        "warm_start": {"recipes": "paper"},
        "pruner": {"type": "hyperband", "min_resource": 1},
        "finalize": {"top_k": 2, "seeds": [43]},
    },
}


@dataclass(frozen=True)
class Size:
    train: int  # training examples (a seeded sample of SST-2 train)
    select: int  # dev examples the search selects on (half of GLUE validation at most)
    max_epochs: int
    budget: float  # full-trial equivalents per search
    seeds: tuple[int, ...]  # sampler seeds; training seed stays 42
    startup: int  # TPE's random trials before it models the space


# --quick is sized for 2 CPU cores shared with other work (~1 min per search)
QUICK = Size(train=200, select=150, max_epochs=2, budget=4, seeds=(0, 1), startup=2)
FULL = Size(train=2000, select=436, max_epochs=3, budget=20, seeds=(0, 1, 2), startup=5)


@dataclass
class Result:
    strategy: str
    seed: int
    dev: float  # the picked config's dev score (its mean over seeds when finalized)
    held_out: float
    compute: float  # full-trial equivalents spent
    wall_s: float
    trials: int
    curve: list[tuple[float, float]]  # (compute so far, best dev score so far)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, ~10 min on 2 cores")
    parser.add_argument("--png", default="search_strategies.png", help="plot path")
    args = parser.parse_args()
    size = QUICK if args.quick else FULL
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        select, held_out = write_halves(Path(tmp), size.select)
        start = time.perf_counter()
        prepared = prepare(parse_spec(study_raw(size, select, {}, "load", 0), Path(tmp)))
        held_out_examples = encode(
            [{"text": r["sentence"], "label": r["label"]} for r in held_out],
            prepared.base.tokenizer,
            prepared.spec.task,
        )
        print(
            f"SST-2, embedded:minilm: {len(prepared.split.train)} train, "
            f"{len(prepared.split.dev)} dev (select half), {len(held_out_examples)} held-out half;"
            f" budget {size.budget:g} full trials of {size.max_epochs} epochs per search; "
            f"seeds {list(size.seeds)}; loaded in {time.perf_counter() - start:.1f}s",
            flush=True,
        )
        results = []
        for seed in size.seeds:
            for strategy, changes in STRATEGIES.items():
                name = f"{strategy.replace('+', '_')}-{seed}"  # study names: no '+'
                raw = study_raw(size, select, changes, name, seed)
                spec = parse_spec(raw, Path(tmp))
                result = search(
                    dataclasses.replace(prepared, spec=spec), size, held_out_examples, Path(tmp)
                )
                result.strategy, result.seed = strategy, seed
                print(
                    f"  {strategy:<28} seed {seed}: dev {result.dev:.4f} held-out "
                    f"{result.held_out:.4f} compute {result.compute:.2f} "
                    f"({result.trials} trials, {result.wall_s:.0f}s)",
                    flush=True,
                )
                results.append(result)
    print_table(results)
    plot(results, size, args.png)
    print(f"wrote {args.png}")
    json_path = Path(args.png).with_suffix(".json")
    json_path.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    best, gain = verdict(results)
    print(f"best_strategy={best} gain_vs_random={gain:+.1f}")


def write_halves(folder: Path, n_select: int) -> tuple[Path, list[dict]]:
    """GLUE validation split in two seeded halves: the select half (a file) and the other."""
    with open(SST2 / "validation.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = [{"sentence": r["sentence"].strip(), "label": int(r["label"])} for r in rows]
    random.Random(0).shuffle(rows)
    half = len(rows) // 2
    select, held_out = rows[:half][:n_select], rows[half:]
    path = folder / "select.tsv"  # SST-2's own format: read with the same options as train
    lines = [f"{r['sentence']}\t{r['label']}\n" for r in select]
    path.write_text("sentence\tlabel\n" + "".join(lines))
    return path, held_out


def study_raw(size: Size, select: Path, changes: dict, name: str, seed: int) -> dict:
    raw = {
        "name": name,
        "model": "embedded:minilm",
        "task": {
            "kind": "classification",
            "data": {
                "train": str(SST2 / "train.tsv"),
                "dev": str(select),
                "read_options": {"quoting": 3},
            },
            "text": "sentence",
            "max_train_examples": size.train,
            "max_length": 64,
        },
        "metric": "accuracy",
        "seed": 42,
        "budget": {"n_trials": 10_000, "max_epochs": size.max_epochs},  # compute stops it
        "sampler": {"type": "tpe", "seed": seed, "n_startup_trials": size.startup},
        "pruner": "none",
        "finalize": False,
        "space": {
            "intervention": ["loreft", "direft"],
            "layers": ["all", "0;1;2", "3;4;5", "1;3;5"],
            "prefix": {"low": 0, "high": 3},
            "suffix": {"low": 0, "high": 3},
            "tied": [True, False],
            "rank": [1, 2, 4, 8],
            "lr": {"low": 3.0e-4, "high": 3.0e-2, "log": True},
            "batch_size": 32,
        },
    }
    merged = {**raw, **changes}
    merged["sampler"] = {**raw["sampler"], **changes.get("sampler", {})}  # keep the seed
    return merged


def search(prepared: PreparedStudy, size: Size, held_out: list, folder: Path) -> Result:
    """One strategy, one seed: search to the compute budget, finalize, score the pick."""
    spec = prepared.spec
    storage = f"sqlite:///{folder / (spec.name + '.db')}"
    study = open_study(spec, storage, heartbeat=False)
    recipes = warm_start_recipes(spec, storage, prepared)
    enqueue_warm_starts(study, recipes, spec.space, prepared.base.num_layers, _quiet)
    reserve = spec.finalize.top_k * len(spec.finalize.seeds) if spec.finalize else 0
    start = time.perf_counter()
    study.optimize(
        Objective(prepared, _quiet),
        callbacks=[StopAtCompute(size.budget - reserve, size.max_epochs)],
        catch=(TrialFailed,),
    )
    if spec.finalize:
        run_finalize(study, prepared, _quiet)
    wall_s = time.perf_counter() - start
    (picked,) = best_trials(study, 1)
    seeds = seed_summary(study, picked)
    reft, _ = trained_adapter(prepared, study, picked, _quiet)  # kept by the objective
    with reft.attached(prepared.base.blocks):
        held_out_score = evaluate(prepared.base, reft, prepared.split, held_out)
    return Result(
        strategy="",
        seed=0,
        dev=seeds["mean"] if seeds else picked.value,
        held_out=held_out_score,
        compute=compute_of(study.trials, size.max_epochs),
        wall_s=wall_s,
        trials=len(search_trials(study)),
        curve=curve(study.trials, size.max_epochs),
    )


class StopAtCompute:
    """Stop the study once its trials have trained ``budget`` full-trial equivalents."""

    def __init__(self, budget: float, max_epochs: int) -> None:
        self.budget = budget
        self.max_epochs = max_epochs

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if compute_of(study.get_trials(deepcopy=False), self.max_epochs) >= self.budget:
            study.stop()


def compute_of(trials: list[optuna.trial.FrozenTrial], max_epochs: int) -> float:
    return sum(t.user_attrs.get("epochs_trained", 0) for t in trials) / max_epochs


def curve(trials: list[optuna.trial.FrozenTrial], max_epochs: int) -> list[tuple[float, float]]:
    """Best dev score of the search so far after each trial, against compute so far."""
    points, spent, best = [], 0.0, None
    for trial in trials:
        spent += trial.user_attrs.get("epochs_trained", 0) / max_epochs
        if trial.state == optuna.trial.TrialState.COMPLETE and is_search_trial(trial):
            best = trial.value if best is None else max(best, trial.value)
        if best is not None:
            points.append((spent, best))
    return points


def print_table(results: list[Result]) -> None:
    print()
    print(
        f"{'strategy':<28} {'best dev (select half)':>24} {'held-out half':>17} "
        f"{'compute':>9} {'trials':>7} {'wall':>7}"
    )
    for strategy in STRATEGIES:
        rs = [r for r in results if r.strategy == strategy]
        print(
            f"{strategy:<28} {_mean_std([r.dev for r in rs]):>24} "
            f"{_mean_std([r.held_out for r in rs]):>17} "
            f"{statistics.fmean(r.compute for r in rs):>9.2f} "
            f"{statistics.fmean(r.trials for r in rs):>7.1f} "
            f"{statistics.fmean(r.wall_s for r in rs):>6.0f}s"
        )
    print("(scores in accuracy; compute in full-trial equivalents; means over seeds)")


def verdict(results: list[Result]) -> tuple[str, float]:
    held_out = {
        s: statistics.fmean(r.held_out for r in results if r.strategy == s) for s in STRATEGIES
    }
    best = max(held_out, key=held_out.get)
    return best, 100 * (held_out[best] - held_out["random"])


def plot(results: list[Result], size: Size, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, strategy in enumerate(STRATEGIES):
        color = f"C{i}"
        for j, r in enumerate(x for x in results if x.strategy == strategy):
            xs, ys = zip(*r.curve, strict=True) if r.curve else ((), ())
            label = strategy if j == 0 else None
            ax.step(xs, ys, where="post", color=color, alpha=0.8, lw=1.5, label=label)
    ax.axvline(size.budget, color="grey", ls=":", lw=1)
    ax.set_xlabel("compute (full-trial equivalents)")
    ax.set_ylabel("best dev accuracy so far (select half)")
    ax.set_title(f"SST-2, embedded:minilm: best-so-far per strategy (seeds {list(size.seeds)})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _quiet(message: str) -> None:
    """The per-trial lines would drown the table."""


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} +- {std:.4f}"


if __name__ == "__main__":
    sys.exit(main())
