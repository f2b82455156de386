"""Train one trial's interventions on a frozen model and score them on dev after every epoch.

Read top to bottom: ``train_trial`` is the loop; ``loss_of`` and ``evaluate`` are what a step
and a dev pass compute. The base model stays in eval mode throughout (its dropout off, its
weights frozen); only the interventions (and a classification head) learn.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from reftsearch.data import IGNORE_INDEX, Batch, Encoded, batches
from reftsearch.errors import ReftSearchError
from reftsearch.metrics import CLASSIFICATION_METRICS
from reftsearch.models import BaseModel
from reftsearch.reft import ReftModule

MAX_GRAD_NORM = 1.0  # as HF Trainer (and so pyreft's ReftTrainer) by default
EVAL_BATCH_SIZE = 64


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
class SplitData:
    train: list[Encoded]
    dev: list[Encoded]
    kind: str  # classification | generation
    metric: str
    max_new_tokens: int = 32


EpochCallback = Callable[[int, float], None]


def train_trial(
    base: BaseModel,
    reft: ReftModule,
    data: SplitData,
    config: TrainConfig,
    on_epoch: EpochCallback | None = None,
) -> float:
    """Train ``reft`` for ``config.epochs`` epochs; returns the last dev score.

    ``on_epoch(epoch, score)`` runs after each epoch's dev pass; it may raise (e.g.
    ``optuna.TrialPruned``) to stop the trial early.
    """
    torch.manual_seed(config.seed)
    head = _reset_head(base, config.seed)
    optimizer = build_optimizer(reft, head, config)
    steps_per_epoch = math.ceil(len(data.train) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = get_linear_schedule_with_warmup(
        optimizer, round(config.warmup_ratio * total_steps), total_steps
    )
    order = torch.Generator().manual_seed(config.seed)
    pad_id = base.tokenizer.pad_token_id
    device = base.device
    score = math.nan
    with reft.attached(base.blocks):
        for epoch in range(1, config.epochs + 1):
            reft.train()
            for batch in batches(data.train, config.batch_size, pad_id, generator=order):
                loss = loss_of(base, reft, batch.to(device))
                if not torch.isfinite(loss):
                    raise DivergedError(f"training loss became {loss.item()} in epoch {epoch}")
                loss.backward()
                nn.utils.clip_grad_norm_(_trainable(reft, head), MAX_GRAD_NORM)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            score = evaluate(base, reft, data)
            if on_epoch is not None:
                on_epoch(epoch, score)
    return score


def build_optimizer(
    reft: ReftModule, head: nn.Module | None, config: TrainConfig
) -> torch.optim.Optimizer:
    """AdamW; R of LoReFT sits in a group without weight decay (it would collapse)."""
    no_decay = {id(p) for p in reft.no_decay_parameters()}
    params = _trainable(reft, head)
    groups = [
        {
            "params": [p for p in params if id(p) not in no_decay],
            "weight_decay": config.weight_decay,
        },
        {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)


def loss_of(base: BaseModel, reft: ReftModule, batch: Batch) -> torch.Tensor:
    """Mean loss of one batch with the interventions at this batch's prompt positions."""
    reft.set_locations(batch.prompt_lengths, batch.offsets)
    if base.head is not None:
        logits = base.model(**batch.model_inputs()).logits
        return nn.functional.cross_entropy(logits.float(), batch.labels)
    return _supervised_token_loss(base, batch)


def _supervised_token_loss(base: BaseModel, batch: Batch) -> torch.Tensor:
    """Next-token loss computing the LM head only where a label exists (the response).

    The vocabulary projection is the most expensive matmul of a small decoder; running it on
    every prompt and pad token would waste most of it.
    """
    hidden = base.model.base_model(**batch.model_inputs()).last_hidden_state
    targets = batch.labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    logits = base.model.get_output_embeddings()(hidden[:, :-1][supervised])
    return nn.functional.cross_entropy(logits.float(), targets[supervised])


@torch.no_grad()
def evaluate(
    base: BaseModel, reft: ReftModule, data: SplitData, examples: list[Encoded] | None = None
) -> float:
    """The metric on ``examples`` (dev by default), batched and without gradients."""
    examples = data.dev if examples is None else examples
    reft.eval()
    if data.metric == "loss":
        return _mean_loss(base, reft, examples)
    if data.kind == "classification":
        predictions = _classify(base, reft, examples)
        targets = [e.label for e in examples]
        return CLASSIFICATION_METRICS[data.metric](predictions, targets)
    outputs = generate(base, reft, examples, data.max_new_tokens)
    return sum(
        normalize(o) == normalize(e.target) for o, e in zip(outputs, examples, strict=True)
    ) / len(examples)


def _mean_loss(base: BaseModel, reft: ReftModule, examples: list[Encoded]) -> float:
    total, count = 0.0, 0
    for batch in batches(examples, EVAL_BATCH_SIZE, base.tokenizer.pad_token_id):
        n = len(batch.input_ids)
        total += loss_of(base, reft, batch.to(base.device)).item() * n
        count += n
    return total / count


def _classify(base: BaseModel, reft: ReftModule, examples: list[Encoded]) -> list[int]:
    predictions: list[int] = []
    for batch in batches(examples, EVAL_BATCH_SIZE, base.tokenizer.pad_token_id):
        batch = batch.to(base.device)
        reft.set_locations(batch.prompt_lengths, batch.offsets)
        predictions += base.model(**batch.model_inputs()).logits.argmax(-1).tolist()
    return predictions


def generate(
    base: BaseModel, reft: ReftModule, examples: list[Encoded], max_new_tokens: int
) -> list[str]:
    """Greedy decoding, batched with left padding.

    The interventions edit the prompt pass only (as pyreft does); later one-token steps read
    the edited prompt through the key/value cache.
    """
    tokenizer = base.tokenizer
    texts: list[str] = []
    for batch in batches(
        examples, EVAL_BATCH_SIZE, tokenizer.pad_token_id, left_pad=True, prompt_only=True
    ):
        batch = batch.to(base.device)
        mask = batch.attention_mask
        reft.set_locations(batch.prompt_lengths, batch.offsets)
        out = base.model(
            input_ids=batch.input_ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
        )
        reft.clear_locations()
        generated = []
        done = torch.zeros(len(mask), dtype=torch.bool, device=mask.device)
        for _ in range(max_new_tokens):
            token = out.logits[:, -1].argmax(-1)
            generated.append(token)
            done |= token == tokenizer.eos_token_id
            if done.all():
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = base.model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=mask.sum(-1, keepdim=True) - 1,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
        for row in torch.stack(generated, dim=1).tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def normalize(text: str) -> str:
    return " ".join(text.split())


def _reset_head(base: BaseModel, seed: int) -> nn.Module | None:
    if base.head is not None:
        base.reset_head(seed)
    return base.head


def _trainable(reft: ReftModule, head: nn.Module | None) -> list[nn.Parameter]:
    params = list(reft.parameters())
    if head is not None:
        params += [p for p in head.parameters() if p.requires_grad]
    return params
