"""What a training step minimises: the mean loss of a batch, or of each trial's rows in it.

Shared by training (``train.py``, ``packing.py``) and by dev scoring with ``metric: loss``.
"""

from __future__ import annotations

import torch
from torch import nn

from reftsearch.data.batches import IGNORE_INDEX, Batch
from reftsearch.methods.adapter import Adapter
from reftsearch.models.base import BaseModel


def loss_of(base: BaseModel, adapter: Adapter, batch: Batch) -> torch.Tensor:
    """Mean loss of one batch with the interventions at this batch's prompt positions."""
    adapter.set_locations(batch.prompt_lengths, batch.offsets)
    return span_losses(base, batch, [slice(None)])[0]


def span_losses(base: BaseModel, batch: Batch, spans: list[slice]) -> list[torch.Tensor]:
    """Mean loss of each span of batch rows (each span one trial's rows when packed)."""
    if base.head is not None:
        logits = base.model(**batch.model_inputs()).logits
        per_row = nn.functional.cross_entropy(logits.float(), batch.labels, reduction="none")
        return [per_row[span].mean() for span in spans]
    return _supervised_token_losses(base, batch, spans)


def supervised_logits(base: BaseModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder's next-token logits where a label exists (the response), row after row, and
    where that is (``batch.labels``, shifted by ``collate``: each column's next token).

    The vocabulary projection is the most expensive matmul of a small decoder; running it on
    every prompt and pad token would waste most of it.
    """
    hidden = base.model.base_model(**batch.model_inputs()).last_hidden_state
    supervised = batch.labels != IGNORE_INDEX
    return base.model.get_output_embeddings()(hidden[supervised]), supervised


def _supervised_token_losses(
    base: BaseModel, batch: Batch, spans: list[slice]
) -> list[torch.Tensor]:
    """Next-token losses computing the LM head only on the response (``supervised_logits``)."""
    logits, supervised = supervised_logits(base, batch)
    targets = batch.labels
    per_token = nn.functional.cross_entropy(logits.float(), targets[supervised], reduction="none")
    row_of = torch.arange(len(targets), device=targets.device)[:, None].expand_as(targets)
    row_of = row_of[supervised]
    rows = torch.arange(len(targets), device=targets.device)
    return [per_token[torch.isin(row_of, rows[span])].mean() for span in spans]
