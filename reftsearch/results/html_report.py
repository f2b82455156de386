"""A study -> ``index.html`` with PNG plots, the top trials, and ``trials.csv``, all offline.

Plots are drawn with matplotlib's object API (``Figure``, no pyplot): nothing global changes,
no display is needed. The page references only files written next to it (no CDN), so the
directory can be zipped, mailed or opened from a laptop without network. A plot that the
study cannot support yet (too few trials, nothing varied) becomes a sentence saying why.
"""

from __future__ import annotations

import html
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from reftsearch.errors import BadInputError
from reftsearch.own_files import holds
from reftsearch.results.best_table import best_summaries, lead_notes, trials_frame
from reftsearch.search.ranking import best_trials, is_maximized, is_pareto, pareto_front
from reftsearch.search.record import TrialRecord, describe_config

TOP_TRIALS = 10
STATE_COLOURS = {"COMPLETE": "tab:blue", "PRUNED": "tab:orange", "FAIL": "tab:red"}


@dataclass(frozen=True)
class Section:
    title: str
    caption: str
    image: str | None = None  # file name next to index.html
    note: str | None = None  # why there is no image


def write_report(study: optuna.Study, out_dir: Path) -> Path:
    """Write ``out_dir/index.html``, its PNGs and ``trials.csv``; returns the HTML path.

    They are written into a folder beside ``out_dir`` first, then moved in, the page last:
    a failure while writing (a full disk) leaves an earlier report there whole, where it
    had left a truncated plot beside the new table and the old page."""
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = _scratch_folder(out_dir)
    try:
        _write_files(study, scratch)
        for name in sorted(os.listdir(scratch), key=lambda name: name == "index.html"):
            os.replace(scratch / name, out_dir / name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out_dir / "index.html"


def _scratch_folder(out_dir: Path) -> Path:
    """A new folder beside ``out_dir``, or in it where its parent cannot be written (a
    leftover of a killed report there is not taken for a file of the user's)."""
    try:  # ``--out .`` has no name of its own: its absolute path has
        return Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=out_dir.absolute().parent))
    except PermissionError:
        return Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=out_dir))


def _write_files(study: optuna.Study, out_dir: Path) -> None:
    frame = trials_frame(study)
    frame.to_csv(out_dir / "trials.csv", index=False)
    metric = study.user_attrs.get("metric", "dev score")
    search, reruns = split_reruns(frame)
    done = search[search["state"] == "COMPLETE"]
    sections = [
        _save(
            out_dir,
            "history.png",
            "Optimisation history",
            f"Dev {metric} of each search trial by trial number; the line is the best so far. "
            "Pruned trials sit at their last dev score. Finalize's seed reruns (hollow) repeat "
            "a config with another seed: not search progress.",
            _history(search, reruns, metric, is_maximized(study)),
        ),
        _save(
            out_dir,
            "layers_positions.png",
            "Dev score by layer set and positions",
            f"Best dev {metric} of the completed search trials for each layer set (rows) and "
            "intervened positions (columns); the number of trials is in brackets.",
            _heatmap(done, metric),
        ),
        _save(
            out_dir,
            "rank.png",
            "Score vs rank",
            f"Dev {metric} of completed search trials by rank.",
            _by_rank(done, metric),
        ),
        _save(
            out_dir,
            "params.png",
            "Pareto front: score vs trainable parameters"
            if is_pareto(study)
            else "Score vs trainable parameters",
            f"Dev {metric} against trainable parameters (log scale). The line joins the "
            "Pareto front: no other trial is both better and smaller. Finalize's seed reruns "
            "are hollow.",
            _by_params(done, reruns, metric, pareto_front(study)),
        ),
        _save(
            out_dir,
            "importances.png",
            "Parameter importances",
            "How much of the dev score's variance each searched parameter explains "
            "(Optuna's fANOVA, over completed trials).",
            _importances(study),
        ),
        _save(
            out_dir,
            "states.png",
            "Completed and pruned trials over time",
            "Finished trials by outcome, counted up against minutes since the first start.",
            _states(frame),
        ),
    ]
    (out_dir / "index.html").write_text(_page(study, frame, sections, _top_table(study)))


def _save(out_dir: Path, name: str, title: str, caption: str, drawn: Figure | str) -> Section:
    if isinstance(drawn, str):
        (out_dir / name).unlink(missing_ok=True)  # a stale plot from an earlier report
        return Section(title, caption, note=drawn)
    drawn.savefig(out_dir / name, dpi=110)
    return Section(title, caption, image=name)


def _figure(width: float = 7.5, height: float = 4.2) -> tuple[Figure, object]:
    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.add_subplot()


