"""Frozen-prefix activation cache: block outputs below the interventions, computed once.

The base model is frozen and in eval mode, so the output of block ``L`` (before any
intervention edits it) is the same for an example in every epoch and in every trial whose
lowest intervened layer is ``L``. ``PrefixCache`` computes it once per worker per (layer,
split), keeps it within a memory budget (least recently used first out), and replays it.

Replaying swaps the forward of blocks ``0..L`` for stand-ins during one forward pass: blocks
below ``L`` hand their input through, block ``L`` returns the cached rows of the batch. The
model's own forward still builds the attention mask, position ids and rotary embeddings and
calls the upper blocks with the arguments its family needs (Llama-style decoders, BERT-style
encoders alike), its head still pools as usual, and the intervention hooks on block ``L`` and
above fire as they do without a cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from reftsearch.data import Batch, Encoded, batches
from reftsearch.models import BaseModel

BUILD_BATCH_SIZE = 64


@dataclass
class CachedStates:
    """Block ``layer``'s output for every example of one split, unpadded and concatenated."""

    layer: int
    examples: list[Encoded]  # the tokenized split these rows belong to
    flat: torch.Tensor  # [total tokens + 1, hidden]; the last row is zeros, used for padding
    starts: torch.Tensor  # [examples] where each example's tokens start in ``flat``
    as_tuple: bool  # the block returns ``(hidden, ...)`` rather than a tensor

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    def gather(self, rows: torch.Tensor, mask: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The cached states of examples ``rows`` (``[rows, seq, hidden]``), laid out as a
        batch with attention ``mask`` and left-padding ``offsets`` holds them."""
        steps = torch.arange(mask.shape[1], device=mask.device)[None] - offsets[:, None]
        index = self.starts.to(mask.device)[rows][:, None] + steps
        pad_row = len(self.flat) - 1
        return self.flat[torch.where(mask.bool(), index, pad_row).to(self.flat.device)]

    def replaying(self, blocks: list[nn.Module], batch: Batch) -> AbstractContextManager:
        """``replaying`` the cached states of ``batch`` (made by ``collate_rows``)."""
        if batch.rows is None:
            raise ValueError("a batch replayed from the cache must know its rows (collate_rows)")
        states = self.gather(batch.rows, batch.attention_mask, batch.offsets)
        return replaying(blocks, self.layer, states, self.as_tuple)


@contextmanager
def replaying(
    blocks: list[nn.Module], layer: int, states: torch.Tensor, as_tuple: bool
) -> Iterator[None]:
    """Within this context the model's next forward starts from ``states``, the output of
    block ``layer``: blocks ``0..layer`` do not run (their forward hooks still do)."""
    output = (states,) if as_tuple else states

    def skip(hidden_states: torch.Tensor, *args, **kwargs):
        return (hidden_states,) if as_tuple else hidden_states

    def replay(*args, **kwargs):
        return output

    patched = blocks[: layer + 1]
    # an instance attribute shadows the class's forward; one set earlier (accelerate's
    # dispatch hooks do that) is put back afterwards
    saved = [block.__dict__.get("forward") for block in patched]
    for block in blocks[:layer]:
        block.forward = skip
    blocks[layer].forward = replay
    try:
        yield
    finally:
        for block, forward in zip(patched, saved, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


class PrefixCache:
    """Cached block outputs per (layer, split), least recently used dropped past the budget.

    A split whose states alone exceed the budget is not cached (``states`` returns None and
    the trial runs the full model, just slower).
    """

    def __init__(self, budget_mb: float) -> None:
        self.budget_bytes = int(budget_mb * 2**20)
        # keyed by the split's list too (an entry holds it, so its id cannot be reused): a
        # worker may train on several subsets of one split (reftsearch.fidelity's ladder)
        self._entries: OrderedDict[tuple[int, str, int], CachedStates] = OrderedDict()

    @property
    def used_bytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def states(
        self, base: BaseModel, layer: int, split: str, examples: list[Encoded]
    ) -> CachedStates | None:
        key = (layer, split, id(examples))
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry
        itemsize = torch.finfo(base.model.dtype).bits // 8
        need = (sum(len(e.input_ids) for e in examples) + 1) * base.hidden_size * itemsize
        if need > self.budget_bytes:
            return None
        while self._entries and self.used_bytes + need > self.budget_bytes:
            self._entries.popitem(last=False)
        entry = compute_states(base, layer, examples)
        self._entries[key] = entry
        return entry


class _Captured(Exception):
    """Raised by the capture hook to stop a forward once the wanted block has run."""

    def __init__(self, output) -> None:
        super().__init__()
        self.output = output


@torch.no_grad()
def compute_states(base: BaseModel, layer: int, examples: list[Encoded]) -> CachedStates:
    """Run ``examples`` up to block ``layer`` (not above) and keep its unedited output."""

    def capture(module: nn.Module, args: tuple, output) -> None:
        raise _Captured(output)

    # prepend: capture before any intervention hook on the same block could edit the output
    handle = base.blocks[layer].register_forward_hook(capture, prepend=True)
    pieces: list[torch.Tensor | None] = [None] * len(examples)
    as_tuple = False
    try:
        # right padding, sorted by length: a row's states do not depend on its batch
        for batch in batches(examples, BUILD_BATCH_SIZE, base.tokenizer.pad_token_id, bucket=True):
            batch = batch.to(base.device)
            try:
                base.model.base_model(**batch.model_inputs())
            except _Captured as captured:
                output = captured.output
            else:
                raise RuntimeError(f"block {layer} did not run in the forward pass")
            as_tuple = isinstance(output, tuple)
            hidden = output[0] if as_tuple else output
            for row, index, length in zip(
                hidden, batch.rows.tolist(), batch.attention_mask.sum(-1).tolist(), strict=True
            ):
                pieces[index] = row[:length]
    finally:
        handle.remove()
    lengths = torch.tensor([len(p) for p in pieces])
    flat = torch.cat([*pieces, pieces[0].new_zeros(1, pieces[0].shape[-1])])
    starts = torch.cumsum(lengths, 0) - lengths
    return CachedStates(layer, examples, flat, starts, as_tuple)
