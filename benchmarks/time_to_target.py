"""Time to a good config: reftsearch's search (TPE + Hyperband pruning on per-epoch dev
scores) vs random search without pruning, with an equal budget of trials, over several seeds.

For each seed both searches run the same number of trials on the same task; the target is
the best dev score either of them reached, less 1 point; each search's time to target is the
wall time from its first trial's start until its first trial within that finished (one that
never got there counts its whole run, marked ``>``). A trial budget, not a time budget,
keeps the comparison fair on a shared machine where contention changes the time a trial
takes. Both run through ``reftsearch.runner.run_study`` in this process.

* ``--quick``: the embedded MiniLM encoder on the builtin synthetic sentiment task (the
  demo's: negation and contrast clauses, so where an intervention sits matters), a few
  seconds per trial;
* default: the embedded MiniLM encoder on GLUE SST-2 samples (../shared/data/sst2).

Usage::

    .venv/bin/python benchmarks/time_to_target.py [--quick]

Last line: ``time_to_target_ratio=X.XX`` (random's total time to target over the seeds /
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

from reftsearch.runner import run_study
from reftsearch.spec import parse_spec

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst2"
TARGET_MARGIN = 0.01  # 1 point of accuracy
SEEDS = (1, 2, 3)

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
    return Setup("embedded:minilm", "builtin:sentiment", layers, 3, 12, 32, 600)


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


def spec_for(setup: Setup, folder: Path, seed: int, pruned: bool):
    arm = "pruned" if pruned else "random"
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
        "budget": {"n_trials": setup.n_trials, "max_epochs": setup.max_epochs},
        "sampler": {"type": "tpe", "n_startup_trials": 3} if pruned else {"type": "random"},
        "pruner": {"type": "hyperband", "min_resource": 1, "reduction_factor": 3}
        if pruned
        else "none",
        "finalize": False,
        "space": {
            **SPACE,
            "layers": setup.layers,
            "epochs": setup.max_epochs,
            "batch_size": setup.batch_size,
        },
    }
    return parse_spec(raw, base_dir=folder)


def finished(study: optuna.Study) -> tuple[list[tuple[float, float]], float]:
    """(seconds since the search's first trial started, dev score) of complete trials, and
    the seconds the whole search ran."""
    trials = study.get_trials(deepcopy=False)
    start = min(t.datetime_start for t in trials)
    points = sorted(
        ((t.datetime_complete - start).total_seconds(), t.value)
        for t in trials
        if t.state == optuna.trial.TrialState.COMPLETE
    )
    return points, max((t.datetime_complete - start).total_seconds() for t in trials)


def time_to(points: list[tuple[float, float]], target: float) -> float | None:
    return next((when for when, score in points if score >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="builtin synthetic task")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    totals = {"pruned": 0.0, "random": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        setup = quick_setup(folder) if args.quick else full_setup(folder)
        print(
            f"{setup.model}: {setup.n_trials} trials per search, seeds {list(SEEDS)}, "
            f"up to {setup.max_epochs} epochs per trial",
            flush=True,
        )
        for seed in SEEDS:
            points, counts, ran = {}, {}, {}
            for arm in ("pruned", "random"):
                spec = spec_for(setup, folder, seed, arm == "pruned")
                study = run_study(spec, spec.storage, log=lambda line: None)
                points[arm], ran[arm] = finished(study)
                states = [t.state.name for t in study.get_trials(deepcopy=False)]
                counts[arm] = (
                    f"{states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned"
                )
            best = max(score for arm in points for _, score in points[arm])
            target = best - TARGET_MARGIN
            line = [f"seed {seed}: best {best:.4f}, target {target:.4f}"]
            for arm in ("pruned", "random"):
                when = time_to(points[arm], target)
                totals[arm] += ran[arm] if when is None else when
                shown = f">{ran[arm]:.0f}" if when is None else f"{when:.1f}"
                line.append(f"{arm} {shown}s ({counts[arm]})")
            print(" | ".join(line), flush=True)
    print(f"total time to target: pruned {totals['pruned']:.1f}s, random {totals['random']:.1f}s")
    print(f"time_to_target_ratio={totals['random'] / max(totals['pruned'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
