"""Train one trial's interventions on a frozen model and score them on dev after every epoch.

Read top to bottom: ``train_trial`` is the loop; ``loss_of`` and ``evaluate`` are what a step
and a dev pass compute. The base model stays in eval mode throughout (its dropout off, its
weights frozen); only the interventions (and a classification head) learn.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from reftsearch.data.splits import (
    IGNORE_INDEX,
    Batch,
    Encoded,
    batch_rows,
    collate,
    collate_rows,
    pass_tokens,
    sorted_batch_rows,
)
from reftsearch.engine.activation_cache import FrozenParts, PrefixCache
from reftsearch.errors import ReftSearchError
from reftsearch.methods.reft.module import ReftModule
from reftsearch.metrics import (
    CLASSIFICATION_METRICS,
    GENERATION_METRICS,
    MAY_STILL_MATCH,
    PER_EXAMPLE,
)
from reftsearch.models.base import BaseModel, kv_argument

_TRAINED_HEAD = "trained_head"
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


@dataclass(frozen=True)
class DevScores:
    """One dev pass: the metric, and what each example contributed when the metric is the
    share of examples right (accuracy, exact match; ``None`` for f1, matthews, loss)."""

    score: float
    per_example: list[bool] | None = None


EpochCallback = Callable[[int, DevScores], None]


def train_trial(
    base: BaseModel,
    reft: ReftModule,
    data: SplitData,
    config: TrainConfig,
    on_epoch: EpochCallback | None = None,
    cache: PrefixCache | None = None,
) -> float:
    """Train ``reft`` for ``config.epochs`` epochs; returns the last dev score.

    ``on_epoch(epoch, dev_scores)`` runs after each epoch's dev pass; it may raise (e.g.
    ``optuna.TrialPruned``) to stop the trial early. With a ``cache``, the frozen blocks
    below the lowest intervened layer run once per worker instead of every step.
    """
    torch.manual_seed(config.seed)
    run = TrialRun(reft, data, config, reset_head(base, config.seed), on_epoch)
    with Pack(base, cache) as pack:
        pack.add(run)
        while True:
            for _, error in pack.step():
                if error is not None:
                    raise error
                return run.score


class TrialRun:
    """One trial's training state, advanced a step at a time so that several trials can
    share one forward pass (``Pack``): its batches, optimizer, schedule and dev scores."""

    def __init__(
        self,
        reft: ReftModule,
        data: SplitData,
        config: TrainConfig,
        head: nn.Module | None,
        on_epoch: EpochCallback | None = None,
    ) -> None:
        self.reft = reft
        self.data = data
        self.config = config
        self.head = head
        self.on_epoch = on_epoch
        self.optimizer = build_optimizer(reft, head, config)
        total_steps = math.ceil(len(data.train) / config.batch_size) * config.epochs
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, round(config.warmup_ratio * total_steps), total_steps
        )
        self.epoch = 1
        self.score = math.nan
        self._lengths = [len(e.input_ids) for e in data.train]
        self._order = torch.Generator().manual_seed(config.seed)
        self._batches = self._epoch_batches()

    @property
    def finished(self) -> bool:
        return self.epoch > self.config.epochs

    @property
    def epoch_over(self) -> bool:
        return not self._batches

    @property
    def batches_left(self) -> list[list[int]]:
        """Rows of each batch this epoch has still to train, in order."""
        return list(self._batches)

    def take_rows(self) -> list[int]:
        """Rows (of the train split) of this trial's next batch."""
        return self._batches.pop(0)

    def step(self) -> None:
        """Apply the gradients of the last backward pass."""
        nn.utils.clip_grad_norm_(_trainable(self.reft, self.head), MAX_GRAD_NORM)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def end_epoch(self, scores: DevScores) -> None:
        """Record the dev score of the epoch just trained (``on_epoch`` may raise)."""
        self.score = scores.score
        if self.on_epoch is not None:
            self.on_epoch(self.epoch, scores)
        self.epoch += 1
        if not self.finished:
            self._batches = self._epoch_batches()

    def _epoch_batches(self) -> list[list[int]]:
        # seeded per trial and bucketed by length: the same batches alone, packed or cached
        return batch_rows(self._lengths, self.config.batch_size, self._order, bucket=True)


