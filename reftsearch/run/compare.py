"""Studies of several methods (ReFT, LoRA, DoRA, full fine-tuning) on one task, compared fairly.

Fair means (as the PEFT comparisons that hold up do): the same model, task and metric; the
same budget of finished trials and epochs, and the same seeds, for each; the config picked on
dev only; and the picked config scored on test once, at the end (``search/test_split.py``),
retrained with the same extra seeds for every study (finalize's seed reruns) so that a score
is a mean +- std over seeds, not one seed's luck. A study that already ran further than the
budget is judged on its first ``n_trials`` trials only.

Beside the score, each study's pick says what its method costs (``search/costs.py``):
trainable parameters (and their share of the model), seconds per epoch, peak memory and the
bytes its export's weights take. ``plot`` draws the score against each cost, with the Pareto
front: the studies no other beats on both.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd

from reftsearch.data.splits import has_split
from reftsearch.errors import BadInputError, ReftSearchError
from reftsearch.progress import Log
from reftsearch.run.driver import run_finalize, run_study
from reftsearch.run.epoch_budget import epochs_spent
from reftsearch.run.worker import load
from reftsearch.search.ranking import ranked, warm_start_kept
from reftsearch.search.record import TrialRecord, search_trials
from reftsearch.search.seed_reruns import own_seed_rerun
from reftsearch.search.study import FINISHED_STATES
from reftsearch.search.test_split import test_score, trained_adapter
from reftsearch.spec.study_file import FinalizeSpec, StudySpec

MB = 2**20


@dataclass(frozen=True)
class ArmResult:
    """One study's outcome under the shared budget."""

    study: str
    method: str
    trials: int
    best_trial: int
    dev_score: float
    test_scores: tuple[float, ...]  # the pick's, then its seed reruns'
    n_params: int
    base_params: int | None
    epochs_trained: float  # full passes over the train split, summed over the trials
    train_s: float
    epoch_s: float | None  # the pick's and its reruns' mean
    peak_memory_mb: float | None  # their largest
    export_bytes: int | None

    @property
    def test_mean(self) -> float:
        return statistics.fmean(self.test_scores)

    @property
    def test_std(self) -> float | None:
        return statistics.stdev(self.test_scores) if len(self.test_scores) > 1 else None

    def row(self, metric: str) -> dict:
        share = None if not self.base_params else 100 * self.n_params / self.base_params
        return {
            "study": self.study,
            "method": self.method,
            "trials": self.trials,
            "best trial": self.best_trial,
            f"dev {metric}": self.dev_score,
            f"test {metric}": self.test_mean,
            f"test {metric} std": self.test_std,
            "seeds": len(self.test_scores),
            "trainable params": self.n_params,
            "% of model": share,
            "s/epoch": self.epoch_s,
            "peak memory (MB)": self.peak_memory_mb,
            "export (MB)": None if self.export_bytes is None else self.export_bytes / MB,
            "epochs trained": round(self.epochs_trained, 2),
            "train time (s)": round(self.train_s, 1),
        }


def check_comparable(specs: Sequence[StudySpec], same_trials: bool = True) -> None:
    """Refuse studies that differ in what a fair comparison holds equal (exit 2, naming it);
    the trial budget only when ``same_trials`` (not given on the command line)."""
    first = specs[0]
    checks = {
        "model": lambda s: s.model,
        "task": lambda s: s.task,
        "metric": lambda s: s.metric,
        "seed": lambda s: s.seed,
        "budget.max_epochs": lambda s: s.budget.max_epochs,
        "finalize.seeds": lambda s: rerun_seeds(s),
    }
    if same_trials:
        checks["budget.n_trials"] = lambda s: s.budget.n_trials
    for what, value in checks.items():
        for other in specs[1:]:
            differs = _first_difference(value(first), value(other), what)
            if differs is not None:
                key, mine, theirs = differs
                raise BadInputError(
                    f"compare: every study must use the same {key}; {first.name!r} has "
                    f"{mine!r}, {other.name!r} has {theirs!r}"
                )
    studies = [(spec.name, spec.storage) for spec in specs]
    if len(set(studies)) < len(studies):
        raise BadInputError(
            "compare: two of the study files name the same study (name and storage); "
            "give each arm its own name"
        )
    if not has_split(first.task.data, "test"):
        raise BadInputError(
            "compare: task.data.test: the studies have no test split, and compare scores "
            "each pick on it"
        )


def _first_difference(mine: object, theirs: object, key: str) -> tuple[str, object, object] | None:
    """Where two values differ first, by key path (into dataclasses: ``task.max_length``)."""
    if mine == theirs:
        return None
    if dataclasses.is_dataclass(mine) and type(mine) is type(theirs):
        for field in dataclasses.fields(mine):
            differs = _first_difference(
                getattr(mine, field.name), getattr(theirs, field.name), f"{key}.{field.name}"
            )
            if differs is not None:
                return differs
    return key, mine, theirs


def rerun_seeds(spec: StudySpec) -> tuple[int, ...]:
    """The extra seeds the pick is retrained with: the study's finalize seeds, or none."""
    return spec.finalize.seeds if spec.finalize else ()


def compare(
    specs: list[tuple[StudySpec, str]],
    n_trials: int,
    timeout_s: float | None = None,
    log: Log = print,
) -> list[ArmResult]:
    """Run (or resume) each ``(spec, storage_url)`` to ``n_trials``, then pick, rerun the pick
    with the finalize seeds, and test the pick and its reruns."""
    results = []
    for spec, storage_url in specs:
        # the same budget for every arm; finalize reruns the pick only, below
        budget = dataclasses.replace(spec.budget, n_trials=n_trials, timeout=timeout_s)
        search = dataclasses.replace(spec, budget=budget, finalize=None)
        log(f"== {spec.name} ({spec.method}): up to {n_trials} trials")
        study = run_study(search, storage_url, n_trials, log=log)
        results.append(judge(search, study, n_trials, rerun_seeds(spec), log))
    return results


