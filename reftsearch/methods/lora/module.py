"""LoRA and DoRA (through ``peft``) behind the interface the trainer uses for ReFT interventions.

A fair ReFT-vs-LoRA comparison trains both with the same loop, data, head, optimiser, seed
and budget; only what learns differs. ``LoraModule`` builds peft's LoRA layers around the
chosen linear layers of the blocks, and swaps them into the model only while ``attached``,
so the frozen base model is left exactly as it was and serves the next trial, ReFT or LoRA.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from torch import nn

from reftsearch.errors import SpecError
from reftsearch.methods.lora.config import LoraConfig
from reftsearch.methods.reft.interventions import count_parameters
from reftsearch.models.base import BaseModel
from reftsearch.spec.space import Dimension, layer_choices

if TYPE_CHECKING:
    import peft

ADAPTER = "default"


def resolve_targets(text: str, model_type: str) -> tuple[str, ...]:
    """``"default"`` -> peft's choice for the architecture; ``"q_proj;v_proj"`` -> those names."""
    if text == "default":
        # peft is imported where LoRA is used: it adds ~0.6 s to every process otherwise
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

        names = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        if names is None:
            raise ValueError(
                f"peft has no default LoRA target modules for model type {model_type!r}: "
                f"name them, e.g. 'q_proj;v_proj'"
            )
        return tuple(names)
    return tuple(name.strip() for name in text.split(";"))


def target_sites(
    blocks: Sequence[nn.Module], targets: Sequence[str]
) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """``(key, parent, attribute, layer)`` for every block module whose name ends in a target."""
    sites = []
    for index, block in enumerate(blocks):
        for name, module in block.named_modules():
            parent_name, _, attribute = name.rpartition(".")
            if attribute in targets:
                key = f"{index}/{name.replace('.', '/')}"
                sites.append((key, block.get_submodule(parent_name), attribute, module))
    if not sites:
        linear = sorted(
            {n.rpartition(".")[2] for n, m in blocks[0].named_modules() if isinstance(m, nn.Linear)}
        )
        raise ValueError(
            f"no module of the model's blocks is named {list(targets)}; its linear layers "
            f"are {linear}"
        )
    return sites


def to_peft(config: LoraConfig, target_modules: list[str], **options) -> peft.LoraConfig:
    """peft's config for ``config``, on ``target_modules`` (short names inside a block, or
    the whole model's module names for an export)."""
    import peft

    return peft.LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=target_modules,
        use_dora=config.use_dora,
        **options,
    )


class LoraModule(nn.Module):
    """One trial's LoRA (or DoRA) adapters; only their A/B matrices (and DoRA's magnitudes)
    are parameters of this module."""

    def __init__(self, config: LoraConfig, blocks: Sequence[nn.Module]) -> None:
        from peft.tuners.lora.layer import dispatch_default

        super().__init__()
        self.config = config
        peft_config = to_peft(config, list(config.target_modules))
        # (key, parent, attribute, original layer, LoRA layer wrapping it); a plain list, so
        # the frozen base weights inside the wrappers are not parameters (nor state) of this
        # module
        self._sites: list[tuple[str, nn.Module, str, nn.Module, nn.Module]] = []
        adapters = {}
        for key, parent, attribute, layer in target_sites(blocks, config.target_modules):
            wrapper = dispatch_default(
                layer, ADAPTER, peft_config, r=config.rank, lora_alpha=config.alpha
            )
            if wrapper is None:
                raise ValueError(f"peft cannot put LoRA on {key} ({type(layer).__name__})")
            parts = {"A": wrapper.lora_A, "B": wrapper.lora_B, "dropout": wrapper.lora_dropout}
            if config.use_dora:  # the rows' magnitudes, initialised to the weight's row norms
                parts["magnitude"] = wrapper.lora_magnitude_vector
            adapters[key] = nn.ModuleDict(parts)
            self._sites.append((key, parent, attribute, layer, wrapper))
        self.adapters = nn.ModuleDict(adapters)

    def originals(self) -> dict[str, nn.Module]:
        """The frozen layers the adapters wrap, by their key (``<block>/<path in block>``)."""
        return {key: layer for key, _, _, layer, _ in self._sites}

    def num_parameters(self) -> int:
        return count_parameters(self)

    def no_decay_parameters(self) -> list[nn.Parameter]:
        return []

    def set_locations(self, *args, **kwargs) -> None:
        """LoRA changes the weights every token goes through: there are no positions to set."""

    def clear_locations(self) -> None:
        """Nothing to clear (see ``set_locations``)."""

    @contextmanager
    def attached(self, blocks: Sequence[nn.Module]) -> Iterator[LoraModule]:
        """Swap the LoRA layers into the blocks given at construction for the duration."""
        for _, parent, attribute, _, wrapper in self._sites:
            setattr(parent, attribute, wrapper)
        try:
            yield self
        finally:
            for _, parent, attribute, layer, _ in self._sites:
                setattr(parent, attribute, layer)


def check_targets(space: Mapping[str, Dimension], base: BaseModel, path: str) -> None:
    """Every ``target_modules`` choice must name linear layers the model's blocks have."""
    choices = layer_choices(space["target_modules"])  # the values a dimension can take
    for i, text in enumerate(choices):
        try:
            names = resolve_targets(text, base.model.config.model_type)
            target_sites(base.blocks, names)
        except ValueError as err:
            raise SpecError(path if len(choices) == 1 else f"{path}[{i}]", str(err)) from None
