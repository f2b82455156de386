"""Warm starts: trials enqueued before the sampler's own, so a search starts from good configs.

Two sources: the ReFT paper's recipes for the task kind (``{recipes: paper}``) and the best
configs of another study (``{study: NAME, storage: URL, top_k: K}``, transfer between tasks
or models of one family). Each config is mapped onto this study's space first: numbers are
clipped into ranges or moved to the nearest listed value, a categorical value the space does
not offer skips the recipe, and every such change is said in a line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna

from reftsearch.errors import BadInputError, SpecError
from reftsearch.progress import Log
from reftsearch.search.record import TrialRecord
from reftsearch.spec.space import (
    Choice,
    Dimension,
    Fixed,
    FloatRange,
    IntRange,
    both_sides,
    parse_layers,
    searched,
)

DONE_ATTR = "warm_start_enqueued"


@dataclass(frozen=True)
class Recipe:
    name: str
    values: Mapping[str, Any]


# The ReFT paper's GLUE recipe with RoBERTa: LoReFT on the first token of every layer, rank 1
# (its learning rate tuned per task).
PAPER_GLUE = {"intervention": "loreft", "layers": "all", "prefix": 1, "suffix": 0, "rank": 1}


def paper_recipes(task_kind: str, num_layers: int) -> list[Recipe]:
    """The ReFT paper's settings (Wu et al. 2024), scaled to this model's depth."""
    if task_kind == "classification":
        # Learning rates for a search's few epochs, from benchmarks/quality.py on MiniLM: 3e-4
        # stays at chance, 1e-3 finished last of 1e-3 to 1e-2 wherever a task learned (SST-2,
        # MRPC), and the same recipe at rank 4 and lr 1e-2 led rank 1 at every seed on SST-2
        # (77.7 against 76.1), a config too far from the recipe for a few sampled trials to find.
        return [
            *(Recipe(f"paper-glue-lr{lr:g}", {**PAPER_GLUE, "lr": lr}) for lr in (3e-3, 1e-2)),
            Recipe("paper-glue-rank4-lr0.01", {**PAPER_GLUE, "rank": 4, "lr": 1e-2}),
        ]
    # LLaMA-7B (32 layers) instruction tuning used layers 3;9;18;24, f5+l5 untied, rank 4;
    # commonsense and math used f7+l7, rank 8, on all layers.
    spread = ";".join(str(round(i * num_layers / 32)) for i in (3, 9, 18, 24))
    return [
        Recipe(
            "paper-instruct",
            {
                "intervention": "loreft",
                "layers": spread,
                "prefix": 5,
                "suffix": 5,
                "tied": False,
                "rank": 4,
                "lr": 9e-4,
            },
        ),
        Recipe(
            "paper-commonsense-math",
            {
                "intervention": "loreft",
                "layers": "all",
                "prefix": 7,
                "suffix": 7,
                "tied": False,
                "rank": 8,
                "lr": 9e-4,
            },
        ),
    ]


def study_recipes(name: str, storage: str, top_k: int, method: str) -> list[Recipe]:
    """The ``top_k`` completed configs of another study, best first; they must be configs
    of this study's ``method`` (a LoRA rank says nothing about a ReFT intervention)."""
    from reftsearch.search.ranking import best_trials
    from reftsearch.search.storage import load_named_study

    try:  # read only: a mistyped name or path creates nothing
        source = load_named_study(name, storage)
    except BadInputError as err:
        raise SpecError("warm_start.study", str(err)) from None
    recipes = []
    for trial in best_trials(source, top_k):
        config = dict(TrialRecord.of(trial).config or {})
        if config.get("method", "reft") != method:
            raise BadInputError(
                f"warm_start.study: trial {trial.number} of study {name!r} is a "
                f"{config.get('method', 'reft')} config; this study searches {method} configs"
            )
        config["layers"] = ";".join(map(str, config.get("layers", []))) or "all"
        # searched values as the source's space spelled them: its "all" is all of this
        # model's layers too, where the resolved list names the source model's layers
        config.update(trial.params)
        recipes.append(Recipe(f"study:{name}#{trial.number}", config))
    return recipes


