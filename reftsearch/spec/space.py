"""The search space: which trial parameters exist, their valid values, and how Optuna samples them.

In a study file a scalar fixes a parameter, a list searches over its items, and a mapping
``{low, high, log, step}`` searches a numeric range (``{choices: [...]}`` is a list too).
Only searched parameters become Optuna parameters, under their own names (``rank``,
``layers``, ...), so the dashboard and ``best`` read naturally.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from reftsearch.errors import SpecError
from reftsearch.spec import readers as v

if TYPE_CHECKING:  # a spec is read without Optuna (~0.7 s): `validate` and every command's start
    import optuna


@dataclass(frozen=True)
class Fixed:
    value: Any


@dataclass(frozen=True)
class Choice:
    choices: tuple


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int
    log: bool = False
    step: int = 1


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    log: bool = False


Dimension = Fixed | Choice | IntRange | FloatRange


@dataclass(frozen=True)
class Parameter:
    """A trial parameter: how to check one value, its default, and whether ranges are allowed."""

    check: Callable[[Any, str], Any]
    default: Any
    numeric: str | None = None  # "int" or "float" when a {low, high} range is allowed


def _layers_value(raw: Any, path: str) -> str:
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)
    text = v.string(raw, path)
    try:
        parse_layers(text, num_layers=None)
    except ValueError as err:
        raise SpecError(path, str(err)) from None
    return text


def _target_modules_value(raw: Any, path: str) -> str:
    text = v.string(raw, path)
    if not all(name.strip() for name in text.split(";")):
        raise SpecError(
            path, f"must be 'default' or module names like 'q_proj;v_proj', got {text!r}"
        )
    return text


TRAINING_PARAMETERS: dict[str, Parameter] = {
    "lr": Parameter(lambda raw, p: v.number(raw, p, 0, exclusive_min=True), 1e-3, "float"),
    "epochs": Parameter(lambda raw, p: v.integer(raw, p, minimum=1), None, "int"),
    "batch_size": Parameter(lambda raw, p: v.integer(raw, p, minimum=1), 16, "int"),
    "warmup_ratio": Parameter(
        lambda raw, p: v.number(raw, p, 0, 1, exclusive_max=True), 0.0, "float"
    ),
    "weight_decay": Parameter(lambda raw, p: v.number(raw, p, 0), 0.0, "float"),
}
# interventions.INTERVENTIONS's names (a test holds the two equal), spelled out here so that
# reading a spec does not import torch (2.6 s of a 4 s ``reftsearch --help``)
INTERVENTION_NAMES = ("loreft", "direft", "noreft")
_DROPOUT = Parameter(lambda raw, p: v.number(raw, p, 0, 1, exclusive_max=True), 0.0, "float")

PARAMETERS: dict[str, Parameter] = {  # method: reft
    "intervention": Parameter(lambda raw, p: v.choice(raw, p, INTERVENTION_NAMES), "loreft"),
    "layers": Parameter(_layers_value, "all"),
    "prefix": Parameter(lambda raw, p: v.integer(raw, p, minimum=0), 1, "int"),
    "suffix": Parameter(lambda raw, p: v.integer(raw, p, minimum=0), 0, "int"),
    "tied": Parameter(v.boolean, False),
    "rank": Parameter(lambda raw, p: v.integer(raw, p, minimum=1), 4, "int"),
    "lr": TRAINING_PARAMETERS["lr"],  # this order is the sampling order: keep it stable
    "dropout": _DROPOUT,
    **TRAINING_PARAMETERS,
}

# method: lora (peft). "default" target modules = peft's choice for the architecture
# (q_proj;v_proj on Llama, query;value on BERT).
LORA_PARAMETERS: dict[str, Parameter] = {
    "rank": Parameter(lambda raw, p: v.integer(raw, p, minimum=1), 8, "int"),
    "alpha": Parameter(lambda raw, p: v.number(raw, p, 0, exclusive_min=True), 16.0, "float"),
    "dropout": _DROPOUT,
    "target_modules": Parameter(_target_modules_value, "default"),
    **TRAINING_PARAMETERS,
}
# method: dora (peft's LoRA with use_dora) searches what LoRA does.
# method: full (every weight trained) has only the training parameters, with the defaults of
# fine-tuning a whole model: a learning rate 50x lower than an adapter's, and weight decay.
FULL_PARAMETERS: dict[str, Parameter] = {
    **TRAINING_PARAMETERS,
    "lr": replace(TRAINING_PARAMETERS["lr"], default=2e-5),
    "weight_decay": replace(TRAINING_PARAMETERS["weight_decay"], default=0.01),
}
METHOD_PARAMETERS = {
    "reft": PARAMETERS,
    "lora": LORA_PARAMETERS,
    "dora": LORA_PARAMETERS,
    "full": FULL_PARAMETERS,
}


def parse_space(raw: Any, path: str, max_epochs: int, method: str = "reft") -> dict[str, Dimension]:
    """Validate ``space:``; every known parameter gets a dimension (its default when absent)."""
    parameters = METHOD_PARAMETERS[method]
    entries = v.mapping(raw, path, parameters)
    space: dict[str, Dimension] = {}
    for name, parameter in parameters.items():
        default = max_epochs if name == "epochs" else parameter.default
        space[name] = _parse_dimension(entries.get(name, default), v.join(path, name), parameter)
    _check_epochs(space["epochs"], v.join(path, "epochs"), max_epochs)
    if method == "reft":
        _check_some_position(space["prefix"], space["suffix"], path)
    one_sided = Fixed(0) in (space.get("prefix"), space.get("suffix"))
    if method == "reft" and space["tied"] == Fixed(True) and one_sided:
        raise SpecError(
            v.join(path, "tied"),
            "true needs a prefix and a suffix to share one intervention, but one is fixed to 0",
        )
    return space


def _check_some_position(prefix: Dimension, suffix: Dimension, path: str) -> None:
    """Every config the space can draw intervenes on some token: (prefix, suffix) = (0, 0)
    would only waste a trial of the budget. Where both can be 0, ``sample`` draws the suffix
    from 1 when the prefix is 0, which needs the suffix to be a range: Optuna refuses a list
    whose items change between trials."""
    if _only_zero(prefix) and _only_zero(suffix):
        raise SpecError(
            v.join(path, "prefix"), "prefix and suffix are both 0: no token would be intervened on"
        )
    sides = {"prefix": prefix, "suffix": suffix}
    for side, other in (("prefix", "suffix"), ("suffix", "prefix")):
        if _only_zero(sides[other]) and _can_be_zero(sides[side]):
            raise SpecError(
                v.join(path, side),
                f"can be 0, and {other} is 0: that config intervenes on no token; start it at 1",
            )
    if _can_be_zero(prefix) and _can_be_zero(suffix) and not isinstance(suffix, IntRange):
        raise SpecError(
            v.join(path, "suffix"),
            "can be 0, as can prefix: give suffix as a range ({low: 0, high: N}, drawn from 1 "
            "when prefix is 0), or leave 0 out of one of the two lists",
        )


def _can_be_zero(dimension: Dimension) -> bool:
    return 0 in _values(dimension)


def _only_zero(dimension: Dimension) -> bool:
    return set(_values(dimension)) == {0}


def _values(dimension: Dimension) -> tuple:
    """Values an integer dimension can take: all of them, or a range's first two."""
    if isinstance(dimension, Fixed):
        return (dimension.value,)
    if isinstance(dimension, Choice):
        return dimension.choices
    second = dimension.low + dimension.step
    return (dimension.low, second) if second <= dimension.high else (dimension.low,)


