"""Which rows each split holds, as ``reftsearch data`` prints them and ``validate`` sums them up.

Rows are named by their index in the split they were read from (0-based, header not
counted): a dev split carved from train lists train's row numbers, so a baseline can be
scored on exactly the rows a study's dev scores come from.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from reftsearch.data.splits import has_split, load_task_data, load_test_rows, source
from reftsearch.errors import BadInputError
from reftsearch.own_files import is_stream, written_whole
from reftsearch.spec.study_file import SPLITS, TaskSpec

DELIMITERS = {".csv": ",", ".tsv": "\t"}


@dataclass(frozen=True)
class SplitRows:
    name: str  # train | dev | test
    origin: str  # where its rows come from, in words ("from ...", "carved from ...")
    rows: list[dict]


@dataclass(frozen=True)
class Listing:
    splits: list[SplitRows]
    label_names: list[str] | None  # classification: class id -> label

    def columns(self, task: TaskSpec) -> list[str]:
        if task.kind == "generation":
            return ["split", "row", "prompt", "response"]
        return ["split", "row", "label", "text", *(["text_pair"] if task.text_pair else [])]

    def records(self, task: TaskSpec) -> list[list]:
        """One list per row: its split, its row number, then its cells (labels as read)."""
        names = self.columns(task)[2:]
        return [
            [split.name, row["row"], *(self._cell(row, name) for name in names)]
            for split in self.splits
            for row in split.rows
        ]

    def _cell(self, row: dict, name: str):
        if name == "label" and self.label_names:
            return self.label_names[row["label"]]
        return row[name]

    def summary(self) -> str:
        """One line: rows per split, and the classes (``validate``)."""
        counts = ", ".join(f"{s.name} {_rows(len(s.rows))}" for s in self.splits)
        if self.label_names is None:
            return counts
        return f"{counts}; {len(self.label_names)} classes: {', '.join(self.label_names)}"


def list_rows(task: TaskSpec, seed: int, splits: Sequence[str] = SPLITS) -> Listing:
    """The rows of ``splits`` (those the study has), read and checked as ``run`` reads them."""
    data = load_task_data(task, seed)
    dev_origin = (
        f"carved from {source(task.data, 'train')} "
        f"(task.dev_fraction {task.dev_fraction:g}, seed {seed})"
        if data.dev_carved
        else f"from {source(task.data, 'dev')}"
    )
    found = [
        SplitRows(
            "train", f"from {source(task.data, 'train')}" + _sampled(task, "train"), data.train
        ),
        SplitRows("dev", dev_origin + _sampled(task, "dev"), data.dev),
    ]
    if "test" in splits and has_split(task.data, "test"):
        found.append(
            SplitRows(
                "test", f"from {source(task.data, 'test')}", load_test_rows(task, data.label_names)
            )
        )
    return Listing([s for s in found if s.name in splits], data.label_names)


def _sampled(task: TaskSpec, split: str) -> str:
    limit = getattr(task, f"max_{split}_examples")
    return "" if limit is None else f", at most task.max_{split}_examples {limit} of them (seeded)"


def print_rows(listing: Listing, task: TaskSpec, out: TextIO) -> None:
    """Tab-separated for reading, a header line first: cells as they are, but for a tab or
    a line break in one, escaped with a backslash (``--out`` writes CSV quoting instead)."""
    writer = csv.writer(
        out,
        delimiter="\t",
        lineterminator="\n",
        quoting=csv.QUOTE_NONE,
        quotechar=None,
        escapechar="\\",
    )
    writer.writerow(listing.columns(task))
    writer.writerows(listing.records(task))


def rows_delimiter(path: Path) -> str:
    """The delimiter of a rows file named ``path``: refused unless it is a .csv or .tsv."""
    delimiter = DELIMITERS.get(path.suffix.lower())
    if delimiter is None:  # the whole path: ``--out .`` has no name to show
        raise BadInputError(f"--out {path}: must end in .csv or .tsv")
    return delimiter


def write_rows(listing: Listing, task: TaskSpec, path: Path) -> int:
    """Write the rows to ``path`` (.csv or .tsv); a file there must be one this wrote."""
    delimiter = rows_delimiter(path)
    header = delimiter.join(listing.columns(task))
    if path.exists() and not is_stream(path) and _first_line(path) != header:
        raise BadInputError(
            f"--out: {path} exists and is not a file `reftsearch data` wrote "
            "(its first line differs): remove it or give another name"
        )
    records = listing.records(task)
    with written_whole(path) as scratch, scratch.open("w", newline="") as file:
        writer = csv.writer(file, delimiter=delimiter, lineterminator="\n")
        writer.writerow(listing.columns(task))
        writer.writerows(records)
    return len(records)


def _first_line(path: Path) -> str | None:
    try:
        with path.open(newline="") as file:
            return file.readline().rstrip("\n")
    except (OSError, UnicodeDecodeError):
        return None


def describe(split: SplitRows) -> str:
    """``train: 1,200 rows from task.data.train (train.tsv)``"""
    return f"{split.name}: {_rows(len(split.rows))} {split.origin}"


def _rows(n: int) -> str:
    return f"{n:,} row" + ("" if n == 1 else "s")
