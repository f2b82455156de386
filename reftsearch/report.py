"""Reading a study back: the best trials as plain dicts and as a text table."""

from __future__ import annotations

import optuna

from reftsearch.finalize import seed_summary, top_search_trials
from reftsearch.reft import describe_config


def best_trials(study: optuna.Study, top: int) -> list[optuna.trial.FrozenTrial]:
    """The ``top`` completed search trials, best first.

    Trials retrained with extra seeds (``finalize``) rank first, by their mean over seeds: a
    single seed's lucky score is not a reason to pick a config. The rest follow by value.
    """
    ranked = top_search_trials(study, len(study.trials))
    means = {t.number: s["mean"] for t in ranked if (s := seed_summary(study, t)) is not None}
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    finalized = sorted(
        (t for t in ranked if t.number in means), key=lambda t: means[t.number], reverse=maximize
    )
    return (finalized + [t for t in ranked if t.number not in means])[:top]


def trial_summary(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict:
    attrs = trial.user_attrs
    summary = {
        "number": trial.number,
        "value": trial.value,
        "params": trial.params,
        "n_params": attrs.get("n_params"),
        "config": attrs.get("config", {}),
        "wall_time_s": attrs.get("wall_time_s"),
        "worker": attrs.get("worker"),
    }
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
