"""Task data: splits read from files, hub datasets or builtin tasks, as plain rows.

Splits are read with Hugging Face ``datasets`` and reduced to plain rows with canonical keys
(``text``/``text_pair``/``label`` or ``prompt``/``response``). If no dev split is given it is
carved from train with the study seed. The test split is read only on request
(``load_split(..., "test")``), never while searching.
"""

from __future__ import annotations

import contextlib
import csv
import random
from collections.abc import Iterator
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
    """Rows of the search splits; labels already mapped to ids for classification.

    Every row keeps ``row``, its 0-based index in the split it was read from (header not
    counted), so that ``reftsearch data`` can say which rows a carved dev split holds.
    """

    train: list[dict]
    dev: list[dict]
    label_names: list[str] | None  # classification only: id -> original label, as text
    dev_carved: bool = False  # dev was carved from train: its rows are train's

    @property
    def num_labels(self) -> int:
        return len(self.label_names or [])


def load_task_data(task: TaskSpec, seed: int) -> TaskData:
    """Train and dev rows for the search (the test split is left untouched)."""
    train = load_split(task, "train")
    dev_carved = not has_split(task.data, "dev")
    if dev_carved:
        train, dev = carve_dev(train, task.dev_fraction, seed)
    else:
        dev = load_split(task, "dev")
    train = _subset(train, task.max_train_examples, seed)
    dev = _subset(dev, task.max_dev_examples, seed)
    if not train or not dev:
        raise BadInputError(
            f"task.data: the train ({len(train)}) and dev ({len(dev)}) splits must both have rows"
        )
    label_names = None
    if task.kind == "classification":
        label_names = label_vocabulary(train, task, _kept(task, dev_carved))
        train = map_labels(train, label_names, task, "train")
        dev = map_labels(dev, label_names, task, "train" if dev_carved else "dev", dev_carved)
    return TaskData(train, dev, label_names, dev_carved)


def load_test_rows(task: TaskSpec, label_names: list[str] | None) -> list[dict]:
    """The held-out test split, mapped like train; only for the final evaluation."""
    if not has_split(task.data, "test"):
        raise BadInputError("task.data.test: the study has no test split")
    rows = load_split(task, "test")
    return map_labels(rows, label_names, task, "test") if label_names else rows


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


def load_split(
    task: TaskSpec, split: str, optional: tuple[str, ...] = (), given_as: str | None = None
) -> list[dict]:
    """One split as rows with canonical keys and ``row`` (the row's index in the split);
    errors name the split's key path, its file, and the missing column or the empty row. The
    ``optional`` canonical columns (e.g. ``label`` for inputs to predict) may be absent.

    ``given_as`` names a local file that is not one of the study's splits (``predict
    --input``) in errors: it must follow the task's ``task.data`` settings, so its errors do
    not advise changing them (that would change how the study's own files are read)."""
    columns = _columns(task)
    texts = tuple(name for key, name in columns.items() if key != "label")
    file = _LocalFile.of(task.data, split, given_as)
    records = _read_records(task.data, split, texts, file)
    where = source(task.data, split) if file is None else file.where
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
                f"{where} lacks {', '.join(missing)}; its columns are {sorted(records[0])}"
                f"{_header_hint(task.data, file, len(missing) == len(columns))}"
            )
    rows = []
    for index, record in enumerate(records):
        row = {
            key: clean_value(key, record[name], f"{where}: row {index}: column {name!r}")
            for key, name in columns.items()
        }
        row["row"] = index
        rows.append(row)
    return rows


def source(data: DataSpec, split: str) -> str:
    """Where ``split`` comes from, as errors and ``reftsearch data`` name it."""
    if data.builtin is not None:
        return f"task.data.builtin ({data.builtin}, split {split})"
    location = getattr(data, split)
    if data.hub is not None:
        return f"task.data.{split} ({data.hub}, split {location})"
    return f"task.data.{split} ({Path(location).name})"


