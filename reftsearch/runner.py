"""Run a study: trials pulled from the Optuna study until its budget of finished trials is met.

The budget counts finished trials (complete, pruned or failed) across every process that
works on the study, so running the same study again resumes it instead of starting over.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import optuna

from reftsearch.estimate import estimate_study
from reftsearch.finalize import FINALIZE_OF, SEED, enqueue_finalize, top_search_trials
from reftsearch.objective import Objective, TrialFailed
from reftsearch.reft import describe_config
from reftsearch.spec import StudySpec
from reftsearch.storage import check_storage, mask_url
from reftsearch.study import PreparedStudy, count_finished, open_study, prepare
from reftsearch.warmstart import Recipe, enqueue_warm_starts, paper_recipes, study_recipes

Log = Callable[[str], None]


def run_study(
    spec: StudySpec, storage_url: str, n_trials: int | None = None, log: Log = print
) -> optuna.Study:
    """Validate everything, then run trials in this process until ``n_trials`` have finished."""
    n_trials = n_trials or spec.budget.n_trials
    check_storage(storage_url)
    start = time.perf_counter()
    prepared = prepare(spec)
    log(
        f"loaded {spec.model.path} ({prepared.base.num_layers} layers, hidden "
        f"{prepared.base.hidden_size}) and {len(prepared.split.train)} train / "
        f"{len(prepared.split.dev)} dev examples in {time.perf_counter() - start:.1f}s"
    )
    study = open_study(spec, storage_url)
    optuna.storages.fail_stale_trials(study)
    done = count_finished(study)
    log(f"study {spec.name!r} on {mask_url(storage_url)}: {done} of {n_trials} trials finished")
    if done < n_trials:
        log(estimate_study(prepared, n_trials - done, workers=1, samples=3).line())
        enqueue_warm_starts(
            study,
            warm_start_recipes(spec, storage_url, prepared),
            spec.space,
            prepared.base.num_layers,
            log,
        )
        run_trials(study, prepared, n_trials, log)
    elif not spec.finalize:
        log("nothing to do: the budget is already met (raise --n-trials to continue)")
    if spec.finalize and count_finished(study) >= n_trials:
        run_finalize(study, prepared, log)
    return study


def warm_start_recipes(spec: StudySpec, storage_url: str, prepared: PreparedStudy) -> list[Recipe]:
    recipes: list[Recipe] = []
    for source in spec.warm_start:
        if source.recipes:
            recipes += paper_recipes(spec.task.kind, prepared.base.num_layers)
        else:
            recipes += study_recipes(source.study, source.storage or storage_url, source.top_k)
    return recipes


def run_finalize(study: optuna.Study, prepared: PreparedStudy, log: Log) -> None:
    """Retrain the top configs with the extra seeds (only the runs still missing)."""
    waiting = enqueue_finalize(study, prepared.spec.finalize, log)
    if waiting:
        log(f"finalize: {waiting} runs of the top configs with other seeds")
        study.optimize(
            Objective(prepared, log),
            n_trials=waiting,
            callbacks=[ProgressPrinter(waiting, log, finalize=True)],
            catch=(TrialFailed,),
        )


def run_trials(study: optuna.Study, prepared: PreparedStudy, n_trials: int, log: Log) -> None:
    """Optimise in this process until the study holds ``n_trials`` finished trials."""
    spec = prepared.spec
    study.optimize(
        Objective(prepared, log),
        n_trials=n_trials - count_finished(study),
        timeout=spec.budget.timeout,
        callbacks=[StopAtBudget(n_trials), ProgressPrinter(n_trials, log)],
        catch=(TrialFailed,),
    )


class StopAtBudget:
    """Stop once the study (all its workers together) holds ``n_trials`` finished search
    trials; like Optuna's MaxTrialsCallback, but finalize runs do not count."""

    def __init__(self, n_trials: int) -> None:
        self.n_trials = n_trials

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if count_finished(study) >= self.n_trials:
            study.stop()


class ProgressPrinter:
    """One line per finished trial: outcome, dev score, best so far, config, time."""

    def __init__(self, n_trials: int, log: Log, finalize: bool = False) -> None:
        self.n_trials = n_trials
        self.log = log
        self.finalize = finalize
        self.printed = 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.printed += 1
        done = self.printed if self.finalize else count_finished(study)
        attrs = trial.user_attrs
        if trial.state == optuna.trial.TrialState.COMPLETE:
            outcome = f"dev={trial.value:.4f}"
        elif "invalid_reason" in attrs:
            outcome = f"not trained, invalid config: {attrs['invalid_reason']}"
        elif trial.state == optuna.trial.TrialState.PRUNED:
            last = trial.intermediate_values.get(attrs.get("pruned_at_epoch"))
            outcome = f"pruned at epoch {attrs.get('pruned_at_epoch')}" + (
                f" (dev={last:.4f})" if last is not None else ""
            )
        else:
            outcome = f"FAILED: {attrs.get('fail_reason', 'see log')}"
        self.log(
            f"[{done}/{self.n_trials}] trial {trial.number}{_origin(attrs)}: {outcome} | "
            f"{_best(study)} | {describe_config(attrs.get('config', {}))} | "
            f"{attrs.get('n_params', '?')} params | {attrs.get('wall_time_s', 0):.1f}s"
        )


def _origin(attrs: dict) -> str:
    """Where a trial's config came from, when not from the sampler."""
    if FINALIZE_OF in attrs:
        return f" (trial {attrs[FINALIZE_OF]} with seed {attrs[SEED]})"
    if "copied_from" in attrs:
        return f" (same config as trial {attrs['copied_from']}: result copied)"
    if "warm_start" in attrs:
        return f" (warm start {attrs['warm_start']})"
    return ""


def _best(study: optuna.Study) -> str:
    best = top_search_trials(study, 1)
    return f"best={best[0].value:.4f} (#{best[0].number})" if best else "best: none yet"
