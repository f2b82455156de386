"""What a LoRA trial builds: rank, alpha, dropout, the linear layers it wraps. No torch here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]  # last parts of module names inside a block: q_proj, value

    def to_dict(self) -> dict:
        return {
            "method": "lora",
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": list(self.target_modules),
        }
