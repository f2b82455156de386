"""Which trials are best: by dev score (seed reruns' means first), or the Pareto front of
dev score and trainable parameters."""

from __future__ import annotations

import math
import statistics

import optuna

from reftsearch.search.record import TrialRecord, search_trials, unpack_hits


def top_search_trials(study: optuna.Study, k: int | None = None) -> list[optuna.trial.FrozenTrial]:
    """The ``k`` (default: all) best completed search trials by their own (single-seed) dev
    score, the best warm start ahead of the sampled configs that lead it by no more than the
    dev split's noise (``warm_start_kept``).

    The dev score is the first objective, also in a study that trades it off against size.
    """
    completed = ranked(study, completed_search_trials(study))
    return warm_start_kept(study, completed)[:k]


def warm_start_kept(
    study: optuna.Study, trials: list[optuna.trial.FrozenTrial]
) -> list[optuna.trial.FrozenTrial]:
    """``trials`` (best score first) with the best warm start moved ahead of the sampled
    configs whose lead over it is within the standard error over dev examples of their
    paired difference (``rows_noise``).

    A warm start is a config known to work (the paper's recipe, another study's pick); a
    sampled one that beats it by a few dev rows, the best of many draws, is more likely lucky
    than better: on RTE at chance such a pick led the recipe by 6 of 139 selection rows and
    lost 3.6 points on held-out rows (benchmarks/README.md). Where dev hits are not recorded
    (an f1 metric), the scores' order stands.
    """
    first_warm = next(
        (i for i, t in enumerate(trials) if TrialRecord.of(t).warm_start is not None), 0
    )
    if first_warm == 0:  # no warm start, or it leads already
        return trials
    warm = trials[first_warm]
    warm_rows = row_hit_rates(study, warm, {})  # {}: the trial's own seed, as its score
    sign = score_sign(study)
    better, within_noise = [], []
    for trial in trials[:first_warm]:
        noise = rows_noise(warm_rows, row_hit_rates(study, trial, {}))
        lead = sign * (trial.values[0] - warm.values[0])
        (better if noise is None or lead > noise else within_noise).append(trial)
    return [*better, warm, *within_noise, *trials[first_warm + 1 :]]


def best_trials(study: optuna.Study, top: int) -> list[optuna.trial.FrozenTrial]:
    """The ``top`` completed search trials, best first.

    Trials retrained with extra seeds (``finalize``) rank first, by their mean over seeds: a
    single seed's lucky score is not a reason to pick a config. The rest follow by value.
    Of the finalized configs within noise of the best mean (over seeds and, where recorded,
    over dev examples), the smallest leads (``smallest_of_ties``).
    """
    by_score = top_search_trials(study)
    reruns = reruns_by_trial(study)
    summaries = {t.number: s for t in by_score if (s := seed_summary(study, t, reruns))}
    maximize = is_maximized(study)
    finalized = sorted(
        (t for t in by_score if t.number in summaries),
        key=lambda t: summaries[t.number]["mean"],
        reverse=maximize,
    )
    finalized = smallest_of_ties(study, finalized, summaries, maximize, reruns)
    return (finalized + [t for t in by_score if t.number not in summaries])[:top]


def why_it_leads(study: optuna.Study, lead: optuna.trial.FrozenTrial) -> str | None:
    """Why ``lead`` (``best_trials``' first) ranks above a finalized config with a better
    mean (``smallest_of_ties``), or, unfinalized, above a search trial with a better score
    (``warm_start_kept``), when it does; None otherwise."""
    reruns = reruns_by_trial(study)
    lead_summary = seed_summary(study, lead, reruns)
    if lead_summary is None:
        return _warm_start_note(study, lead)
    sign = score_sign(study)
    searched = top_search_trials(study)
    finalized = [(t, s) for t in searched if (s := seed_summary(study, t, reruns)) is not None]
    best, best_summary = max(finalized, key=lambda pair: sign * pair[1]["mean"])
    if sign * (best_summary["mean"] - lead_summary["mean"]) <= 0:
        return None
    return (
        f"fewest trainable parameters ({TrialRecord.of(lead).n_params:,} vs "
        f"{TrialRecord.of(best).n_params:,}) among the configs within noise of the best mean "
        f"(trial {best.number}: {best_summary['mean']:.4f} vs {lead_summary['mean']:.4f})"
    )