Ended = tuple[TrialRun, BaseException | None]


class Pack:
    """Trials trained side by side: one frozen forward per step over all their batches,
    each trial's rows through its own interventions (and its own classification head).

    Each trial keeps its own optimizer, schedule, dev scores and pruning decision; a trial
    that ends leaves the pack and another may join (reftsearch.run.packing). A single trial is
    the same thing with one member, which is how ``train_trial`` runs.
    """

    def __init__(self, base: BaseModel, cache: PrefixCache | None = None) -> None:
        self.base = base
        self.cache = cache
        self.runs: list[TrialRun] = []
        self._detach: dict[int, ExitStack] = {}
        self._heads: list[tuple[TrialRun, slice]] = []  # whose head serves which batch rows

    def __enter__(self) -> Pack:
        return self

    def __exit__(self, *exc) -> None:
        for run in list(self.runs):
            self.remove(run)

    def add(self, run: TrialRun) -> None:
        stack = ExitStack()
        stack.enter_context(run.reft.attached(self.base.blocks))
        self._detach[id(run)] = stack
        self.runs.append(run)

    def remove(self, run: TrialRun) -> None:
        self.runs.remove(run)
        self._detach.pop(id(run)).close()

    def step(self) -> list[Ended]:
        """One training step of every member, then the dev pass of those whose epoch ended.

        Returns the members that ended (finished, or stopped by an error, e.g. a diverged
        loss or ``optuna.TrialPruned`` from ``on_epoch``); they have left the pack.
        """
        ended: list[Ended] = []
        runs = list(self.runs)
        spans, rows, examples = [], [], []
        for run in runs:  # each member's rows index its own train list (they may differ)
            taken = run.take_rows()
            spans.append(slice(len(rows), len(rows) + len(taken)))
            rows += taken
            examples += [run.data.train[i] for i in taken]
        frozen = self._frozen(runs)
        starts = None
        if frozen is not None:  # a decoder starts each row after its unedited tokens
            groups = [
                (examples[span], run.reft.config.prefix, run.reft.config.suffix)
                for run, span in zip(runs, spans, strict=True)
            ]
            starts = frozen.starts(groups)
        batch = collate(examples, self.base.tokenizer.pad_token_id, starts=starts)
        batch.rows = torch.tensor(rows)
        batch = batch.to(self.base.device)
        if starts is not None:
            frozen.add_past(batch, spans, starts)
        for run, span in zip(runs, spans, strict=True):
            run.reft.set_locations(
                batch.prompt_lengths[span],
                batch.offsets[span],
                torch.arange(span.start, span.stop),
            )
        self._heads = list(zip(runs, spans, strict=True))
        for run in runs:
            run.reft.train()
        replayed = frozen.replaying(self.base.blocks, batch, spans) if frozen else nullcontext()
        with self._routed(), replayed, self.base.training_attention():
            losses = span_losses(self.base, batch, spans)
        kept = []
        for run, loss in zip(runs, losses, strict=True):
            if torch.isfinite(loss):
                kept.append((run, loss))
            else:
                error = DivergedError(f"training loss became {loss.item()} in epoch {run.epoch}")
                ended.append((run, error))
        if kept:
            torch.stack([loss for _, loss in kept]).sum().backward()
        for run, _ in kept:
            run.step()
            if run.epoch_over:
                try:
                    run.end_epoch(self.score(run))
                except Exception as error:  # pruned, or the dev pass failed: this trial only
                    ended.append((run, error))
                    continue
                if run.finished:
                    ended.append((run, None))
        for run in runs:
            run.reft.clear_locations()
        for run, _ in ended:
            self.remove(run)
        return ended

    def score(self, run: TrialRun) -> DevScores:
        """``run``'s dev scores, the other members passing everything through untouched."""
        for other in self.runs:
            other.reft.clear_locations()
        self._heads = [(run, slice(None))]
        with self._routed():
            return evaluate_examples(self.base, run.reft, run.data, cache=self.cache)

    def _frozen(self, runs: list[TrialRun]) -> FrozenParts | None:
        """What the members' step can take from the cache, from their lowest intervened layer
        up (each member's rows from its own train list); None: the full forward."""
        if self.cache is None:  # only ReFT trials get one: LoRA changes every block it is in
            return None
        layer = min(min(run.reft.config.layers) for run in runs)
        return self.cache.frozen(self.base, layer, "train", [run.data.train for run in runs])

    @contextmanager
    def _routed(self) -> Iterator[None]:
        """Members that own copies of the classification head get their rows' head outputs
        from them: the model's head modules still run (a negligible cost), but each row's
        output is replaced by its trial's. Hooked for one pass only, so that copying the
        model's head (``own_head``) never copies the hooks."""
        if all(run.head is self.base.head for run, _ in self._heads):
            yield
            return
        with ExitStack() as hooks:
            for index, part in enumerate(_head_parts(self.base.head)):

                def hook(module, args, output, index=index):
                    return torch.cat(
                        [_head_parts(run.head)[index](args[0][rows]) for run, rows in self._heads]
                    )

                hooks.enter_context(part.register_forward_hook(hook))
            yield


