"""Reading a study back: the best trials (or the Pareto front) as plain dicts, a text table,
and every trial as one pandas row (for the HTML report, CSV files and notebooks)."""

from __future__ import annotations

import optuna
import pandas as pd

from reftsearch.search.describe import describe_config, readable_attrs
from reftsearch.search.seed_reruns import (
    FINALIZE_OF,
    PAST_BUDGET,
    is_search_trial,
    seed_summary,
    top_search_trials,
)

# what the plots read even from a study without trials
EMPTY_FRAME_COLUMNS = (
    "number", "state", "score", "n_params", "last_dev_score", "started", "finished"
)  # fmt: skip
TRAINING_COLUMNS = ("dropout", "lr", "epochs", "batch_size", "warmup_ratio", "weight_decay", "seed")


def best_trials(study: optuna.Study, top: int) -> list[optuna.trial.FrozenTrial]:
    """The ``top`` completed search trials, best first.

    Trials retrained with extra seeds (``finalize``) rank first, by their mean over seeds: a
    single seed's lucky score is not a reason to pick a config. The rest follow by value.
    """
    ranked = top_search_trials(study, len(study.trials))
    means = {t.number: s["mean"] for t in ranked if (s := seed_summary(study, t)) is not None}
    maximize = is_maximized(study)
    finalized = sorted(
        (t for t in ranked if t.number in means), key=lambda t: means[t.number], reverse=maximize
    )
    return (finalized + [t for t in ranked if t.number not in means])[:top]


def trial_summary(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict:
    attrs = trial.user_attrs
    summary = {
        "number": trial.number,
        "value": trial.values[0],  # the dev score
        "params": trial.params,
        "n_params": attrs.get("n_params"),
        "config": attrs.get("config", {}),
        "wall_time_s": attrs.get("wall_time_s"),
        "worker": attrs.get("worker"),
    }
    if len(trial.values) > 1:
        summary["values"] = trial.values
    seeds = seed_summary(study, trial)
    if seeds is not None:
        summary.update(seeds, picked_by="mean dev score over seeds")
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
    return "\n".join([header, *rows])


def is_maximized(study: optuna.Study) -> bool:
    """Whether the dev score (the first objective) is to be maximised."""
    return study.directions[0] == optuna.study.StudyDirection.MAXIMIZE


def is_pareto(study: optuna.Study) -> bool:
    return len(study.directions) > 1


def pareto_front(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Completed search trials no other beats on dev score and trainable parameters both,
    fewest parameters first (in a one-objective study too: what each parameter buys)."""
    completed = [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if is_search_trial(t) and t.user_attrs.get("n_params") is not None
    ]
    sign = 1 if is_maximized(study) else -1

    def dominates(a: optuna.trial.FrozenTrial, b: optuna.trial.FrozenTrial) -> bool:
        score_a, score_b = sign * a.values[0], sign * b.values[0]
        size_a, size_b = a.user_attrs["n_params"], b.user_attrs["n_params"]
        return score_a >= score_b and size_a <= size_b and (score_a > score_b or size_a < size_b)

    front = [t for t in completed if not any(dominates(o, t) for o in completed)]
    return sorted(front, key=lambda t: (t.user_attrs["n_params"], -sign * t.values[0], t.number))


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: state, dev score, size, the resolved config as flat columns, time."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        attrs, config = t.user_attrs, t.user_attrs.get("config", {})
        curve = attrs.get("dev_curve") or [v for _, v in sorted(t.intermediate_values.items())]
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "score": t.values[0] if t.values else None,
                "n_params": attrs.get("n_params"),
                **(readable_attrs(config) if config else {}),
                **{key: config[key] for key in TRAINING_COLUMNS if key in config},
                "epochs_trained": attrs.get("epochs_trained"),
                "last_dev_score": curve[-1] if curve else None,
                "pruned_at_epoch": attrs.get("pruned_at_epoch"),
                "wall_time_s": attrs.get("wall_time_s"),
                "worker": attrs.get("worker"),
                "finalize_of": attrs.get(FINALIZE_OF),
                "note": attrs.get("invalid_reason")
                or attrs.get("fail_reason")
                or attrs.get(PAST_BUDGET),
                "started": t.datetime_start,
                "finished": t.datetime_complete,
            }
        )
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=EMPTY_FRAME_COLUMNS)