def _warm_start_note(study: optuna.Study, lead: optuna.trial.FrozenTrial) -> str | None:
    """Why ``lead``, a warm start, ranks above a search trial with a better score, when it
    does (``warm_start_kept``); None otherwise."""
    recipe = TrialRecord.of(lead).warm_start
    best = ranked(study, completed_search_trials(study))[0]
    sign = score_sign(study)
    if recipe is None or sign * (best.values[0] - lead.values[0]) <= 0:
        return None
    return (
        f"warm start {recipe}, which trial {best.number} leads by no more than the dev "
        f"split's noise ({best.values[0]:.4f} vs {lead.values[0]:.4f})"
    )


def smallest_of_ties(
    study: optuna.Study,
    finalized: list[optuna.trial.FrozenTrial],
    summaries: dict[int, dict],
    maximize: bool,
    reruns: Reruns,
) -> list[optuna.trial.FrozenTrial]:
    """``finalized`` (best mean first) with the config of fewest trainable parameters moved
    to the front among those whose mean is within noise of the best one (``noise_margin``):
    a difference that small says nothing, and the smaller config is cheaper to train, store
    and serve (a study once picked 4x the paper recipe's parameters for such a gain)."""
    if not finalized:
        return finalized
    lead, lead_summary = finalized[0], summaries[finalized[0].number]
    lead_rows = row_hit_rates(study, lead, reruns)
    sign = 1 if maximize else -1
    ties = [
        t
        for t in finalized
        if sign * (lead_summary["mean"] - summaries[t.number]["mean"])
        <= noise_margin(lead_summary, lead_rows, row_hit_rates(study, t, reruns))
    ]
    # min keeps the first of equal sizes: the better mean
    smallest = min(ties, key=lambda t: TrialRecord.of(t).n_params or math.inf)
    return [smallest, *(t for t in finalized if t is not smallest)]


def noise_margin(
    lead_summary: dict, lead_rows: list[float] | None, other_rows: list[float] | None
) -> float:
    """How far a config's mean may trail the lead's and still be noise: the larger of the
    lead's standard error over seeds (``lead_summary``) and, where both recorded which dev
    examples they got right (``row_hit_rates``), the standard error over dev examples of
    their paired difference.

    The seeds' spread alone misses the dev split's own noise, the larger one on small dev
    splits: two configs at chance on 150 dev rows differ by a few rows whatever the seeds
    say, and a search that ranks on such a gap picks by luck.
    """
    seed_error = lead_summary["std"] / math.sqrt(len(lead_summary["seed_scores"]))
    return max(seed_error, rows_noise(lead_rows, other_rows) or 0.0)


def rows_noise(rows: list[float] | None, other_rows: list[float] | None) -> float | None:
    """The standard error over dev examples of two configs' paired difference (each a
    ``row_hit_rates`` list); None where either is not recorded or they differ in length."""
    if rows is None or other_rows is None or len(rows) != len(other_rows):
        return None
    gaps = [a - b for a, b in zip(rows, other_rows, strict=True)]
    return statistics.stdev(gaps) / math.sqrt(len(gaps))


def row_hit_rates(
    study: optuna.Study, trial: optuna.trial.FrozenTrial, reruns: Reruns | None = None
) -> list[float] | None:
    """Per dev example, the share of the trial's seeds (its own and its reruns) that got it
    right; None unless every seed recorded its hits (share-of-right metrics only) on at
    least two examples."""
    runs = seed_runs(study, trial, reruns).values()
    packed = [TrialRecord.of(run).dev_hits for run in runs]
    if any(text is None for text in packed):
        return None
    hits = [unpack_hits(text) for text in packed]
    if len({len(h) for h in hits}) != 1 or len(hits[0]) < 2:
        return None
    return [statistics.fmean(row) for row in zip(*hits, strict=True)]


