"""Tokenized examples -> padded batches: encoding, bucketing by length, collating.

A classification example is its text (or text pair) and a label; a generation example is a
prompt and a response, the loss taken on the response tokens only (``IGNORE_INDEX``
elsewhere). Batches hold rows of similar length, so that little of a step is padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from reftsearch.spec.study_file import TaskSpec

if TYPE_CHECKING:
    from reftsearch.engine.activation_cache import FrozenPast


@dataclass
class Encoded:
    """One tokenized example. ``prompt_length`` counts the tokens positions refer to."""

    input_ids: list[int]
    prompt_length: int
    label: int | None = None  # classification
    labels: list[int] | None = None  # generation: -100 on prompt tokens
    token_type_ids: list[int] | None = None
    target: str | None = None  # generation: the reference response text


IGNORE_INDEX = -100


@dataclass(frozen=True)
class SplitData:
    """The encoded splits a trial trains on and is scored on, and how it is scored."""

    train: list[Encoded]
    dev: list[Encoded]
    kind: str  # classification | generation
    metric: str
    max_new_tokens: int = 32


def encode(rows: list[dict], tokenizer, task: TaskSpec) -> list[Encoded]:
    if task.kind == "classification":
        return [_encode_classification(row, tokenizer, task.max_length) for row in rows]
    return [_encode_generation(row, tokenizer, task.max_length) for row in rows]


def _encode_classification(row: dict, tokenizer, max_length: int) -> Encoded:
    enc = tokenizer(row["text"], row.get("text_pair"), truncation=True, max_length=max_length)
    ids = enc["input_ids"]
    # for classification the whole input is the "prompt" the f/l positions count in
    return Encoded(ids, len(ids), label=row["label"], token_type_ids=enc.get("token_type_ids"))


def _encode_generation(row: dict, tokenizer, max_length: int) -> Encoded:
    prompt_ids = tokenizer(row["prompt"], truncation=True, max_length=max_length)["input_ids"]
    response_ids = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
    response_ids = [*response_ids, tokenizer.eos_token_id]
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return Encoded(ids, len(prompt_ids), labels=labels, target=row["response"])


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_lengths: torch.Tensor
    # where each row's token 0 sits: token t of row b is column t + offsets[b]; the left
    # padding, or minus the tokens a row starts after (``collate(starts=...)``)
    offsets: torch.Tensor
    # classification: each row's class; generation: each column's next-token target
    # (IGNORE_INDEX where none is trained), already shifted (see ``collate``)
    labels: torch.Tensor | None = None
    token_type_ids: torch.Tensor | None = None
    rows: torch.Tensor | None = None  # each row's index in the example list it came from
    # the frozen keys/values of the tokens each row starts after
    # (reftsearch.engine.activation_cache)
    past: FrozenPast | None = None

    def model_inputs(self) -> dict[str, Any]:
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.token_type_ids is not None:
            inputs["token_type_ids"] = self.token_type_ids
        if bool(self.offsets.any()):
            # Positions count from each row's token 0, so a row's hidden states do not depend
            # on how much padding its batch needed (or how many of its tokens are cached).
            columns = torch.arange(self.input_ids.shape[1], device=self.offsets.device)
            inputs["position_ids"] = (columns[None] - self.offsets[:, None]).clamp(min=0)
        if self.past is not None:
            inputs.update(self.past.model_inputs(self.attention_mask))
        return inputs

    def to(self, device: torch.device) -> Batch:
        moved = {
            k: (t.to(device) if isinstance(t, torch.Tensor) else t) for k, t in vars(self).items()
        }
        return Batch(**moved)


def collate(
    examples: list[Encoded],
    pad_id: int,
    left_pad: bool = False,
    prompt_only: bool = False,
    starts: list[int] | None = None,
) -> Batch:
    """Pad a list of examples into tensors.

    ``prompt_only`` drops the responses (for generation at eval time, where prompts are
    left-padded so that every row's next token is at the last column). ``starts`` drops each
    row's first tokens, whose frozen keys and values come from a cache (``Batch.past``).

    A training row of a generation task (prompt and response) also drops its last token: no
    token follows it, so its output is never a prediction, and nothing later attends to it;
    its labels come shifted, each column's the next token. For a one-token answer and its
    end-of-sequence, rows that start at the intervened token (a cached prefix) go from three
    columns to two: a third of a step's arithmetic (on a CPU such a step's time is set by
    reading the weights, and did not change; SmolLM2, batch 8).
    """
    starts = starts or [0] * len(examples)
    targets = examples[0].labels is not None and not prompt_only
    sequences = [
        (e.input_ids[: e.prompt_length] if prompt_only else e.input_ids)[start:]
        for e, start in zip(examples, starts, strict=True)
    ]
    if targets:
        kept = zip(sequences, examples, strict=True)
        sequences = [s[:-1] if _has_response(e) else s for s, e in kept]
    width = max(len(s) for s in sequences)
    padding = [width - len(s) if left_pad else 0 for s in sequences]

    def pad(values: list[int], fill: int, left: int) -> list[int]:
        filler = [fill] * (width - len(values))
        return filler + values if left else values + filler

    batch = Batch(
        input_ids=torch.tensor(
            [pad(s, pad_id, o) for s, o in zip(sequences, padding, strict=True)]
        ),
        attention_mask=torch.tensor(
            [pad([1] * len(s), 0, o) for s, o in zip(sequences, padding, strict=True)]
        ),
        prompt_lengths=torch.tensor([e.prompt_length for e in examples]),
        offsets=torch.tensor(padding) - torch.tensor(starts),
    )
    if examples[0].token_type_ids is not None:
        batch.token_type_ids = torch.tensor(
            [
                pad(e.token_type_ids[start:], 0, o)
                for e, start, o in zip(examples, starts, padding, strict=True)
            ]
        )
    if examples[0].label is not None:
        batch.labels = torch.tensor([e.label for e in examples])
    elif targets:
        batch.labels = torch.tensor(
            [
                pad(_next_tokens(e, start, len(s)), IGNORE_INDEX, o)
                for e, s, start, o in zip(examples, sequences, starts, padding, strict=True)
            ]
        )
    return batch


def _next_tokens(example: Encoded, start: int, width: int) -> list[int]:
    """The labels of tokens ``start + 1 ...`` for a row of ``width`` tokens from ``start``:
    each column's next-token target (none after the last token)."""
    shifted = example.labels[start + 1 : start + 1 + width]
    return shifted + [IGNORE_INDEX] * (width - len(shifted))


