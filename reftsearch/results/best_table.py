"""Reading a study back: the best trials (or the Pareto front) as plain dicts, a text table,
and every trial as one pandas row (for the HTML report, CSV files and notebooks)."""

from __future__ import annotations

import optuna
import pandas as pd

from reftsearch.search.majority_baseline import majority_note
from reftsearch.search.ranking import is_pareto, seed_summary, why_it_leads
from reftsearch.search.record import TrialRecord, describe_config, readable_columns

# what the plots read even from a study without trials
EMPTY_FRAME_COLUMNS = (
    "number", "state", "score", "n_params", "last_dev_score", "finalize_of", "started", "finished"
)  # fmt: skip
CSV_MARK = "number,state,score,"  # how every trials table (best --csv, a report's) begins
BY_MEAN = "mean dev score over seeds"
TRAINING_COLUMNS = ("dropout", "lr", "epochs", "batch_size", "warmup_ratio", "weight_decay", "seed")


def best_summaries(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> list[dict]:
    """``trial_summary`` of each of ``trials`` (``best_trials``' order), the first one's
    ``picked_by`` saying why it leads a config with a better mean, if it does, and its
    ``not_learned`` why it has not shown it learned the task, if it has not (one objective)."""
    summaries = [trial_summary(study, t) for t in trials]
    if not trials:
        return summaries
    notes = {
        "picked_by": why_it_leads(study, trials[0]),
        # a front's first is its smallest config, not the study's best: no verdict on the task
        "not_learned": None if is_pareto(study) else majority_note(study, trials[0]),
    }
    summaries[0].update((key, note) for key, note in notes.items() if note is not None)
    return summaries


def trial_summary(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict:
    record = TrialRecord.of(trial)
    summary = {
        "number": trial.number,
        "value": trial.values[0],  # the dev score
        "params": trial.params,
        "n_params": record.n_params,
        "config": record.config or {},
        "wall_time_s": record.wall_time_s,
        "worker": record.worker,
    }
    if len(trial.values) > 1:
        summary["values"] = trial.values
    seeds = seed_summary(study, trial)
    if seeds is not None:
        summary.update(seeds, picked_by=BY_MEAN)
    return summary


def format_table(summaries: list[dict], metric: str) -> str:
    header = f"{'rank':>4}  {'trial':>5}  {metric:>9}  {'params':>8}  config"
    rows = [
        f"{rank:>4}  {s['number']:>5}  {s['value']:>9.4f}  {s['n_params'] or 0:>8}  "
        f"{describe_config(s['config'])}"
        + (
            f"  mean={s['mean']:.4f}+-{s['std']:.4f} over {len(s['seed_scores'])} seeds"
            if "mean" in s
            else ""
        )
        + (f"  test={s['test_score']:.4f}" if "test_score" in s else "")
        for rank, s in enumerate(summaries, 1)
    ]
    return "\n".join([header, *rows, *lead_notes(summaries)])


def lead_notes(summaries: list[dict]) -> list[str]:
    """What to know of the first of ``summaries`` (``best_summaries``): why it ranks first,
    when its mean is not the best, and that it has not shown it learned the task, when so."""
    lead = summaries[0] if summaries else {}
    notes = []
    if lead.get("picked_by", BY_MEAN) != BY_MEAN:
        notes.append(f"trial {lead['number']} ranks first: {lead['picked_by']}")
    if "not_learned" in lead:
        notes.append(f"warning: {lead['not_learned']}")
    return notes


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: state, dev score, size, the resolved config as flat columns, time."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        record = TrialRecord.of(t)
        config = record.config or {}
        curve = record.dev_curve or [v for _, v in sorted(t.intermediate_values.items())]
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "score": t.values[0] if t.values else None,
                "dtype": record.dtype,  # a 16-bit search's scores beside its float32 reruns'
                "n_params": record.n_params,
                **(readable_columns(config) if config else {}),
                **{key: config[key] for key in TRAINING_COLUMNS if key in config},
                "epochs_trained": record.epochs_trained,
                "last_dev_score": curve[-1] if curve else None,
                "pruned_at_epoch": record.pruned_at_epoch,
                "wall_time_s": record.wall_time_s,
                "worker": record.worker,
                "finalize_of": record.finalize_of,
                "note": record.invalid_reason or record.fail_reason or record.unrun,
                "started": t.datetime_start,
                "finished": t.datetime_complete,
            }
        )
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=EMPTY_FRAME_COLUMNS)