@dataclass(frozen=True)
class _LocalFile:
    """A local split file or saved dataset, and what its errors call it."""

    path: Path
    key: str  # task.data.train, ..., or how a file given another way was given (--input)
    advise: bool  # errors may advise task.data settings: the file is one of the study's

    @classmethod
    def of(cls, data: DataSpec, split: str, given_as: str | None) -> _LocalFile | None:
        if data.builtin is not None or data.hub is not None:
            return None
        path = Path(getattr(data, split))
        if given_as is None:
            return cls(path, f"task.data.{split}", advise=True)
        return cls(path, given_as, advise=False)

    @property
    def where(self) -> str:
        return f"{self.key} ({self.path.name})"


def _header_hint(data: DataSpec, file: _LocalFile | None, none_found: bool) -> str:
    """The fix for a CSV/TSV file whose first line is a row: then none of the named columns
    is among its "column names" (one column missing is a misspelt name, not a row)."""
    csv_file = file is not None and FILE_BUILDERS.get(file.path.suffix.lower()) == "csv"
    if not csv_file or not file.advise or not data.header or not none_found:
        return ""
    return " (a file whose first line is a row, not column names: set task.data.header: false)"


# Whitespace at the ends of a classification text means nothing, but GLUE's SST-2 files end
# every sentence with a space, which a BPE tokenizer turns into a token that last-token (l<s>)
# positions would then sit on. Generation prompts keep theirs: it can separate the response.
STRIPPED_COLUMNS = ("text", "text_pair")


def clean_value(canonical: str, value: Any, where: str) -> Any:
    """A cell, checked: an empty one is refused (a tokenizer would fail on it, or train on
    nothing), as is a list or mapping (a JSON or parquet cell can hold one: a label cannot
    be one, and a text would be its Python repr); texts are text even where the reader saw
    numbers."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise BadInputError(f"{where} (task.{canonical}) is empty")
    if isinstance(value, list | dict):
        raise BadInputError(
            f"{where} (task.{canonical}): must be text or a number, got a "
            f"{'list' if isinstance(value, list) else 'mapping'}"
        )
    if canonical == "label":
        return value
    text = value if isinstance(value, str) else str(value)
    return text.strip() if canonical in STRIPPED_COLUMNS else text


def _columns(task: TaskSpec) -> dict[str, str]:
    if task.kind == "generation":
        return {"prompt": task.prompt, "response": task.response}
    columns = {"text": task.text, "label": task.label}
    if task.text_pair:
        columns["text_pair"] = task.text_pair
    return columns


def has_split(data: DataSpec, split: str) -> bool:
    return data.builtin is not None or getattr(data, split) is not None


def _read_records(
    data: DataSpec, split: str, texts: tuple[str, ...], file: _LocalFile | None
) -> list[dict]:
    """The split's records; ``texts`` names the columns a CSV reader must keep as text."""
    if data.builtin is not None:
        from reftsearch.data.synthetic import make_builtin_task

        try:
            return make_builtin_task(data.builtin)[split]
        except ValueError as err:
            raise BadInputError(f"task.data.builtin: {err}") from None
    if data.hub is not None:
        return _read_hub(data, getattr(data, split), split)
    assert file is not None  # a local split: _LocalFile.of made one
    return _read_local(data, split, texts, file)


def _read_local(data: DataSpec, split: str, texts: tuple[str, ...], file: _LocalFile) -> list[dict]:
    read_saved = file.path.is_dir()
    records = _read_saved(file, split) if read_saved else _read_file(file, data, texts)
    if not records:
        raise BadInputError(f"{file.where}: has no rows")
    return records


