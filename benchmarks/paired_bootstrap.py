"""A paired bootstrap interval for the accuracy difference of two arms scored on the same rows.

The statistic: for each task, each seed's accuracy difference ``b - a`` on the task's
report-half rows, averaged over the seeds; then averaged over the tasks (each task weighs the
same, whatever its number of rows), in accuracy points.

What is resampled: the report-half rows, within each task. One replicate draws, for each task
independently, as many rows as the task has, uniformly with replacement, and scores both arms
and every seed on those same drawn rows. Pairing by row keeps what the two arms share (an easy
row is easy for both), so the interval is about their difference, not about each one's
score. The seeds are scored on the very same rows, so one draw serves them all: drawing rows
again per seed would count each row as three independent pieces of evidence and narrow the
interval. Tasks and seeds are not resampled: the interval says how much the result depends on
which held-out rows were drawn, for these tasks and these training seeds (the seeds' own
spread shows in the per-task table).

The interval is the percentile one: the 2.5th and 97.5th percentiles of the replicates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Hits = Sequence[bool]  # one arm, one seed: whether each report row was right, in row order


@dataclass(frozen=True)
class TaskPairs:
    """One task's report-half hits: per seed, (arm a's, arm b's), over the same rows."""

    name: str
    seeds: Mapping[int, tuple[Hits, Hits]]

    def row_differences(self) -> np.ndarray:
        """Per row, ``b - a`` (1, 0 or -1) averaged over the seeds."""
        pairs = list(self.seeds.values())
        if not pairs:
            raise ValueError(f"task {self.name}: no seeds")
        lengths = {len(hits) for pair in pairs for hits in pair}
        if len(lengths) != 1:
            raise ValueError(f"task {self.name}: arms and seeds must score the same rows")
        a = np.array([pair[0] for pair in pairs], dtype=float)
        b = np.array([pair[1] for pair in pairs], dtype=float)
        return (b - a).mean(axis=0)

    def standard_error(self) -> float:
        """How far the task's mean difference (in points) moves with the rows drawn: the
        standard deviation of its row differences over the square root of their number, the
        spread the bootstrap's draws of this task have."""
        differences = self.row_differences()
        return float(100 * differences.std() / np.sqrt(len(differences)))


@dataclass(frozen=True)
class Interval:
    mean: float  # the statistic on the rows as drawn, in points
    low: float
    high: float

    def line(self, name: str) -> str:
        return f"{name}={self.mean:+.1f} ci95=[{self.low:+.1f},{self.high:+.1f}]"


def standard_error_of_mean(tasks: Sequence[TaskPairs]) -> float:
    """The standard error (in points) of the mean over tasks: each task's, combined as the
    tasks' rows are drawn independently. An interval clears 0 only where the mean is about
    twice this, so it says which mean a benchmark of these rows can tell from noise."""
    return float(np.sqrt(sum(task.standard_error() ** 2 for task in tasks)) / len(tasks))


def paired_bootstrap(
    tasks: Sequence[TaskPairs], resamples: int = 10_000, seed: int = 0, level: float = 0.95
) -> Interval:
    """The mean of ``b - a`` over tasks (accuracy points) and its percentile interval."""
    if not tasks:
        raise ValueError("paired_bootstrap: no tasks")
    rng = np.random.default_rng(seed)
    observed, replicates = 0.0, np.zeros(resamples)
    for task in tasks:
        differences = task.row_differences()
        rows = len(differences)
        observed += differences.mean()
        # each replicate's mean over rows drawn with replacement, by how often each row is drawn
        counts = rng.multinomial(rows, np.full(rows, 1 / rows), size=resamples)
        replicates += counts @ differences / rows
    observed, replicates = 100 * observed / len(tasks), 100 * replicates / len(tasks)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return Interval(float(observed), float(low), float(high))