def _parse_dimension(raw: Any, path: str, parameter: Parameter) -> Dimension:
    if isinstance(raw, Mapping) and "choices" in raw:
        v.mapping(raw, path, ["choices"])
        raw, path = raw["choices"], v.join(path, "choices")
        if not isinstance(raw, list):
            raise SpecError(path, "must be a list")
    if isinstance(raw, list):
        if not raw:
            raise SpecError(path, "must list at least one value")
        values = tuple(parameter.check(item, v.join(path, i)) for i, item in enumerate(raw))
        if len(set(values)) != len(values):
            raise SpecError(path, f"lists a value twice: {list(raw)}")
        return Choice(values)
    if isinstance(raw, Mapping):
        return _parse_range(raw, path, parameter)
    return Fixed(parameter.check(raw, path))


def _parse_range(raw: Mapping, path: str, parameter: Parameter) -> Dimension:
    if parameter.numeric is None:
        raise SpecError(
            path, "must be a value or a list of values (a {low, high} range is only for numbers)"
        )
    allowed = ["low", "high", "log"] + (["step"] if parameter.numeric == "int" else [])
    entries = v.mapping(raw, path, allowed, required=["low", "high"])
    low = parameter.check(entries["low"], v.join(path, "low"))
    high = parameter.check(entries["high"], v.join(path, "high"))
    log = v.boolean(entries.get("log", False), v.join(path, "log"))
    if high < low:
        raise SpecError(v.join(path, "high"), f"must be >= low ({low}), got {high}")
    if log and low <= 0:
        raise SpecError(v.join(path, "low"), f"must be > 0 for a log range, got {low}")
    if parameter.numeric == "int":
        step = v.integer(entries.get("step", 1), v.join(path, "step"), minimum=1)
        if log and step != 1:
            raise SpecError(v.join(path, "step"), "must be 1 for a log range")
        return IntRange(low, high, log, step)
    return FloatRange(low, high, log)


