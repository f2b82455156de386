"""Full fine-tuning behind the interface the trainer uses for ReFT interventions and LoRA.

The loaded model is shared by every trial of a worker and stays frozen, so a full fine-tuning
trial trains a float32 copy of every base weight (the classification head is trained as in
every trial) and swaps the copies into the model only while ``attached``: the next trial, of
any method, starts from the pretrained weights again. Tied weights (an LM head sharing the
embedding matrix) share one copy, so they stay tied.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from reftsearch.methods.full.config import FullConfig
from reftsearch.methods.reft.interventions import count_parameters


class FullModule(nn.Module):
    """One trial's copy of the model's weights (all but the head's): its parameters."""

    def __init__(self, config: FullConfig, model: nn.Module, head: Sequence[nn.Parameter]) -> None:
        super().__init__()
        self.config = config
        skip = {id(p) for p in head}
        names = {id(p): name for name, p in model.named_parameters() if id(p) not in skip}
        copies = {
            key: nn.Parameter(p.detach().to(torch.float32, copy=True))
            for key, p in model.named_parameters()
            if id(p) in names
        }
        # keys without dots (a ParameterDict refuses them): "encoder/layer/0/..."
        self.weights = nn.ParameterDict({key.replace(".", "/"): p for key, p in copies.items()})
        # (module, attribute, original, copy) for every place a weight sits, tied ones too;
        # a plain list, so the frozen originals are neither parameters nor state of this module
        self._sites: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]] = [
            (module, attribute, p, copies[names[id(p)]])
            for module in model.modules()
            for attribute, p in module._parameters.items()
            if p is not None and id(p) in names
        ]

    def num_parameters(self) -> int:
        return count_parameters(self)

    def no_decay_parameters(self) -> list[nn.Parameter]:
        """Biases and norm weights (the 1-d ones), which HF Trainer does not decay either."""
        return [p for p in self.weights.values() if p.dim() < 2]

    def set_locations(self, *args, **kwargs) -> None:
        """Every weight changes for every token: there are no positions to set."""

    def clear_locations(self) -> None:
        """Nothing to clear (see ``set_locations``)."""

    @contextmanager
    def attached(self, blocks: Sequence[nn.Module]) -> Iterator[FullModule]:
        """Swap the trained copies into the model for the duration (the whole model's weights,
        not only the blocks')."""
        for module, attribute, _, trained in self._sites:
            module._parameters[attribute] = trained
        try:
            yield self
        finally:
            for module, attribute, original, _ in self._sites:
                module._parameters[attribute] = original
