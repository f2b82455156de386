"""Train one trial's adapter on a frozen model and score it on dev after every epoch.

Read top to bottom: ``train_trial`` is the loop. A step's forward (``forward_losses``) is
written once, for any number of trials: ``packing.py`` trains several side by side with the
same forward, optimizer and schedule, one member per trial. The base model stays in eval mode
throughout (its dropout off, its weights frozen); only the adapter (and a classification
head) learn.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from reftsearch.data.batches import Encoded, SplitData, batch_rows, collate
from reftsearch.engine.activation_cache import PrefixCache
from reftsearch.engine.losses import span_losses
from reftsearch.engine.scoring import DevScores, evaluate_examples
from reftsearch.errors import ReftSearchError
from reftsearch.methods.adapter import Adapter
from reftsearch.models.base import BaseModel

MAX_GRAD_NORM = 1.0  # as HF Trainer (and so pyreft's ReftTrainer) by default


class DivergedError(ReftSearchError):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True)
class TrainConfig:
    lr: float
    epochs: int
    batch_size: int
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    seed: int = 42


@dataclass(frozen=True)
class Trained:
    """What training a trial gives back: its last dev score, and the classification head it
    trained (the model's own when alone, a copy of its own when packed; None for an LM)."""

    score: float
    head: nn.Module | None


EpochCallback = Callable[[int, DevScores], None]
# one trial's share of a training step: its adapter, its train examples, its batch's rows
Member = tuple[Adapter, list[Encoded], list[int]]


def train_trial(
    base: BaseModel,
    adapter: Adapter,
    data: SplitData,
    config: TrainConfig,
    on_epoch: EpochCallback | None = None,
    cache: PrefixCache | None = None,
) -> Trained:
    """Train ``adapter`` for ``config.epochs`` epochs on ``data.train``, scoring it on
    ``data.dev`` after each.

    ``on_epoch(epoch, dev_scores)`` runs after each epoch's dev pass; it may raise (e.g.
    ``optuna.TrialPruned``) to stop the trial early. With a ``cache``, the frozen blocks
    below the lowest intervened layer run once per worker instead of every step.
    """
    torch.manual_seed(config.seed)  # the interventions' dropout
    head = reset_head(base, config.seed)
    optimizer = build_optimizer(adapter, head, config)
    scheduler = build_scheduler(optimizer, config, len(data.train))
    # batches drawn from the trial's own generator: the same ones alone, packed or cached
    order = torch.Generator().manual_seed(config.seed)
    lengths = [len(e.input_ids) for e in data.train]
    params = trainable(adapter, head)
    score = math.nan
    with adapter.attached(base.blocks):
        for epoch in range(1, config.epochs + 1):
            for rows in epoch_batches(lengths, config.batch_size, order):
                (loss,) = forward_losses(base, cache, [(adapter, data.train, rows)])
                if not torch.isfinite(loss):
                    raise diverged(loss, epoch)
                loss.backward()
                optimizer_step(params, optimizer, scheduler)
            dev = evaluate_examples(base, adapter, data, cache=cache)
            score = dev.score
            if on_epoch is not None:
                on_epoch(epoch, dev)
    return Trained(score, head)


def epoch_batches(lengths: list[int], batch_size: int, order: torch.Generator) -> list[list[int]]:
    """One epoch's batches (rows of the train split), shuffled by ``order`` and bucketed by
    length, so that a batch holds little padding."""
    return batch_rows(lengths, batch_size, order, bucket=True)


def forward_losses(
    base: BaseModel,
    cache: PrefixCache | None,
    members: Sequence[Member],
    heads: Sequence[nn.Module | None] | None = None,
) -> list[torch.Tensor]:
    """One training forward over every member's batch stacked into one: each member's mean
    loss, its rows through its own adapter (and, given ``heads``, its own classification
    head).

    With ``cache`` (ReFT only: LoRA changes every block it sits in), the blocks below the
    members' lowest intervened layer are replayed from the cache, and a decoder's rows start
    after their unedited tokens (``activation_cache``)."""
    spans, rows, examples = [], [], []
    for _, train, taken in members:  # each member's rows index its own train list
        spans.append(slice(len(rows), len(rows) + len(taken)))
        rows += taken
        examples += [train[i] for i in taken]
    frozen, starts = None, None
    if cache is not None:
        layer = min(min(adapter.config.layers) for adapter, _, _ in members)
        frozen = cache.frozen(base, layer, "train", [train for _, train, _ in members])
    if frozen is not None:
        groups = [
            (examples[span], adapter.config.prefix, adapter.config.suffix)
            for (adapter, _, _), span in zip(members, spans, strict=True)
        ]
        starts = frozen.starts(groups)
    batch = collate(examples, base.tokenizer.pad_token_id, starts=starts)
    batch.rows = torch.tensor(rows)
    batch = batch.to(base.device)
    if starts is not None:
        frozen.add_past(batch, spans, starts)
    for (adapter, _, _), span in zip(members, spans, strict=True):
        adapter.set_locations(
            batch.prompt_lengths[span], batch.offsets[span], torch.arange(span.start, span.stop)
        )
        adapter.train()
    routed = routed_heads(base, list(zip(heads, spans, strict=True))) if heads else nullcontext()
    replayed = frozen.replaying(base.blocks, batch, spans) if frozen else nullcontext()
    with routed, replayed, base.training_attention():
        losses = span_losses(base, batch, spans)
    for adapter, _, _ in members:  # the graph holds what backward needs
        adapter.clear_locations()
    return losses


def diverged(loss: torch.Tensor, epoch: int) -> DivergedError:
    return DivergedError(f"training loss became {loss.item()} in epoch {epoch}")


def optimizer_step(
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Apply the gradients of the last backward pass, clipped as HF Trainer clips them."""
    nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def build_optimizer(
    adapter: Adapter, head: nn.Module | None, config: TrainConfig
) -> torch.optim.Optimizer:
    """AdamW; R of LoReFT sits in a group without weight decay (it would collapse)."""
    no_decay = {id(p) for p in adapter.no_decay_parameters()}
    params = trainable(adapter, head)
    groups = [
        {
            "params": [p for p in params if id(p) not in no_decay],
            "weight_decay": config.weight_decay,
        },
        {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, n_examples: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup over ``config.warmup_ratio`` of the steps, then linear decay to 0: the
    factors of transformers' ``get_linear_schedule_with_warmup``, whose module imports peft
    and the Trainer's utilities (~0.8 s of every process's start)."""
    total_steps = math.ceil(n_examples / config.batch_size) * config.epochs
    warmup_steps = round(config.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def trainable(adapter: Adapter, head: nn.Module | None) -> list[nn.Parameter]:
    params = list(adapter.parameters())
    if head is not None:
        params += [p for p in head.parameters() if p.requires_grad]
    return params


def reset_head(base: BaseModel, seed: int) -> nn.Module | None:
    """The model's classification head re-initialised from ``seed`` (None for an LM)."""
    if base.head is not None:
        base.reset_head(seed)
    return base.head


@contextmanager
def routed_heads(base: BaseModel, heads: list[tuple[nn.Module | None, slice]]) -> Iterator[None]:
    """Each span of batch rows gets its head outputs from its own copy of the classification
    head: the model's head modules still run (a negligible cost), but each row's output is
    replaced by its trial's. Hooked for one pass only, so that copying the model's head
    (``packing.own_head``) never copies the hooks."""
    if all(head is base.head for head, _ in heads):
        yield
        return
    with ExitStack() as hooks:
        for index, part in enumerate(_head_parts(base.head)):

            def hook(module, args, output, index=index):
                return torch.cat([_head_parts(head)[index](args[0][rows]) for head, rows in heads])

            hooks.enter_context(part.register_forward_hook(hook))
        yield


def _head_parts(head: nn.Module) -> list[nn.Module]:
    return list(head) if isinstance(head, nn.ModuleList) else [head]