def _read_saved(file: _LocalFile, split: str) -> list[dict]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(file.path))
    except Exception as err:  # datasets raises several types for a non-dataset dir
        raise BadInputError(f"{file.key}: {file.path} is not a saved dataset ({err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        loaded = _pick_split(loaded, split, file)
    return loaded.to_list()


def _read_file(file: _LocalFile, data: DataSpec, texts: tuple[str, ...]) -> list[dict]:
    path = file.path
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise BadInputError(
            f"{file.key}: {path.name}: unknown file type; "
            f"must be one of {sorted(FILE_BUILDERS)} or a saved dataset dir"
        )
    if not path.is_file():
        raise BadInputError(f"{file.key}: file not found: {path}")
    try:  # each reader fails its own way on a file it may not open (a traceback, for csv)
        with path.open("rb") as opened:
            empty = not opened.read(1)
    except OSError as err:
        raise BadInputError(f"{file.key}: cannot read {path}: {err.strerror}") from None
    if empty:  # pandas says "No columns to parse", the JSON reader nothing useful
        return []
    options = dict(data.read_options)
    if builder == "csv":
        options = _csv_options(file, data, texts)
    elif not data.header or data.columns:
        raise BadInputError(f"task.data.header: only for .csv and .tsv files, not {path.name}")
    try:
        return _load_file(builder, path, options)
    except Exception as err:  # parse errors come from pandas/pyarrow in many types
        raise BadInputError(f"{file.key}: cannot read {path}: {_cause(err)}") from None


def _load_file(builder: str, path: Path, options: dict[str, Any]) -> list[dict]:
    """The file's rows, ``[]`` for none (a header line alone, JSON ``[]``): ``load_dataset``
    refuses a split without rows with a message that names no file."""
    import datasets

    with _quiet_datasets():
        reader = datasets.load_dataset_builder(builder, data_files=str(path), **options)
        reader.download_and_prepare()
        if not reader.info.splits["train"].num_examples:
            return []
        return reader.as_dataset("train").to_list()


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """datasets logs a reader's error before it raises it; the BadInputError says it once."""
    from datasets.utils import logging as datasets_logging

    verbosity = datasets_logging.get_verbosity()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)
    try:
        yield
    finally:
        datasets_logging.set_verbosity(verbosity)


def _cause(err: BaseException) -> str:
    """What went wrong, on one line: datasets wraps the reader's own error (pandas' "Expected
    2 fields in line 6, saw 4") in "An error occurred while generating the dataset"."""
    while err.__cause__ is not None or (not str(err).strip() and err.__context__ is not None):
        err = err.__cause__ or err.__context__
    return " ".join(str(err).split()) or type(err).__name__


def _csv_options(file: _LocalFile, data: DataSpec, texts: tuple[str, ...]) -> dict[str, Any]:
    """``read_options`` for pandas, with the header and column names, once the file has been
    checked with Python's strict CSV reader: pandas reads a field that opens a quote it does
    not close right before the separator (``"Tigers" win``) by dropping the quotes, and one
    it never closes by swallowing the lines after it, silently. Text columns stay text as
    written: pandas would read a response ``007`` as the number 7 (and `` 5`` as 5)."""
    path = file.path
    options = dict(data.read_options)
    # only an empty cell is missing: pandas would also take None, NA, N/A, null, nan... for
    # missing, and refuse a text, label or response that is one of these words as empty
    options.update(keep_default_na=False, na_values=[""])
    by_index = not data.header and not data.columns  # pandas numbers such columns
    options["converters"] = {int(t) if by_index and t.isdigit() else t: str for t in texts}
    if path.suffix.lower() == ".tsv":
        options.setdefault("sep", "\t")
    separator = options.get("sep", options.get("delimiter", ","))
    if len(separator) > 1:  # a regular expression: pandas' C reader warns, then falls back
        options["engine"] = "python"
    first = _strict_first_row(file, separator, options) if len(separator) == 1 else None
    if data.header:
        return options
    if data.columns and first is not None and len(first) != len(data.columns):
        raise BadInputError(
            f"task.data.columns: names {len(data.columns)} columns, {file.where} has "
            f"{len(first)} in its first row"
        )
    options["header"] = None
    if data.columns:
        options["column_names"] = list(data.columns)
    return options