def own_head(base: BaseModel, seed: int) -> nn.Module | None:
    """A classification head of a packed trial's own, initialised as ``reset_head(seed)``."""
    return copy.deepcopy(reset_head(base, seed))


def keep_head(adapter: nn.Module, head: nn.Module | None) -> None:
    """Remember the head a packed trial trained with ``adapter`` (see ``trained_head``); a
    plain attribute, so that it stays out of the adapter's parameters and state dict."""
    adapter.__dict__[_TRAINED_HEAD] = head


def trained_head(base: BaseModel, adapter: nn.Module) -> nn.Module | None:
    """The classification head trained with ``adapter``: a packed trial's own copy, else the
    model's (a trial alone trains the model's head in place)."""
    return adapter.__dict__.get(_TRAINED_HEAD, base.head)


def _head_parts(head: nn.Module) -> list[nn.Module]:
    return list(head) if isinstance(head, nn.ModuleList) else [head]


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
    return span_losses(base, batch, [slice(None)])[0]


def span_losses(base: BaseModel, batch: Batch, spans: list[slice]) -> list[torch.Tensor]:
    """Mean loss of each span of batch rows (each span one trial's rows when packed)."""
    if base.head is not None:
        logits = base.model(**batch.model_inputs()).logits
        per_row = nn.functional.cross_entropy(logits.float(), batch.labels, reduction="none")
        return [per_row[span].mean() for span in spans]
    return _supervised_token_losses(base, batch, spans)


def _supervised_token_losses(
    base: BaseModel, batch: Batch, spans: list[slice]
) -> list[torch.Tensor]:
    """Next-token losses computing the LM head only where a label exists (the response).

    The vocabulary projection is the most expensive matmul of a small decoder; running it on
    every prompt and pad token would waste most of it.
    """
    hidden = base.model.base_model(**batch.model_inputs()).last_hidden_state
    targets = batch.labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    logits = base.model.get_output_embeddings()(hidden[:, :-1][supervised])
    per_token = nn.functional.cross_entropy(logits.float(), targets[supervised], reduction="none")
    row_of = torch.arange(len(targets), device=targets.device)[:, None].expand_as(targets)
    row_of = row_of[supervised]
    rows = torch.arange(len(targets), device=targets.device)
    return [per_token[torch.isin(row_of, rows[span])].mean() for span in spans]


def evaluate(
    base: BaseModel,
    reft: ReftModule,
    data: SplitData,
    examples: list[Encoded] | None = None,
    cache: PrefixCache | None = None,
) -> float:
    """The metric on ``examples`` (dev by default), batched and without gradients."""
    return evaluate_examples(base, reft, data, examples, cache).score