def with_response(examples: list[Encoded]) -> list[Encoded]:
    """The training examples with something to learn: a generation prompt that fills
    ``max_length`` keeps no response token, and a batch of only such rows took its loss over
    no tokens (NaN), which failed the trial as diverged whatever its learning rate."""
    return [e for e in examples if e.labels is None or _has_response(e)]


def _has_response(example: Encoded) -> bool:
    """Whether a generation example kept response tokens (a prompt truncated to
    ``max_length`` keeps none, and then its last token may be the intervened one)."""
    return len(example.input_ids) > example.prompt_length


# Length buckets: a seeded shuffle, then sorting inside windows of this many batches, so rows
# of similar length share a batch (less padding) while the order stays random across windows.
BUCKET_WINDOW = 16


def batch_rows(
    lengths: list[int], batch_size: int, generator: torch.Generator, bucket: bool = False
) -> list[list[int]]:
    """Row indices of each training batch: a seeded shuffle (``generator``); with ``bucket``,
    rows of similar length together, still deterministic given the generator."""
    n = len(lengths)
    order = torch.randperm(n, generator=generator).tolist()
    if not bucket:
        return [order[start : start + batch_size] for start in range(0, n, batch_size)]
    window = BUCKET_WINDOW * batch_size
    order = [
        i
        for start in range(0, n, window)
        for i in sorted(order[start : start + window], key=lambda i: lengths[i])
    ]
    chunks = [order[start : start + batch_size] for start in range(0, n, batch_size)]
    return [chunks[i] for i in torch.randperm(len(chunks), generator=generator).tolist()]


def pass_tokens(device: torch.device) -> int:
    """Padded tokens per batch of a pass without gradients (the frozen pass, dev scoring).

    On a CPU a matmul of a few hundred rows already runs at full speed, so small batches
    cost nothing there and pad less (rows are sorted by length, but a batch still pads to its
    longest): the frozen pass of SmolLM2 over SST-2 ran ~12% faster with 512 tokens than with
    1,024 (padding 4-7% vs 9-13%), and ~1.4x faster than with 64-row batches. An accelerator
    wants big ones.
    """
    return 512 if device.type == "cpu" else 16384


def sorted_batch_rows(
    lengths: list[int], max_tokens: int | None, max_rows: int | None = None
) -> list[list[int]]:
    """Row indices sorted by length, cut into batches of at most ``max_tokens`` padded tokens
    (rows x the longest; a longer row goes alone) and ``max_rows`` rows, either unbounded
    when None: for passes whose result does not depend on the order (frozen activations,
    dev scoring)."""
    token_limit = math.inf if max_tokens is None else max_tokens
    row_limit = math.inf if max_rows is None else max_rows
    chunks: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        last = chunks[-1] if chunks else []
        if last and len(last) < row_limit and (len(last) + 1) * lengths[i] <= token_limit:
            last.append(i)
        else:
            chunks.append([i])
    return chunks


def collate_rows(examples: list[Encoded], rows: list[int], pad_id: int, **collate_options) -> Batch:
    """``collate`` of ``examples[rows]``, remembering ``rows``
    (see reftsearch.engine.activation_cache)."""
    batch = collate([examples[i] for i in rows], pad_id, **collate_options)
    batch.rows = torch.tensor(rows)
    return batch


def batches(
    examples: list[Encoded], pad_id: int, max_tokens: int, **collate_options
) -> list[Batch]:
    """Batches of rows of similar length (see ``sorted_batch_rows``)."""
    lengths = [len(e.input_ids) for e in examples]
    return [
        collate_rows(examples, rows, pad_id, **collate_options)
        for rows in sorted_batch_rows(lengths, max_tokens)
    ]
