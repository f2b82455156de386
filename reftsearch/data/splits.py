"""Task data: splits from files, hub datasets or builtin tasks -> tokenized examples -> batches.

Splits are read with Hugging Face ``datasets`` and reduced to plain rows with canonical keys
(``text``/``text_pair``/``label`` or ``prompt``/``response``). If no dev split is given it is
carved from train with the study seed. The test split is read only on request
(``load_split(..., "test")``), never while searching.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from reftsearch.errors import BadInputError
from reftsearch.spec.study_file import DataSpec, TaskSpec

if TYPE_CHECKING:
    from reftsearch.engine.activation_cache import FrozenPast

FILE_BUILDERS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}
DEV_SPLIT_NAMES = ("dev", "validation", "valid", "val")


@dataclass
class TaskData:
    """Rows of the search splits; labels already mapped to ids for classification."""

    train: list[dict]
    dev: list[dict]
    label_names: list[str] | None  # classification only: id -> original label, as text

    @property
    def num_labels(self) -> int:
        return len(self.label_names or [])


def load_task_data(task: TaskSpec, seed: int) -> TaskData:
    """Train and dev rows for the search (the test split is left untouched)."""
    train = load_split(task, "train")
    dev = load_split(task, "dev") if has_split(task.data, "dev") else None
    if dev is None:
        train, dev = carve_dev(train, task.dev_fraction, seed)
    train = _subset(train, task.max_train_examples, seed)
    dev = _subset(dev, task.max_dev_examples, seed)
    label_names = None
    if task.kind == "classification":
        label_names = _label_vocabulary(train)
        train, dev = (
            _map_labels(rows, label_names, split)
            for rows, split in ((train, "train"), (dev, "dev"))
        )
    if not train or not dev:
        raise BadInputError(
            f"task.data: the train ({len(train)}) and dev ({len(dev)}) splits must both have rows"
        )
    return TaskData(train, dev, label_names)


def load_test_rows(task: TaskSpec, label_names: list[str] | None) -> list[dict]:
    """The held-out test split, mapped like train; only for the final evaluation."""
    if not has_split(task.data, "test"):
        raise BadInputError("task.data.test: the study has no test split")
    rows = load_split(task, "test")
    return _map_labels(rows, label_names, "test") if label_names else rows


def carve_dev(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split ``rows`` into (train, dev) with a seeded shuffle; at least one row each."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_dev = min(max(1, round(len(rows) * fraction)), len(rows) - 1)
    dev_ids = set(order[:n_dev])
    return (
        [r for i, r in enumerate(rows) if i not in dev_ids],
        [r for i, r in enumerate(rows) if i in dev_ids],
    )


def load_split(task: TaskSpec, split: str) -> list[dict]:
    """One split as rows with canonical keys; errors name the missing column or file."""
    records = _read_records(task.data, split)
    columns = _columns(task)
    if records:
        missing = [
            f"task.{key}: column {name!r}"
            for key, name in columns.items()
            if name not in records[0]
        ]
        if missing:
            raise BadInputError(
                f"{split} data lacks {', '.join(missing)}; its columns are {sorted(records[0])}"
            )
    return [
        {canonical: _clean(canonical, record[name]) for canonical, name in columns.items()}
        for record in records
    ]


# Whitespace at the ends of a classification text means nothing, but GLUE's SST-2 files end
# every sentence with a space, which a BPE tokenizer turns into a token that last-token (l<s>)
# positions would then sit on. Generation prompts keep theirs: it can separate the response.
STRIPPED_COLUMNS = ("text", "text_pair")


def _clean(canonical: str, value: Any) -> Any:
    return value.strip() if canonical in STRIPPED_COLUMNS and isinstance(value, str) else value


def _columns(task: TaskSpec) -> dict[str, str]:
    if task.kind == "generation":
        return {"prompt": task.prompt, "response": task.response}
    columns = {"text": task.text, "label": task.label}
    if task.text_pair:
        columns["text_pair"] = task.text_pair
    return columns


def has_split(data: DataSpec, split: str) -> bool:
    return data.builtin is not None or getattr(data, split) is not None


def _read_records(data: DataSpec, split: str) -> list[dict]:
    if data.builtin is not None:
        from reftsearch.data.synthetic import make_builtin_task

        try:
            return make_builtin_task(data.builtin)[split]
        except ValueError as err:
            raise BadInputError(f"task.data.builtin: {err}") from None
    location = getattr(data, split)
    if data.hub is not None:
        return _read_hub(data, location, split)
    return _read_local(Path(location), data.read_options, split)


def _read_local(path: Path, read_options: dict[str, Any], split: str) -> list[dict]:
    import datasets

    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:  # datasets raises several types for a non-dataset dir
            raise BadInputError(
                f"task.data.{split}: {path} is not a saved dataset ({err})"
            ) from None
        if isinstance(loaded, datasets.DatasetDict):
            loaded = _pick_split(loaded, split, path)
        return loaded.to_list()
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise BadInputError(
            f"task.data.{split}: {path.name}: unknown file type; "
            f"must be one of {sorted(FILE_BUILDERS)} or a saved dataset dir"
        )
    if not path.is_file():
        raise BadInputError(f"task.data.{split}: file not found: {path}")
    options = dict(read_options)
    if path.suffix.lower() == ".tsv":
        options.setdefault("sep", "\t")
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as err:  # parse errors come from pandas/pyarrow in many types
        raise BadInputError(f"task.data.{split}: cannot read {path}: {err}") from None
    return dataset.to_list()


def _pick_split(loaded, split: str, path: Path):
    names = DEV_SPLIT_NAMES if split == "dev" else (split,)
    for name in names:
        if name in loaded:
            return loaded[name]
    raise BadInputError(
        f"task.data.{split}: {path} has splits {list(loaded)}, none of {list(names)}"
    )


def _read_hub(data: DataSpec, split_name: str, split: str) -> list[dict]:
    import datasets

    try:
        dataset = datasets.load_dataset(data.hub, data.hub_config, split=split_name)
    except Exception as err:  # offline, unknown id, unknown split...
        raise BadInputError(
            f"task.data.hub: cannot load {data.hub!r} "
            f"(config {data.hub_config!r}, split {split_name!r}): {err}"
        ) from None
    return dataset.to_list()


def _subset(rows: list[dict], limit: int | None, seed: int) -> list[dict]:
    if limit is None or len(rows) <= limit:
        return rows
    return random.Random(seed).sample(rows, limit)


def _label_vocabulary(rows: list[dict]) -> list[str]:
    values = {row["label"] for row in rows}
    if all(isinstance(x, int) and not isinstance(x, bool) for x in values) and min(values) >= 0:
        return [str(i) for i in range(max(values) + 1)]
    return sorted(str(x) for x in values)


def _map_labels(rows: list[dict], label_names: list[str], split: str) -> list[dict]:
    ids = {name: i for i, name in enumerate(label_names)}
    mapped = []
    for row in rows:
        key = str(row["label"])
        if key not in ids:
            raise BadInputError(
                f"{split} data: label {row['label']!r} does not occur in train "
                f"(train labels: {label_names})"
            )
        mapped.append({**row, "label": ids[key]})
    return mapped


# --- tokenization and batching -------------------------------------------------------------


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
    """
    starts = starts or [0] * len(examples)
    sequences = [
        (e.input_ids[: e.prompt_length] if prompt_only else e.input_ids)[start:]
        for e, start in zip(examples, starts, strict=True)
    ]
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
    elif examples[0].labels is not None and not prompt_only:
        batch.labels = torch.tensor(
            [
                pad(e.labels[start:], IGNORE_INDEX, o)
                for e, start, o in zip(examples, starts, padding, strict=True)
            ]
        )
    return batch


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