def judge(
    spec: StudySpec, study: optuna.Study, n_trials: int, seeds: tuple[int, ...], log: Log
) -> ArmResult:
    """Best of the first ``n_trials`` finished search trials on dev, rerun with ``seeds``,
    then the test scores of the pick and its reruns (each evaluated once)."""
    finished = sorted(search_trials(study, FINISHED_STATES), key=lambda t: t.number)[:n_trials]
    completed = [t for t in finished if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        raise ReftSearchError(f"study {spec.name!r} has no completed trial to compare")
    best = warm_start_kept(study, ranked(study, completed))[0]  # as best would pick
    prepared = load(dataclasses.replace(spec, finalize=FinalizeSpec(1, seeds)))
    if seeds:
        prepared = run_finalize(study, prepared, log, picks=[best])
    # a pick trained in 16 bits is tested as its float32 rerun with its own seed
    exact = reruns_of(study, best, own_seed_rerun(TrialRecord.of(best)))
    runs = [*(exact or [best]), *reruns_of(study, best, seeds)]
    tests = []
    for run in runs:
        trained = (prepared, trained_adapter(prepared, study, run, log)[0])
        tests.append(test_score(spec, study, run, log, trained=trained))
    records = [TrialRecord.of(run) for run in runs]
    times = [r.epoch_s for r in records if r.epoch_s is not None]
    peaks = [r.peak_memory_mb for r in records if r.peak_memory_mb is not None]
    pick = records[0]
    return ArmResult(
        study=spec.name,
        method=spec.method,
        trials=len(finished),
        best_trial=best.number,
        dev_score=runs[0].values[0],
        test_scores=tuple(tests),
        n_params=pick.n_params,
        base_params=pick.base_params,
        epochs_trained=epochs_spent(finished),
        train_s=sum(TrialRecord.of(t).wall_time_s or 0.0 for t in finished),
        epoch_s=statistics.fmean(times) if times else None,
        peak_memory_mb=max(peaks) if peaks else None,
        export_bytes=pick.export_bytes,
    )


def reruns_of(
    study: optuna.Study, trial: optuna.trial.FrozenTrial, seeds: tuple[int, ...]
) -> list[optuna.trial.FrozenTrial]:
    """``trial``'s completed seed reruns, one per seed, in the order of ``seeds``."""
    by_seed = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        record = TrialRecord.of(t)
        if record.finalize_of == trial.number and record.seed in seeds:
            by_seed.setdefault(record.seed, t)
    return [by_seed[seed] for seed in seeds if seed in by_seed]


CSV_MARK = "study,method,trials,best trial,"  # how a table ``compare`` writes begins


def table(results: list[ArmResult], metric: str) -> pd.DataFrame:
    return pd.DataFrame([r.row(metric) for r in results])


def printable(frame: pd.DataFrame, metric: str) -> str:
    """The table as compare prints it: the test score as mean +- std, sizes rounded."""
    shown = frame.drop(columns=[f"test {metric} std"]).astype(object)
    shown[f"test {metric}"] = [
        f"{mean:.4f}" + ("" if pd.isna(std) else f" +- {std:.4f}")
        for mean, std in zip(frame[f"test {metric}"], frame[f"test {metric} std"], strict=True)
    ]
    formats = {
        f"dev {metric}": "{:.4f}",
        "% of model": "{:.3g}",
        "s/epoch": "{:.2f}",
        "peak memory (MB)": "{:.0f}",
        "export (MB)": "{:.3g}",
    }
    for column, form in formats.items():
        shown[column] = [("-" if pd.isna(x) else form.format(x)) for x in frame[column]]
    return shown.to_string(index=False)


COSTS = {  # column: (axis label, log scale)
    "trainable params": ("trainable parameters", True),
    "s/epoch": ("seconds per epoch", False),
    "peak memory (MB)": ("peak memory (MB)", False),
    "export (MB)": ("export size (MB)", True),
}


def pareto_front(costs: Sequence[float], scores: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats (a cost no higher and a score no lower,
    one of them strictly), cheapest first."""
    points = list(zip(costs, scores, strict=True))
    front = [
        i
        for i, (c, s) in enumerate(points)
        if not any(c2 <= c and s2 >= s and (c2, s2) != (c, s) for c2, s2 in points)
    ]
    return sorted(front, key=lambda i: costs[i])


def plot(frame: pd.DataFrame, metric: str, path: Path) -> None:
    """One panel per cost: each study's test score (mean +- std) against it, and the front."""
    from matplotlib.figure import Figure  # the object API: nothing global changes

    figure = Figure(figsize=(4 * len(COSTS), 3.8), layout="constrained")
    axes = figure.subplots(1, len(COSTS), sharey=True)
    score, std = frame[f"test {metric}"], frame[f"test {metric} std"].fillna(0.0)
    for ax, (column, (label, log)) in zip(axes, COSTS.items(), strict=True):
        known = frame[column].notna()
        cost = frame[column][known].astype(float)
        ax.errorbar(cost, score[known], yerr=std[known], fmt="o", capsize=3)
        for x, y, name in zip(cost, score[known], frame["study"][known], strict=True):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = pareto_front(list(cost), list(score[known]))
        ax.step(cost.iloc[front], score[known].iloc[front], where="post", color="C3", lw=1)
        ax.set_xscale("log" if log else "linear")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"test {metric} (mean +- std over seeds)")
    figure.suptitle("score against cost; red: the Pareto front (no study beats it on both)")
    figure.savefig(path, dpi=100, format="png")  # path may be a scratch file (.partial)
