"""A trial's interventions and how they sit on a frozen model.

``ReftConfig`` says what to build (type, layers, positions, rank); ``ReftModule`` holds one
intervention per (layer, position group) and edits the chosen blocks' outputs through
forward hooks, so the base model itself is never modified and can serve trial after trial.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from reftsearch.methods.reft.config import ReftConfig
from reftsearch.methods.reft.interventions import (
    Intervention,
    build_intervention,
    count_parameters,
)
from reftsearch.methods.reft.positions import intervention_locations


class ReftModule(nn.Module):
    """All interventions of one trial; ``interventions[f"{layer}/{group}"]``."""

    def __init__(self, config: ReftConfig, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.interventions = nn.ModuleDict(
            {
                _key(layer, group): build_intervention(
                    config.intervention, hidden_size, config.rank, config.dropout
                )
                for group in range(config.groups)
                for layer in config.layers
            }
        )
        # [groups, batch, width] token indices for the batch being run; None = pass-through
        # (e.g. the one-token steps of cached generation, which pyreft never intervenes on).
        self._locations: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None  # [batch] the batch rows the locations belong to

    def intervention(self, layer: int, group: int) -> Intervention:
        return self.interventions[_key(layer, group)]

    def num_parameters(self) -> int:
        return count_parameters(self)

    def no_decay_parameters(self) -> list[nn.Parameter]:
        return [p for module in self.interventions.values() for p in module.no_decay_parameters()]

    def set_locations(
        self,
        prompt_lengths: torch.Tensor,
        offsets: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> None:
        """Point the interventions at the prompts of the next batch.

        ``rows``: which rows of the batch are this trial's (all by default); when several
        trials share one batch (reftsearch.run.packed_search) each edits only its own rows.
        """
        c = self.config
        locations = intervention_locations(prompt_lengths, c.prefix, c.suffix, c.tied, offsets)
        device = self._device()
        self._locations = locations.to(device)
        self._rows = (torch.arange(len(prompt_lengths)) if rows is None else rows).to(device)

    def clear_locations(self) -> None:
        self._locations = None

    @contextmanager
    def attached(self, blocks: Sequence[nn.Module]) -> Iterator[ReftModule]:
        """Hook the interventions onto ``blocks`` (the model's layer list) for the duration."""
        handles = [
            blocks[layer].register_forward_hook(self._hook(layer)) for layer in self.config.layers
        ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.clear_locations()

    def edit(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Apply this layer's interventions to ``hidden`` ``[batch, seq, d]`` at the locations."""
        if self._locations is None:
            return hidden
        for group, positions in enumerate(self._locations):
            valid = positions >= 0
            index = (self._rows[:, None].expand_as(positions), positions.clamp(min=0))
            selected = hidden[index]
            delta = (self.intervention(layer, group)(selected) - selected) * valid[..., None]
            # accumulate (not assign) keeps the graph simple; padded slots add exactly zero.
            hidden = hidden.index_put(index, delta.to(hidden.dtype), accumulate=True)
        return hidden

    def _hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output):
            if isinstance(output, tuple):
                return (self.edit(layer, output[0]), *output[1:])
            return self.edit(layer, output)

        return hook

    def _device(self) -> torch.device:
        return next(self.parameters()).device


def _key(layer: int, group: int) -> str:
    return f"{layer}/{group}"