@torch.no_grad()
def evaluate_examples(
    base: BaseModel,
    reft: ReftModule,
    data: SplitData,
    examples: list[Encoded] | None = None,
    cache: PrefixCache | None = None,
    limit: int | None = None,
) -> DevScores:
    """The metric on ``examples`` (dev by default, its first ``limit`` only if given) and,
    for a share-of-right metric, each example's hit. Batches hold rows of similar length
    (less padding); results come back in example order.
    """
    frozen = None
    if examples is None and cache is not None:
        # rows index the dev list, so the first ``limit`` examples find their cached rows
        frozen = cache.frozen(base, min(reft.config.layers), "dev", [data.dev])
    examples = (data.dev if examples is None else examples)[:limit]
    reft.eval()
    if data.metric == "loss":
        return DevScores(_mean_loss(base, reft, examples, frozen))
    if data.kind == "classification":
        outputs = _classify(base, reft, examples, frozen)
        targets = [e.label for e in examples]
        metric = CLASSIFICATION_METRICS[data.metric]
    else:
        targets = [e.target for e in examples]
        hopeless = hopeless_for(data.metric, targets)
        outputs = generate(base, reft, examples, data.max_new_tokens, frozen, hopeless)
        metric = GENERATION_METRICS[data.metric]
    hits = PER_EXAMPLE.get(data.metric)
    return DevScores(metric(outputs, targets), None if hits is None else hits(outputs, targets))


def hopeless_for(metric: str, targets: list[str]) -> Callable[[int, str], bool] | None:
    """``generate``'s test of an output that can no longer score under ``metric``, if any."""
    may_match = MAY_STILL_MATCH.get(metric)
    if may_match is None:
        return None
    return lambda index, text: not may_match(text, targets[index])


def _mean_loss(
    base: BaseModel, reft: ReftModule, examples: list[Encoded], frozen: FrozenParts | None
) -> float:
    total, count = 0.0, 0
    for batch in _eval_batches(base, reft, examples, frozen):
        n = len(batch.input_ids)
        with _replaying(base, frozen, batch):
            total += loss_of(base, reft, batch).item() * n
        count += n
    return total / count


def _classify(
    base: BaseModel, reft: ReftModule, examples: list[Encoded], frozen: FrozenParts | None
) -> list[int]:
    predictions = [0] * len(examples)
    for batch in _eval_batches(base, reft, examples, frozen):
        reft.set_locations(batch.prompt_lengths, batch.offsets)
        with _replaying(base, frozen, batch):
            predicted = base.model(**batch.model_inputs()).logits.argmax(-1)
        for row, label in zip(batch.rows.tolist(), predicted.tolist(), strict=True):
            predictions[row] = label
    return predictions


def _eval_batches(
    base: BaseModel,
    reft: ReftModule,
    examples: list[Encoded],
    frozen: FrozenParts | None,
    prompt_only: bool = False,
) -> list[Batch]:
    """Batches of rows of similar length; prompts only (left-padded) for generation. With
    ``frozen``, a decoder's rows start after their unedited tokens
    (reftsearch.engine.activation_cache)."""
    starts = None
    if frozen is not None:
        starts = frozen.starts([(examples, reft.config.prefix, reft.config.suffix)])
    # by full length even when rows start later: the cached keys and values are padded too
    lengths = [e.prompt_length if prompt_only else len(e.input_ids) for e in examples]
    pad_id = base.tokenizer.pad_token_id
    batched = []
    # generation's one-token steps read every weight whatever the rows: as many as allowed
    max_tokens = None if prompt_only else pass_tokens(base.device)
    for rows in sorted_batch_rows(lengths, max_tokens, EVAL_BATCH_SIZE):
        row_starts = None if starts is None else [starts[i] for i in rows]
        batch = collate_rows(
            examples, rows, pad_id, left_pad=prompt_only, prompt_only=prompt_only, starts=row_starts
        ).to(base.device)
        if row_starts is not None:
            frozen.add_past(batch, [slice(None)], row_starts)
        batched.append(batch)
    return batched


def _replaying(base: BaseModel, frozen: FrozenParts | None, batch: Batch) -> AbstractContextManager:
    return frozen.replaying(base.blocks, batch, [slice(None)]) if frozen else nullcontext()


