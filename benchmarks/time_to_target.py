"""Time to a good config: reftsearch's search (TPE + Hyperband pruning on per-epoch dev
scores) vs random search without pruning, with equal compute, over several seeds.

Compute is counted in epochs (``reftsearch.run.epoch_budget``: each trial's epochs over the
train split, a pruned one's only those it trained), not seconds: the machine's load then
changes how long the benchmark takes, never what it measures. For each seed, random search
first runs a fixed number of trials in full; the epochs they trained are the budget, which
reftsearch's search then gets (``run_study(stop=EpochBudget(...))``): pruning lets it try
more configs in it. The target is the best dev score either search reached, less 1 point.
A search's time to target is the epochs its trials trained until the first one within it
finished. When random search has not got there, it goes on, a few trials at a time, up to
``EXTEND`` times its budget, so that its time is measured rather than cut off; a search that
never gets there counts all it spent (marked ``>``: the ratio is then a lower bound for the
side that did).

* ``--quick``: the embedded MiniLM encoder on the builtin synthetic sentiment task (the
  demo's: negation and contrast clauses, so where an intervention sits matters);
* default: the embedded MiniLM encoder on GLUE SST-2 samples (../shared/data/sst2).

Usage::

    .venv/bin/python benchmarks/time_to_target.py [--quick] [--pruner successive_halving]
        [--resource data_fraction]

Last line: ``time_to_target_ratio=X.XX`` (random's total epochs to target over the seeds /
the pruned search's).
"""

from __future__ import annotations

import argparse
import csv
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch

from reftsearch.cli import quiet_libraries
from reftsearch.run.driver import run_study
from reftsearch.run.epoch_budget import EpochBudget
from reftsearch.search.record import TrialRecord
from reftsearch.spec.study_file import PRUNER_RESOURCES, parse_spec

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst2"
TARGET_MARGIN = 0.01  # 1 point of accuracy
SEEDS = (1, 2, 3)
EXTEND = 3  # random search may go on up to this many times its budget to reach the target
EXTEND_STEP = 4  # trials at a time
RUNG_PRUNERS = ("hyperband", "successive_halving")

SPACE = {
    "intervention": ["loreft", "direft"],
    "prefix": {"low": 0, "high": 3},
    "suffix": {"low": 1, "high": 3},
    "tied": [True, False],
    "rank": [1, 2, 4],
    # a wide learning-rate range: many configs learn slowly, which is what pruning is for
    "lr": {"low": 1.0e-4, "high": 3.0e-2, "log": True},
}


@dataclass(frozen=True)
class Setup:
    model: str
    data: dict | str
    layers: list[str]
    max_epochs: int
    n_trials: int
    batch_size: int
    max_train: int


def quick_setup(folder: Path) -> Setup:
    layers = ["all", "3;4;5", "0;1;2", "5"]
    return Setup("embedded:minilm", "builtin:sentiment", layers, 4, 12, 32, 1000)


