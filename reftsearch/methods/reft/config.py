"""What a ReFT trial builds: intervention type, layers, positions, rank. No torch here.

Positions follow pyreft's ``f<p>+l<s>`` grammar (``positions.py`` turns them into token
indices): the first ``p`` and the last ``s`` prompt tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from reftsearch.spec.space import both_sides


def max_rank(hidden_size: int) -> int:
    """The largest rank an intervention may have: below the hidden size, or the edit is no
    longer low-rank (LoReFT's ``R`` would be a whole rotation of the hidden space)."""
    return hidden_size - 1


def num_groups(prefix: int, suffix: int, tied: bool) -> int:
    """Intervention groups per layer: two only for untied configs with both ``f`` and ``l``."""
    return 2 if both_sides(prefix, suffix) and not tied else 1


def describe(prefix: int, suffix: int) -> str:
    """pyreft's spelling of a position config, e.g. ``f1+l3``, ``f2``, ``l1``."""
    parts = [f"f{prefix}"] * (prefix > 0) + [f"l{suffix}"] * (suffix > 0)
    return "+".join(parts) or "none"


@dataclass(frozen=True)
class ReftConfig:
    intervention: str
    layers: tuple[int, ...]
    prefix: int
    suffix: int
    tied: bool
    rank: int
    dropout: float = 0.0

    @property
    def groups(self) -> int:
        return num_groups(self.prefix, self.suffix, self.tied)

    @property
    def positions(self) -> str:
        return describe(self.prefix, self.suffix)

    @property
    def num_interventions(self) -> int:
        """layers x position groups: what pyreft's ``num_interventions`` must equal."""
        return len(self.layers) * self.groups

    def to_dict(self) -> dict:
        return {**asdict(self), "layers": list(self.layers), "positions": self.positions}