# what a config is, not how it trains: a recipe this space cannot take as it is is skipped,
# not changed into another config (README: "whose intervention or layer set ... is skipped")
STRUCTURE = ("intervention", "layers")


def map_onto_space(
    recipe: Recipe, space: Mapping[str, Dimension], num_layers: int
) -> tuple[dict[str, Any] | None, list[str]]:
    """Optuna params for this recipe in ``space`` (None = skipped) and what was changed."""
    params: dict[str, Any] = {}
    notes: list[str] = []
    sampled = searched(space)
    for name, value in recipe.values.items():
        if name not in sampled:
            fixed = _fixed_value(space.get(name))
            if fixed is None or fixed == value:
                continue
            if name not in STRUCTURE:
                notes.append(f"{name}={value!r} is fixed to {fixed!r} in this space")
            elif _map_value(name, value, Choice((fixed,)), num_layers) is None:
                return None, [f"{name}={value!r} is not among {[fixed]}"]
            continue
        mapped = _map_value(name, value, sampled[name], num_layers)
        if mapped is None:
            return None, [f"{name}={value!r} is not among {list(sampled[name].choices)}"]
        if mapped != value:
            notes.append(f"{name}={value!r} -> {mapped!r}")
        params[name] = mapped
    if not both_sides(params.get("prefix", 1), params.get("suffix", 1)):
        params.pop("tied", None)  # not sampled then
    return params, notes


def _fixed_value(dimension: Dimension | None) -> Any:
    """The one value a dimension that is not searched takes: a fixed value, or a list of
    one (None: the dimension is not in the space)."""
    if isinstance(dimension, Fixed):
        return dimension.value
    if isinstance(dimension, Choice) and len(dimension.choices) == 1:
        return dimension.choices[0]
    return None


def _map_value(name: str, value: Any, dimension: Dimension, num_layers: int) -> Any:
    if isinstance(dimension, IntRange | FloatRange):
        clipped = min(max(value, dimension.low), dimension.high)
        return int(round(clipped)) if isinstance(dimension, IntRange) else float(clipped)
    assert isinstance(dimension, Choice)
    if name == "layers":  # "all" and "0-5" are the same set on a 6-layer model
        try:
            wanted = parse_layers(str(value), num_layers)
        except ValueError:  # a layer this model does not have
            return None
        return next((c for c in dimension.choices if parse_layers(c, num_layers) == wanted), None)
    if value in dimension.choices:
        return value
    if all(isinstance(c, int | float) and not isinstance(c, bool) for c in dimension.choices):
        return min(dimension.choices, key=lambda c: abs(c - value))
    return None


def warm_start_params(
    recipes: list[Recipe], space: Mapping[str, Dimension], num_layers: int, log: Log = print
) -> list[tuple[Recipe, dict[str, Any]]]:
    """The recipes that map onto ``space``, as Optuna params, each distinct config once."""
    kept: list[tuple[Recipe, dict[str, Any]]] = []
    for recipe in recipes:
        params, notes = map_onto_space(recipe, space, num_layers)
        if params is None:
            log(f"warm start {recipe.name}: skipped, {'; '.join(notes)}")
        elif any(params == seen for _, seen in kept):
            log(f"warm start {recipe.name}: skipped, same as an earlier one in this space")
        else:
            kept.append((recipe, params))
            log(f"warm start {recipe.name}: enqueued" + (f" ({'; '.join(notes)})" if notes else ""))
    return kept


def enqueue_warm_starts(
    study: optuna.Study,
    recipes: list[Recipe],
    space: Mapping[str, Dimension],
    num_layers: int,
    log: Log = print,
) -> int:
    """Enqueue each recipe once per study (a resumed study does not enqueue them again)."""
    if study.user_attrs.get(DONE_ATTR):
        return 0
    kept = warm_start_params(recipes, space, num_layers, log)
    for recipe, params in kept:
        study.enqueue_trial(params, user_attrs=TrialRecord(warm_start=recipe.name).to_user_attrs())
    study.set_user_attr(DONE_ATTR, len(kept))
    return len(kept)