def full_setup(folder: Path) -> Setup:
    with open(SST2 / "train.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    rng = random.Random(0)
    picked = rng.sample(rows, 1280)
    for name, part in (("train", picked[:1024]), ("dev", picked[1024:])):
        with open(folder / f"{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, ["sentence", "label"])
            writer.writeheader()
            writer.writerows({"sentence": r["sentence"].strip(), "label": r["label"]} for r in part)
    data = {"train": str(folder / "train.csv"), "dev": str(folder / "dev.csv")}
    return Setup("embedded:minilm", data, ["all", "0;2;4", "3;5", "5"], 4, 20, 32, 1024)


def pruner_for(pruner: str, resource: str) -> dict:
    """The searched arm's pruner: rungs at 1, 3, 9, ... epochs, or at 1/9, 1/3 and all of the
    train rows (each trained for every epoch) with ``resource: data_fraction``."""
    if resource == "data_fraction":
        return {"type": pruner, "resource": resource, "min_fraction": 0.1, "reduction_factor": 3}
    return {"type": pruner, "min_resource": 1, "reduction_factor": 3}


def spec_for(
    setup: Setup, folder: Path, seed: int, pruned: bool, n_trials: int, pruner: dict | None = None
):
    arm = "pruned" if pruned else "random"
    budget = {"n_trials": n_trials, "max_epochs": setup.max_epochs}
    raw = {
        "name": f"{arm}-{seed}",
        "storage": f"sqlite:///{folder / f'{arm}-{seed}.db'}",
        "model": setup.model,
        "task": {
            "kind": "classification",
            "data": setup.data,
            "text": "sentence",
            "max_train_examples": setup.max_train,
            "max_dev_examples": 256,
            "max_length": 96,
        },
        "metric": "accuracy",
        "seed": seed,
        "budget": budget,
        "sampler": {"type": "tpe", "n_startup_trials": 3} if pruned else {"type": "random"},
        "pruner": pruner if pruned else "none",
        "finalize": False,
        "space": {
            **SPACE,
            "layers": setup.layers,
            "epochs": setup.max_epochs,
            "batch_size": setup.batch_size,
        },
    }
    return parse_spec(raw, base_dir=folder)


def spent(study: optuna.Study) -> list[tuple[float, float | None]]:
    """Per trial in order: the epochs trained up to its end (it and every trial before it)
    and its dev score (None unless it completed)."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    total, points = 0.0, []
    for t in sorted(trials, key=lambda t: t.number):
        total += TrialRecord.of(t).epochs_trained or 0.0
        complete = t.state == optuna.trial.TrialState.COMPLETE
        points.append((total, t.value if complete else None))
    return points


def time_to(points: list[tuple[float, float | None]], target: float) -> float | None:
    return next((when for when, score in points if score is not None and score >= target), None)


def best_of(points: list[tuple[float, float | None]]) -> float:
    return max(score for _, score in points if score is not None)


def random_search(setup: Setup, folder: Path, seed: int, n_trials: int) -> optuna.Study:
    spec = spec_for(setup, folder, seed, False, n_trials)
    return run_study(spec, spec.storage, log=lambda line: None)


def pruned_search(
    setup: Setup, folder: Path, seed: int, epochs: float, pruner: dict
) -> optuna.Study:
    """reftsearch's search until another trial could take it past ``epochs``; the trial cap
    is only a safety net."""
    spec = spec_for(setup, folder, seed, True, 10 * setup.n_trials, pruner)
    stop = EpochBudget.of(epochs, spec)
    return run_study(spec, spec.storage, log=lambda line: None, stop=stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="builtin synthetic task")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: reftsearch's, one per core)"
    )
    parser.add_argument(
        "--pruner",
        choices=RUNG_PRUNERS,
        default="hyperband",
        help="the searched arm's pruner, min_resource 1, reduction_factor 3 (default: "
        "hyperband, as the runs recorded before 2026-12-04; the shipped sst2-minilm and "
        "rte-minilm studies use successive_halving)",
    )
    parser.add_argument(
        "--resource",
        choices=PRUNER_RESOURCES,
        default="epochs",
        help="what the pruner's rungs count: epochs (1, 3) or data_fraction (1/9, 1/3 and all "
        "of the train rows, each for every epoch)",
    )
    args = parser.parse_args()
    if args.threads:  # what is measured is epochs: threads change only how long it takes
        torch.set_num_threads(args.threads)
    quiet_libraries()  # Optuna at WARNING, no datasets progress bars: its own lines only
    totals = {"pruned": 0.0, "random": 0.0}
    pruner = pruner_for(args.pruner, args.resource)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        setup = quick_setup(folder) if args.quick else full_setup(folder)
        print(
            f"{setup.model}: random search {setup.n_trials}+ trials, reftsearch the same "
            f"compute ({args.pruner} over {args.resource}); seeds {list(SEEDS)}, up to "
            f"{setup.max_epochs} epochs per trial, "
            f"{torch.get_num_threads()} torch threads",
            flush=True,
        )
        for seed in SEEDS:
            points = {"random": spent(random_search(setup, folder, seed, setup.n_trials))}
            budget = points["random"][-1][0]
            points["pruned"] = spent(pruned_search(setup, folder, seed, budget, pruner))
            target = max(best_of(p) for p in points.values()) - TARGET_MARGIN
            while time_to(points["random"], target) is None and (
                points["random"][-1][0] < EXTEND * budget
            ):  # random search goes on until it gets there (or EXTEND times its budget)
                more = len(points["random"]) + EXTEND_STEP
                points["random"] = spent(random_search(setup, folder, seed, more))
            line = [f"seed {seed}: target {target:.4f} (budget {budget:.0f} epochs)"]
            for arm in ("pruned", "random"):
                when = time_to(points[arm], target)
                totals[arm] += points[arm][-1][0] if when is None else when
                shown = f">{points[arm][-1][0]:.0f}" if when is None else f"{when:.1f}"
                line.append(
                    f"{arm} {shown} epochs ({len(points[arm])} trials, "
                    f"best {best_of(points[arm]):.4f})"
                )
            print(" | ".join(line), flush=True)
    print(f"total epochs to target: pruned {totals['pruned']:.1f}, random {totals['random']:.1f}")
    print(f"time_to_target_ratio={totals['random'] / max(totals['pruned'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
