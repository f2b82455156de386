"""What a LoRA or DoRA trial builds: rank, alpha, dropout, the layers it wraps. No torch here.

DoRA (Liu et al. 2024) is peft's LoRA with ``use_dora``: each wrapped layer also learns the
magnitude of every output row of its weight, LoRA's update setting only the direction.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]  # last parts of module names inside a block: q_proj, value
    use_dora: bool = False

    @property
    def method(self) -> str:
        """The study's ``method``: ``dora`` or ``lora``."""
        return "dora" if self.use_dora else "lora"

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": list(self.target_modules),
        }
