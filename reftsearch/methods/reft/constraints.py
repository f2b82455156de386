"""What a ReFT config must satisfy on this model and this data, checked before anything trains.

pyreft builds whatever it is given and fails late or silently (a wrong ``num_interventions``,
empty locations). Here every sampled config is checked against the loaded model and the
encoded training data first: one that cannot be trained ends PRUNED with its reason (it costs
milliseconds and tells the sampler to look elsewhere), and a value of the space that can never
be valid stops the study at validation with its key path (``study.prepare``), before the
storage is touched.

Positions follow pyreft: ``f<p>+l<s>`` is capped per example at ``n // 2`` of that prompt's
``n`` tokens (methods/reft/positions.py), so prompts shorter than ``2 * max(p, s)`` tokens get fewer
edited tokens; each trial records the share of training prompts that were capped
(``positions_capped``). A prefix or suffix beyond the cap of even the longest training prompt
is refused: no example would be edited as asked, the config would only repeat a smaller one.
Layer sets are checked once for the whole space: every listed set must exist in the model.
The number of interventions is derived, never given: layers x position groups (one group when
tied or one-sided, else two), as pyreft's ``num_interventions`` must be.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass

from reftsearch.errors import SpecError
from reftsearch.methods.reft.config import ReftConfig, max_rank
from reftsearch.spec.space import (
    Choice,
    Dimension,
    Fixed,
    IntRange,
    both_sides,
    layer_choices,
    parse_layers,
)


@dataclass(frozen=True)
class Limits:
    """What the loaded model and the training data allow."""

    num_layers: int
    hidden_size: int
    prompt_lengths: tuple[int, ...]  # of the training examples, ascending

    @property
    def max_positions(self) -> int:
        """The largest prefix (or suffix) any training prompt takes uncapped."""
        return self.prompt_lengths[-1] // 2


def limits_of(num_layers: int, hidden_size: int, prompt_lengths: list[int]) -> Limits:
    return Limits(num_layers, hidden_size, tuple(sorted(prompt_lengths)))


def why_invalid(config: ReftConfig, limits: Limits) -> str | None:
    """Why a resolved config cannot be trained here, or None if it can."""
    if config.prefix == 0 and config.suffix == 0:
        return "prefix and suffix are both 0: no token would be intervened on"
    if config.tied and not both_sides(config.prefix, config.suffix):
        return "tied needs both a prefix and a suffix to share one intervention"
    if config.rank > max_rank(limits.hidden_size):
        return f"rank {config.rank} is not below the hidden size {limits.hidden_size}"
    for name, count in (("prefix", config.prefix), ("suffix", config.suffix)):
        if count > limits.max_positions:
            return (
                f"{name} {count} is beyond every training prompt: the longest has "
                f"{limits.prompt_lengths[-1]} tokens, so at most {limits.max_positions} "
                "positions per side (pyreft caps each side at n // 2)"
            )
    return None


def capped_share(config: ReftConfig, limits: Limits) -> float:
    """Share of training prompts on which pyreft's n // 2 cap shortens the positions."""
    widest = max(config.prefix, config.suffix)
    return bisect_left(limits.prompt_lengths, 2 * widest) / len(limits.prompt_lengths)


def check_space(space: Mapping[str, Dimension], limits: Limits, path: str = "space") -> None:
    """Refuse values of the space that no trial could ever train (SpecError with the key)."""
    check_model_space(space, limits.num_layers, limits.hidden_size, path)
    side_rule = (
        f"must be at most {limits.max_positions}: the longest training prompt has "
        f"{limits.prompt_lengths[-1]} tokens and pyreft caps each side at n // 2"
    )
    for side in ("prefix", "suffix"):
        _check_smallest(space[side], f"{path}.{side}", limits.max_positions, side_rule)


def check_model_space(
    space: Mapping[str, Dimension], num_layers: int, hidden_size: int, path: str = "space"
) -> None:
    """The part of ``check_space`` that needs the model alone (its config, not its weights):
    ``reftsearch validate`` runs it."""
    layers = space["layers"]
    for i, text in enumerate(layer_choices(layers)):
        # a listed layer set the model lacks is a typo, not a region worth searching
        key = path + ".layers" if isinstance(layers, Fixed) else f"{path}.layers[{i}]"
        try:
            parse_layers(text, num_layers)
        except ValueError as err:
            raise SpecError(key, str(err)) from None
    rank_rule = f"must be below the hidden size {hidden_size} of this model"
    _check_smallest(space["rank"], f"{path}.rank", max_rank(hidden_size), rank_rule)


def _check_smallest(dimension: Dimension, key: str, largest_valid: int, rule: str) -> None:
    smallest = _smallest(dimension)
    if smallest > largest_valid:
        got = f"got {smallest}" if isinstance(dimension, Fixed) else f"its smallest is {smallest}"
        raise SpecError(key, f"{rule}, {got}")


def _smallest(dimension: Dimension) -> int:
    if isinstance(dimension, Fixed):
        return dimension.value
    if isinstance(dimension, Choice):
        return min(dimension.choices)
    assert isinstance(dimension, IntRange)
    return dimension.low
