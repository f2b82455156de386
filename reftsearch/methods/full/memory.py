"""Whether full fine-tuning fits in memory, estimated before any trial trains.

Training every weight with AdamW holds, besides the loaded (frozen) model: a float32 copy of
the weights, their gradients and AdamW's two moments (16 bytes a weight), plus the
activations backward needs. Those are counted per block as Korthikanti et al. (2022) count
them for a transformer layer, (17 h + 2.5 heads x tokens) values a token, in float32, plus
the logits of an LM head. It is an estimate, made to refuse a study that cannot run (exit 2)
rather than to fail every trial with out of memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from reftsearch.errors import SpecError
from reftsearch.models.base import BaseModel

MB = 2**20
TRAINED_BYTES = 16  # float32 copy + gradient + AdamW's exp_avg and exp_avg_sq


@dataclass(frozen=True)
class MemoryNeed:
    weights: int  # the loaded model
    training_state: int  # copies, gradients, AdamW moments
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.training_state + self.activations

    def describe(self) -> str:
        return (
            f"{self.total / MB:.0f} MB (loaded weights {self.weights / MB:.0f} + float32 copy, "
            f"gradients and AdamW moments {self.training_state / MB:.0f} + activations "
            f"{self.activations / MB:.0f})"
        )


def memory_need(base: BaseModel, batch_size: int, tokens: int) -> MemoryNeed:
    """What training every weight of ``base`` takes on batches of ``batch_size`` x ``tokens``."""
    params = list(base.model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    config = base.model.config
    heads = getattr(config, "num_attention_heads", 1)
    per_token = base.num_layers * (17 * base.hidden_size + 2.5 * heads * tokens)
    if base.head is None:  # logits over the vocabulary, and their gradient
        per_token += 2 * base.model.get_output_embeddings().weight.shape[0]
    activations = int(4 * batch_size * tokens * per_token)
    return MemoryNeed(weights, TRAINED_BYTES * sum(p.numel() for p in params), activations)


def available_memory(base: BaseModel) -> int:
    """Bytes the loaded model plus what is free now on its device add up to."""
    loaded = sum(p.numel() * p.element_size() for p in base.model.parameters())
    if base.device.type == "cuda":
        return loaded + torch.cuda.mem_get_info(base.device)[0]
    return loaded + psutil.virtual_memory().available  # Linux: MemAvailable


def check_fits(base: BaseModel, batch_size: int, tokens: int, memory_mb: float | None) -> None:
    """Refuse (exit 2) a full fine-tuning study whose largest batch would not fit."""
    need = memory_need(base, batch_size, tokens)
    limit = None if memory_mb is None else int(memory_mb * MB)
    where = "resources.memory_mb"
    if limit is None:
        limit, where = available_memory(base), f"free on {base.device.type}"
    if need.total <= limit:
        return
    raise SpecError(
        "method",
        f"'full' trains every weight of the model: batches of {batch_size} x {tokens} tokens "
        f"need about {need.describe()}, more than the {limit / MB:.0f} MB {where}; use a "
        "smaller batch_size, max_length or model, or method lora, dora or reft",
    )
