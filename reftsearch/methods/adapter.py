"""What a trial trains on the frozen model: ReFT interventions (``reft/``), LoRA or DoRA
(``lora/``), or a copy of every weight (``full/``).

All expose the interface the trainer uses (``attached``, ``set_locations``, parameters), so
one training loop serves both methods. A trial records its resolved config as a dict (the
``config`` user attribute); ``adapter_config`` reads it back (``reftsearch.search.record`` puts it
in words and columns).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import torch

from reftsearch.methods.full.config import FullConfig
from reftsearch.methods.full.module import FullModule
from reftsearch.methods.lora.config import LoraConfig
from reftsearch.methods.lora.module import LoraModule
from reftsearch.methods.reft.config import ReftConfig
from reftsearch.methods.reft.module import ReftModule
from reftsearch.models.base import BaseModel

AdapterConfig = ReftConfig | LoraConfig | FullConfig
Adapter = ReftModule | LoraModule | FullModule


#: Held by whoever draws from torch's global RNG while other threads may too: an adapter's
#: seeded init here, and a packed training step (its dropout) in reftsearch.engine.packing. Without
#: it, one packed trial's init could draw numbers between another's seeding and its init.
GLOBAL_RNG_LOCK = threading.RLock()


def build_adapter(config: AdapterConfig, base: BaseModel, seed: int) -> Adapter:
    """Adapters for ``config`` on ``base``'s device, initialised from ``seed``: the same
    seed gives the same init whether the trial runs alone, packed, or is retrained."""
    with GLOBAL_RNG_LOCK:
        torch.manual_seed(seed)
        if isinstance(config, LoraConfig):
            return LoraModule(config, base.blocks).to(base.device)
        if isinstance(config, FullConfig):
            return FullModule(config, base.model, base.head_parameters()).to(base.device)
        return ReftModule(config, base.hidden_size).to(base.device)


def adapter_config(recorded: Mapping) -> AdapterConfig:
    """The config a trial recorded (the ``to_dict`` of one of ``AdapterConfig``)."""
    method = recorded.get("method", "reft")
    if method in ("lora", "dora"):
        return LoraConfig(
            rank=recorded["rank"],
            alpha=recorded["alpha"],
            dropout=recorded["dropout"],
            target_modules=tuple(recorded["target_modules"]),
            use_dora=method == "dora",
        )
    if method == "full":
        return FullConfig()
    return ReftConfig(
        intervention=recorded["intervention"],
        layers=tuple(recorded["layers"]),
        prefix=recorded["prefix"],
        suffix=recorded["suffix"],
        tied=recorded["tied"],
        rank=recorded["rank"],
        dropout=recorded["dropout"],
    )
