"""What a full fine-tuning trial builds: only the training config is chosen. No torch here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FullConfig:
    method: str = "full"

    def to_dict(self) -> dict:
        return {"method": self.method}