def _strict_first_row(file: _LocalFile, separator: str, options: dict[str, Any]) -> list[str]:
    """The file's first row, after reading every row as pandas will (quoting as set)."""
    # QUOTE_ALL and QUOTE_NONNUMERIC quote as QUOTE_MINIMAL does when reading; csv's
    # QUOTE_NONNUMERIC would also refuse every unquoted text that is not a number
    quoting = csv.QUOTE_NONE if options.get("quoting") == csv.QUOTE_NONE else csv.QUOTE_MINIMAL
    first: list[str] = []
    try:
        with file.path.open(newline="", encoding=options.get("encoding", "utf-8")) as opened:
            reader = csv.reader(opened, delimiter=separator, quoting=quoting, strict=True)
            try:
                first = next(reader, [])
                for _ in reader:
                    pass
            except csv.Error as err:
                quotes = "'\"'" in str(err) or "end of data" in str(err)
                hint = (
                    ": a field starts with a quote that is text, not CSV quoting; read quotes "
                    "as text with task.data.read_options: {quoting: 3}"
                )
                raise BadInputError(
                    f"{file.where}: line {reader.line_num}: {err}"
                    f"{hint if quotes and file.advise else ''}"
                ) from None
    except (UnicodeDecodeError, LookupError) as err:
        advice = "; set task.data.read_options: {encoding: ...}" if file.advise else ""
        raise BadInputError(
            f"{file.where}: not {options.get('encoding', 'utf-8')} text ({err}){advice}"
        ) from None
    return first


def _pick_split(loaded, split: str, file: _LocalFile):
    names = DEV_SPLIT_NAMES if split == "dev" else (split,)
    for name in names:
        if name in loaded:
            return loaded[name]
    raise BadInputError(f"{file.key}: {file.path} has splits {list(loaded)}, none of {list(names)}")


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


def _kept(task: TaskSpec, dev_carved: bool) -> str:
    """Which of train's rows a study keeps, where not all: its label errors say so (a file
    of two classes is not what holds one)."""
    kept = []
    if dev_carved:
        kept.append(f"once task.dev_fraction {task.dev_fraction:g} is carved out as dev")
    if task.max_train_examples is not None:
        kept.append(f"of task.max_train_examples {task.max_train_examples}")
    return f" (the rows kept {' and '.join(kept)})" if kept else ""


def label_vocabulary(rows: list[dict], task: TaskSpec, kept: str = "") -> list[str]:
    """The classes: the label values that occur in train, sorted (numbers as numbers, else
    as text); class id i is the i-th. Labels 0..K-1 so keep their ids, and any other labels
    (strings, 1..4) get the same ids whatever the order of the rows."""
    # one value per name, not a set of values: in a set ``False`` and ``0`` (``True`` and
    # ``1``) are one element, but a JSON file's ``false`` and ``0`` name two classes
    values = {_label_name(row["label"]): row["label"] for row in rows}
    numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for x in values.values())
    names = sorted(values, key=values.get) if numbers else sorted(values)
    if len(names) < 2:
        raise BadInputError(
            f"{source(task.data, 'train')}: column {task.label!r} (task.label) holds one "
            f"value, {names[0]!r}, in all {len(rows)} rows{kept}: a classifier needs two "
            "classes or more"
        )
    return names


def map_labels(
    rows: list[dict], label_names: list[str], task: TaskSpec, split: str, carved: bool = False
) -> list[dict]:
    """``rows`` with each label replaced by its class id; a label train lacks is refused."""
    ids = {name: i for i, name in enumerate(label_names)}
    mapped = []
    for row in rows:
        key = _label_name(row["label"])
        if key not in ids:
            carved_note = " (it occurs only in the rows carved out as dev)" if carved else ""
            raise BadInputError(
                f"{source(task.data, split)}: row {row['row']}: label {row['label']!r} "
                f"(column {task.label!r}) does not occur in train{carved_note}; "
                f"train's labels are {label_names}"
            )
        mapped.append({**row, "label": ids[key]})
    return mapped


def _label_name(value: Any) -> str:
    """A label as text, an integral float as its int (``1.0`` -> ``"1"``): pandas reads a
    column as floats where one file writes ``1.0`` (or quotes its texts, quoting 2) and as
    ints where another writes ``1``, and a JSON file can hold both."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
