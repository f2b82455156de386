"""Task data: splits read from files, hub datasets or builtin tasks, as plain rows.

Splits are read with Hugging Face ``datasets`` and reduced to plain rows with canonical keys
(``text``/``text_pair``/``label`` or ``prompt``/``response``). If no dev split is given it is
carved from train with the study seed. The test split is read only on request
(``load_split(..., "test")``), never while searching.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reftsearch.errors import BadInputError
from reftsearch.spec.study_file import DataSpec, TaskSpec

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


def load_split(task: TaskSpec, split: str, optional: tuple[str, ...] = ()) -> list[dict]:
    """One split as rows with canonical keys; errors name the missing column or file. The
    ``optional`` canonical columns (e.g. ``label`` for inputs to predict) may be absent."""
    records = _read_records(task.data, split)
    columns = _columns(task)
    if records:
        columns = {
            key: name for key, name in columns.items() if key not in optional or name in records[0]
        }
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
        {canonical: clean_value(canonical, record[name]) for canonical, name in columns.items()}
        for record in records
    ]


# Whitespace at the ends of a classification text means nothing, but GLUE's SST-2 files end
# every sentence with a space, which a BPE tokenizer turns into a token that last-token (l<s>)
# positions would then sit on. Generation prompts keep theirs: it can separate the response.
STRIPPED_COLUMNS = ("text", "text_pair")


def clean_value(canonical: str, value: Any) -> Any:
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
