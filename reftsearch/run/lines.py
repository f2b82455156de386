"""What a run prints: one line per finished trial, with the best so far and the time left.

In this process the lines come from Optuna's callbacks; in a Ray run the driver finds the
trials its workers finished by polling the storage (``StoragePrinter``).
"""

from __future__ import annotations

import time

import optuna

from reftsearch.progress import Log, format_duration
from reftsearch.search.ranking import ranked, top_search_trials
from reftsearch.search.record import TrialRecord, describe_config, search_trials
from reftsearch.search.study import FINISHED_STATES, budget_trials


def print_now(line: str) -> None:
    """Progress lines reach a redirected log (``> run.log``) as they happen, not in blocks."""
    print(line, flush=True)


class StoragePrinter:
    """Prints, through ``printer``, the search trials that finished since the last poll."""

    def __init__(self, study: optuna.Study, printer: ProgressPrinter) -> None:
        self.study = study
        self.printer = printer
        self.seen = {t.number for t in search_trials(study, FINISHED_STATES)}

    def poll(self) -> None:
        new = [t for t in search_trials(self.study, FINISHED_STATES) if t.number not in self.seen]
        for trial in sorted(new, key=lambda t: t.datetime_complete):
            self.seen.add(trial.number)
            self.printer(self.study, trial)


def finished_by(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> int:
    """The trials counted toward the budget that finished no later than ``trial``: its place
    in the run, whenever its line is printed (packed trials end together, and each one's
    callback would otherwise count the others too; a poll finds several at once)."""
    return sum(c.datetime_complete <= trial.datetime_complete for c in budget_trials(study))


class ProgressPrinter:
    """One line per finished trial: outcome, dev score, best so far, config, time, and the
    time the trials still to run should take at the pace of those finished since it started
    (wall clock: right for several workers and packed trials alike)."""

    def __init__(self, n_trials: int, log: Log, finalize: bool = False) -> None:
        self.n_trials = n_trials
        self.log = log
        self.finalize = finalize
        self.printed = 0
        self.started = time.monotonic()

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        record = TrialRecord.of(trial)
        if record.unrun is not None:  # asked in a race between workers, never run
            return
        self.printed += 1
        done = self.printed if self.finalize else finished_by(study, trial)
        if trial.state == optuna.trial.TrialState.COMPLETE:
            outcome = f"dev={trial.values[0]:.4f}"
        elif record.invalid_reason is not None:
            outcome = f"not trained, invalid config: {record.invalid_reason}"
        elif trial.state == optuna.trial.TrialState.PRUNED:
            outcome = f"pruned {record.pruned or ''}".rstrip()
        else:
            # no reason recorded: the worker died mid-trial and its heartbeat stopped
            reason = record.fail_reason or f"worker {record.worker or '?'} stopped"
            outcome = f"FAILED: {reason}"
        n_params = "?" if record.n_params is None else record.n_params
        self.log(
            f"[{done}/{self.n_trials}] trial {trial.number}{_origin(trial, record)}: {outcome} | "
            f"{_best(study)} | {describe_config(record.config)} | "
            f"{n_params} params | {record.wall_time_s or 0:.1f}s"
            f"{self._time_left(done)}"
        )

    def _time_left(self, done: int) -> str:
        left = self.n_trials - done
        if left <= 0:
            return ""
        pace = (time.monotonic() - self.started) / self.printed
        return f" | ~{format_duration(left * pace)} left"


def _origin(trial: optuna.trial.FrozenTrial, record: TrialRecord) -> str:
    """Where a trial's config came from, when not from the sampler."""
    if "failed_trial" in trial.system_attrs:  # set by RetryHeartbeatStaleTrialCallback
        return f" (retry of trial {trial.system_attrs['failed_trial']})"
    if record.finalize_of is not None:
        return f" (trial {record.finalize_of} with seed {record.seed})"
    if record.copied_from is not None:
        return f" (same config as trial {record.copied_from}: result copied)"
    if record.warm_start is not None:
        return f" (warm start {record.warm_start})"
    return ""


def _best(study: optuna.Study) -> str:
    """The search's pick so far; where a warm start keeps the lead within noise
    (``warm_start_kept``), the better score it keeps it against too."""
    ranking = top_search_trials(study)
    if not ranking:
        return "best: none yet"
    lead, top = ranking[0], ranked(study, ranking)[0]
    kept = f", a warm start; #{top.number}'s {top.values[0]:.4f} is within noise"
    return f"best={lead.values[0]:.4f} (#{lead.number}{kept if top is not lead else ''})"