def is_maximized(study: optuna.Study) -> bool:
    """Whether the dev score (the first objective) is to be maximised."""
    return study.directions[0] == optuna.study.StudyDirection.MAXIMIZE


def score_sign(study: optuna.Study) -> int:
    """1 where a higher dev score is better, -1 where a lower one is: ``sign * score``
    grows with quality either way."""
    return 1 if is_maximized(study) else -1


def completed_search_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The search trials that completed (not pruned, failed or running), in trial order."""
    return search_trials(study, (optuna.trial.TrialState.COMPLETE,))


def ranked(
    study: optuna.Study, trials: list[optuna.trial.FrozenTrial]
) -> list[optuna.trial.FrozenTrial]:
    """Completed ``trials`` best dev score first; of equal scores, the earlier trial first."""
    sign = score_sign(study)
    return sorted(trials, key=lambda t: (-sign * t.values[0], t.number))


def is_pareto(study: optuna.Study) -> bool:
    return len(study.directions) > 1


def pareto_front(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Completed search trials no other beats on dev score and trainable parameters both,
    fewest parameters first (in a one-objective study too: what each parameter buys)."""
    size = {}  # trial number -> trainable parameters
    completed = []
    for t in completed_search_trials(study):
        n_params = TrialRecord.of(t).n_params
        if n_params is not None:
            size[t.number] = n_params
            completed.append(t)
    sign = score_sign(study)

    def dominates(a: optuna.trial.FrozenTrial, b: optuna.trial.FrozenTrial) -> bool:
        score_a, score_b = sign * a.values[0], sign * b.values[0]
        size_a, size_b = size[a.number], size[b.number]
        return score_a >= score_b and size_a <= size_b and (score_a > score_b or size_a < size_b)

    front = [t for t in completed if not any(dominates(o, t) for o in completed)]
    return sorted(front, key=lambda t: (size[t.number], -sign * t.values[0], t.number))


Reruns = dict[int, dict[int, optuna.trial.FrozenTrial]]


def reruns_by_trial(study: optuna.Study) -> Reruns:
    """The completed finalize reruns of each search trial, by seed, in one pass over the
    study: ranking N trials asks for each one's reruns (N passes took seconds at 1,000)."""
    reruns: Reruns = {}
    for other in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        rerun = TrialRecord.of(other)
        if rerun.finalize_of is not None:
            reruns.setdefault(rerun.finalize_of, {})[rerun.seed] = other
    return reruns


def seed_runs(
    study: optuna.Study, trial: optuna.trial.FrozenTrial, reruns: Reruns | None = None
) -> dict[int, optuna.trial.FrozenTrial]:
    """The completed runs of a search trial's config per seed: its own, then its finalize
    reruns (``reruns``, else read from ``study``; a rerun with the search's own seed, in
    float32 after a 16-bit search, replaces the search's run)."""
    runs = {TrialRecord.of(trial).config["seed"]: trial}
    runs.update((reruns_by_trial(study) if reruns is None else reruns).get(trial.number, {}))
    return runs


def seed_scores(
    study: optuna.Study, trial: optuna.trial.FrozenTrial, reruns: Reruns | None = None
) -> dict[int, float]:
    """Dev score per seed for a search trial: its own run plus its finalize runs."""
    return {seed: run.values[0] for seed, run in seed_runs(study, trial, reruns).items()}


def seed_summary(
    study: optuna.Study, trial: optuna.trial.FrozenTrial, reruns: Reruns | None = None
) -> dict | None:
    """``{seed_scores, mean, std}`` when the trial was rerun with other seeds, else None."""
    scores = seed_scores(study, trial, reruns)
    if len(scores) < 2:
        return None
    values = list(scores.values())
    return {
        "seed_scores": {str(seed): score for seed, score in sorted(scores.items())},
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values),
    }