def largest(dimension: Dimension) -> Any:
    """The largest value a numeric dimension can take."""
    return {
        Fixed: lambda d: d.value,
        Choice: lambda d: max(d.choices),
        IntRange: lambda d: d.high,
        FloatRange: lambda d: d.high,
    }[type(dimension)](dimension)


def _check_epochs(dimension: Dimension, path: str, max_epochs: int) -> None:
    if largest(dimension) > max_epochs:
        raise SpecError(
            path, f"must be <= budget.max_epochs ({max_epochs}), got {largest(dimension)}"
        )


def searched(space: Mapping[str, Dimension]) -> dict[str, Dimension]:
    """The dimensions Optuna samples (lists and ranges with more than one value)."""
    return {
        name: dim
        for name, dim in space.items()
        if not isinstance(dim, Fixed) and not (isinstance(dim, Choice) and len(dim.choices) == 1)
    }


def both_sides(prefix: int, suffix: int) -> bool:
    """Whether the first and the last prompt tokens are both intervened on: the only case
    where ``tied`` (one intervention shared by the two) means anything, and the only one with
    two intervention groups per layer when untied (pyreft ditto)."""
    return prefix > 0 and suffix > 0


def sample(trial: optuna.Trial, space: Mapping[str, Dimension]) -> dict[str, Any]:
    """One value per parameter; ``tied`` is only sampled when both sides are intervened."""
    values: dict[str, Any] = {}
    for name, dimension in space.items():
        if name == "tied" and not both_sides(values["prefix"], values["suffix"]):
            values[name] = False  # one position group: tying has no meaning (pyreft ditto)
            continue
        if name == "suffix" and values.get("prefix") == 0 and isinstance(dimension, IntRange):
            # at least one position (parse_space holds a suffix that can be 0 to a range)
            dimension = replace(dimension, low=max(dimension.low, dimension.step))
        values[name] = _suggest(trial, name, dimension)
    return values


def _suggest(trial: optuna.Trial, name: str, dimension: Dimension) -> Any:
    if isinstance(dimension, Fixed):
        return dimension.value
    if isinstance(dimension, Choice):
        if len(dimension.choices) == 1:
            return dimension.choices[0]
        return trial.suggest_categorical(name, dimension.choices)
    if isinstance(dimension, IntRange):
        return trial.suggest_int(
            name, dimension.low, dimension.high, step=dimension.step, log=dimension.log
        )
    return trial.suggest_float(name, dimension.low, dimension.high, log=dimension.log)


def grid(space: Mapping[str, Dimension], path: str) -> dict[str, list]:
    """The search space as GridSampler wants it; ranges cannot be gridded."""
    result = {}
    for name, dimension in searched(space).items():
        if not isinstance(dimension, Choice):
            raise SpecError(
                v.join(path, name), "sampler.type 'grid' needs a list of values, not a range"
            )
        result[name] = list(dimension.choices)
    return result


def parse_layers(text: str, num_layers: int | None) -> tuple[int, ...]:
    """``"all"``, ``"2;4;6"``, ``"2-5"`` or mixes like ``"0;3-5"`` -> sorted layer indices.

    With ``num_layers`` given, ``all`` expands and every layer is checked to exist.
    """
    if text.strip() == "all":
        if num_layers is None:
            return ()
        return tuple(range(num_layers))
    layers: set[int] = set()
    for part in text.split(";"):
        part = part.strip()
        bounds = part.split("-")
        if not all(b.strip().isdigit() for b in bounds) or len(bounds) > 2:
            raise ValueError(f"must be 'all' or layer indices like '2;4;6' or '2-5', got {text!r}")
        low, high = int(bounds[0]), int(bounds[-1])
        if high < low:
            raise ValueError(f"layer range {part!r} runs backwards")
        layers.update(range(low, high + 1))
    if num_layers is not None and max(layers) >= num_layers:
        raise ValueError(
            f"layer {max(layers)} does not exist in a model with {num_layers} layers "
            f"(valid 0-{num_layers - 1}), got {text!r}"
        )
    return tuple(sorted(layers))


def layer_choices(dimension: Dimension) -> tuple[str, ...]:
    """Every layer-set string a ``layers`` dimension can produce."""
    return (dimension.value,) if isinstance(dimension, Fixed) else dimension.choices


def lowest_layers(space: Mapping[str, Dimension], num_layers: int) -> set[int]:
    """The lowest intervened layer of every layer set a ReFT space can produce."""
    return {min(parse_layers(text, num_layers)) for text in layer_choices(space["layers"])}