def generate(
    base: BaseModel,
    reft: ReftModule,
    examples: list[Encoded],
    max_new_tokens: int,
    frozen: FrozenParts | None = None,
    hopeless: Callable[[int, str], bool] | None = None,
) -> list[str]:
    """Greedy decoding, batched with left padding.

    The interventions edit the prompt pass only (as pyreft does); later one-token steps read
    the edited prompt through the key/value cache. With ``frozen`` the prompt pass starts at
    the cached layer, and the keys and values of the blocks it skipped come from the cache.

    A batch decodes until each row has ended (end of sequence, or ``max_new_tokens``) or,
    with ``hopeless``, until each row has ended or is hopeless: ``hopeless(index, text)``
    says whether example ``index``'s text so far can no longer score. Such a row's text may
    then stop short; a trial still learning to answer would otherwise decode every row to
    ``max_new_tokens``, as its wrong answers rarely end.
    """
    if frozen is not None and frozen.keys_values is None:
        frozen = None  # the one-token steps need every block's keys and values
    tokenizer = base.tokenizer
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        # it joins " 's" into "'s" once the "s" comes: a text so far is no beginning of the
        # final one, so none can be judged early
        hopeless = None
    argument = kv_argument(base.model)
    last_only = _last_logits_only(base)
    texts = [""] * len(examples)
    for batch in _eval_batches(base, reft, examples, frozen, prompt_only=True):
        reft.set_locations(batch.prompt_lengths, batch.offsets)
        with _replaying(base, frozen, batch):
            out = base.model(**batch.model_inputs(), use_cache=True, **last_only)
        reft.clear_locations()
        cache = getattr(out, argument)
        mask = batch.attention_mask
        if frozen is not None:
            _fill_skipped_blocks(cache, frozen, batch)
            if batch.past is not None:
                mask = torch.cat([batch.past.mask, mask], dim=1)
        generated = []
        done = torch.zeros(len(mask), dtype=torch.bool, device=mask.device)
        for _ in range(max_new_tokens):
            token = out.logits[:, -1].argmax(-1)
            generated.append(token)
            done |= token == tokenizer.eos_token_id
            if hopeless is not None:
                done |= _hopeless_rows(tokenizer, hopeless, batch.rows, generated, done)
            if done.all():
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = base.model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=mask.sum(-1, keepdim=True) - 1,
                use_cache=True,
                **{argument: cache},
            )
            cache = getattr(out, argument)
        tokens = torch.stack(generated, dim=1).tolist()
        for index, row in zip(batch.rows.tolist(), tokens, strict=True):
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            texts[index] = tokenizer.decode(row, skip_special_tokens=True)
    return texts


def _hopeless_rows(
    tokenizer,
    hopeless: Callable[[int, str], bool],
    rows: torch.Tensor,
    generated: list[torch.Tensor],
    done: torch.Tensor,
) -> torch.Tensor:
    """Which rows not ``done`` are ``hopeless`` with the tokens ``generated`` so far.

    A row's text so far is the beginning of its final text (what ``hopeless`` assumes), but
    for a character whose bytes are split between tokens: it decodes as U+FFFD until
    complete, so those are left out."""
    pending = (~done).nonzero().flatten().tolist()
    # one copy from the device per step, not one per row
    tokens = torch.stack(generated, dim=1)[pending].tolist()
    verdicts = [
        hopeless(index, tokenizer.decode(row, skip_special_tokens=True).rstrip("\ufffd"))
        for index, row in zip(rows[pending].tolist(), tokens, strict=True)
    ]
    found = torch.zeros_like(done)
    found[pending] = torch.tensor(verdicts, dtype=torch.bool, device=done.device)
    return found


def _fill_skipped_blocks(cache, frozen: FrozenParts, batch: Batch) -> None:
    """Blocks ``0..frozen.layer`` did not run on the prompt pass's tokens: append their
    frozen keys and values, so that the one-token steps find every block's."""
    first = (batch.attention_mask == 0).sum(-1) - batch.offsets  # left padding - offset
    width = batch.input_ids.shape[1]
    keys, values = frozen.keys_values[0].gather(
        batch.rows, first, batch.prompt_lengths, batch.offsets, width
    )
    for layer in range(frozen.layer + 1):
        cache.update(keys[layer], values[layer], layer)


def _last_logits_only(base: BaseModel) -> dict:
    """The prompt pass of generation needs the logits of the last position only."""
    parameters = inspect.signature(base.model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}


def reset_head(base: BaseModel, seed: int) -> nn.Module | None:
    """The model's classification head re-initialised from ``seed`` (None for an LM)."""
    if base.head is not None:
        base.reset_head(seed)
    return base.head


def _trainable(reft: ReftModule, head: nn.Module | None) -> list[nn.Parameter]:
    params = list(reft.parameters())
    if head is not None:
        params += [p for p in head.parameters() if p.requires_grad]
    return params