def split_reruns(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The search's trials, and finalize's completed seed reruns (``finalize_of`` set): a
    rerun's score measures seed variance, so a lucky one is neither progress nor the pick."""
    rerun = frame["finalize_of"].notna()
    return frame[~rerun], frame[rerun & (frame["state"] == "COMPLETE")]


def best_so_far(search: pd.DataFrame, maximize: bool) -> pd.Series:
    """The best completed search trial's score after each completed search trial."""
    scores = search[search["state"] == "COMPLETE"]["score"]
    return scores.cummax() if maximize else scores.cummin()


def _history(
    search: pd.DataFrame, reruns: pd.DataFrame, metric: str, maximize: bool
) -> Figure | str:
    scored = search[search["state"].isin(["COMPLETE", "PRUNED"]) & search["last_dev_score"].notna()]
    if scored.empty:
        return "No trial has a dev score yet."
    figure, ax = _figure()
    for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
        rows = scored[scored["state"] == state]
        if rows.empty:
            continue
        column = "score" if state == "COMPLETE" else "last_dev_score"
        ax.scatter(
            rows["number"],
            rows[column],
            marker=marker,
            color=STATE_COLOURS[state],
            label=state.lower(),
        )
    _draw_reruns(ax, reruns, "number")
    running = best_so_far(search, maximize)
    if not running.empty:
        # carried on to the last trial: later pruned trials did not change the best
        numbers = [*search.loc[running.index, "number"], search["number"].max()]
        ax.step(
            numbers, [*running, running.iloc[-1]], where="post", color="black", label="best so far"
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="trial", ylabel=f"dev {metric}")
    ax.legend(loc="best")
    return figure


def _heatmap(done: pd.DataFrame, metric: str) -> Figure | str:
    if done.empty or "positions" not in done or done["positions"].isna().all():
        return "No completed ReFT trial yet (LoRA trials have no layer set or positions)."
    reft = done[done["positions"].notna()]
    best = reft.pivot_table(index="layers", columns="positions", values="score", aggfunc="max")
    counts = reft.pivot_table(index="layers", columns="positions", values="score", aggfunc="size")
    figure, ax = _figure(max(5.0, 1.3 * best.shape[1] + 3), max(3.0, 0.6 * best.shape[0] + 1.5))
    image = ax.imshow(best.to_numpy(dtype=float), cmap="viridis", aspect="auto")
    ax.set_xticks(range(best.shape[1]), best.columns)
    ax.set_yticks(range(best.shape[0]), best.index)
    ax.set(xlabel="positions", ylabel="layers")
    for (i, j), value in np.ndenumerate(best.to_numpy(dtype=float)):
        if not np.isnan(value):
            ax.text(
                j,
                i,
                f"{value:.3f}\n({int(counts.iloc[i, j])})",
                ha="center",
                va="center",
                color="black" if image.norm(value) > 0.5 else "white",  # readable on viridis
                fontsize=9,
            )
    figure.colorbar(image, ax=ax, label=f"best dev {metric}")
    return figure


def _by_rank(done: pd.DataFrame, metric: str) -> Figure | str:
    if done.empty:
        return "No completed trial yet."
    if "rank" not in done or done["rank"].isna().all():
        return "No trial has a rank (full fine-tuning trains every weight)."
    figure, ax = _figure()
    for kind, rows in done.groupby("type"):
        ax.scatter(rows["rank"], rows["score"], label=kind, alpha=0.8)
    ax.set_xscale("log", base=2)
    ranks = sorted(done["rank"].dropna().unique())
    ax.set_xticks(ranks, [str(int(r)) for r in ranks])
    ax.set(xlabel="rank", ylabel=f"dev {metric}")
    ax.legend(title="type")
    return figure


def _draw_reruns(ax: object, reruns: pd.DataFrame, x: str) -> None:
    if not reruns.empty:
        ax.scatter(
            reruns[x],
            reruns["score"],
            marker="D",
            facecolors="none",
            edgecolors="tab:gray",
            label="seed rerun (finalize)",
        )


def _by_params(
    done: pd.DataFrame,
    reruns: pd.DataFrame,
    metric: str,
    front: list[optuna.trial.FrozenTrial],
) -> Figure | str:
    if done.empty or done["n_params"].isna().all():
        return "No completed trial yet."
    figure, ax = _figure()
    for kind, rows in done.groupby("type"):
        ax.scatter(rows["n_params"], rows["score"], label=kind, alpha=0.8)
    _draw_reruns(ax, reruns, "n_params")
    if front:
        ax.plot(
            [TrialRecord.of(t).n_params for t in front],
            [t.values[0] for t in front],
            color="black",
            marker="D",
            markerfacecolor="none",
            label="Pareto front",
        )
        for t in front:
            ax.annotate(
                f"#{t.number}",
                (TrialRecord.of(t).n_params, t.values[0]),
                fontsize=8,
                textcoords="offset points",
                xytext=(4, 4),
            )
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters", ylabel=f"dev {metric}")
    ax.legend()
    return figure


def _importances(study: optuna.Study) -> Figure | str:
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(completed) < 2:
        return f"Needs at least 2 completed trials, the study has {len(completed)}."
    try:
        importances = optuna.importance.get_param_importances(
            study,
            evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
            target=lambda t: t.values[0],
        )
    except (ValueError, RuntimeError) as err:  # e.g. no parameter varied among them
        return f"Optuna could not compute importances yet: {err}"
    if not importances:
        return "No searched parameter varied among the completed trials."
    names = list(importances)[::-1]
    figure, ax = _figure(7.5, max(2.5, 0.4 * len(names) + 1))
    ax.barh(names, [importances[n] for n in names], color="tab:green")
    ax.set(xlabel="importance (share of variance)")
    return figure


def _states(frame: pd.DataFrame) -> Figure | str:
    finished = frame[frame["finished"].notna() & frame["state"].isin(list(STATE_COLOURS))]
    if finished.empty:
        return "No trial has finished yet."
    start = frame["started"].dropna().min()
    figure, ax = _figure()
    for state, colour in STATE_COLOURS.items():
        rows = finished[finished["state"] == state].sort_values("finished")
        if rows.empty:
            continue
        minutes = (rows["finished"] - start).dt.total_seconds() / 60
        ax.step(
            [0, *minutes],
            range(len(rows) + 1),
            where="post",
            color=colour,
            label=f"{state.lower()} ({len(rows)})",
        )
    ax.set(xlabel="minutes since the first trial started", ylabel="trials finished")
    ax.legend(loc="upper left")
    return figure


def _top_table(study: optuna.Study) -> str:
    pareto = is_pareto(study)
    trials = pareto_front(study) if pareto else best_trials(study, TOP_TRIALS)
    if not trials:
        return "<p class='note'>No completed trial yet.</p>"
    rows = []
    summaries = best_summaries(study, trials)
    for rank, s in enumerate(summaries, 1):
        rows.append(
            {
                "rank": rank,
                "trial": s["number"],
                "dev score": s["value"],
                "trainable params": s["n_params"],
                "config": describe_config(s["config"]),
                "wall time (s)": "" if s["wall_time_s"] is None else f"{s['wall_time_s']:.1f}",
                **({"mean over seeds": s["mean"], "std": s["std"]} if "mean" in s else {}),
            }
        )
    table = pd.DataFrame(rows).to_html(
        index=False, float_format=lambda x: f"{x:.4f}", classes="top", border=0
    )
    notes = "".join(f"\n<p class='note'>{html.escape(note)}.</p>" for note in lead_notes(summaries))
    return table + notes


def _page(study: optuna.Study, frame: pd.DataFrame, sections: list[Section], table: str) -> str:
    counts = frame["state"].value_counts().to_dict() if len(frame) else {}
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "no trials"
    attrs = study.user_attrs
    objectives = "dev score and trainable parameters (Pareto)" if is_pareto(study) else "dev score"
    esc = html.escape
    parts = [
        f"<h1>reftsearch report: {esc(study.study_name)}</h1>",
        f"<p class='meta'>model <b>{esc(str(attrs.get('model', '?')))}</b> · metric "
        f"<b>{esc(str(attrs.get('metric', '?')))}</b> · objectives: {objectives} · "
        f"{len(frame)} trials ({esc(states)}) · all trials in <a href='trials.csv'>trials.csv</a>"
        "</p>",
        f"<h2>{'Pareto front' if is_pareto(study) else 'Top trials'}</h2>",
        table,
    ]
    for section in sections:
        parts.append(f"<h2>{esc(section.title)}</h2><p class='caption'>{esc(section.caption)}</p>")
        if section.image:
            parts.append(f"<img src='{section.image}' alt='{esc(section.title)}'>")
        else:
            parts.append(f"<p class='note'>{esc(section.note or '')}</p>")
    return _TEMPLATE.format(title=esc(f"reftsearch: {study.study_name}"), body="\n".join(parts))


PAGE_MARK = "<title>reftsearch: "  # in every report's index.html: the folder is a report's
# every file a report writes (the plots' names as ``write_report`` gives them)
REPORT_FILES = frozenset({"index.html", "trials.csv", "history.png", "layers_positions.png",
                          "rank.png", "params.png", "importances.png", "states.png"})  # fmt: skip
SCRATCH_PREFIX = ".report-partial."  # a report's files before they are moved into place


def check_report_folder(out: Path, option: str) -> None:
    """Refuse ``out`` unless it is missing, empty, or an earlier report (its index.html, and
    nothing a report does not write): a report writes over its files of those names."""
    if out.exists() and not out.is_dir():
        raise BadInputError(f"{option} {out}: exists and is not a directory")
    entries = set(os.listdir(out)) if out.is_dir() else set()
    if not entries:
        return
    others = sorted(e for e in entries - REPORT_FILES if not e.startswith(SCRATCH_PREFIX))
    if others or not holds(out / "index.html", PAGE_MARK):
        named = ", ".join(others[:5]) or "no index.html of a report"
        raise BadInputError(
            f"{option} {out}: holds files no `reftsearch report` wrote ({named}); "
            "give a new or empty folder, or an earlier report's"
        )


_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; }}
h1 {{ font-size: 1.6em; margin-bottom: 0.2em; }}
h2 {{ font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }}
.meta, .caption {{ color: #555; }}
.note {{ color: #8a6d00; background: #fff8e1; padding: 0.5em 0.8em; }}
img {{ max-width: 100%; }}
table.top {{ border-collapse: collapse; font-size: 0.9em; }}
table.top th, table.top td {{ padding: 0.3em 0.7em; border-bottom: 1px solid #eee;
                              text-align: left; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""
