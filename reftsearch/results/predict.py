"""A trained trial on new inputs: ``reftsearch predict``.

The trial comes from a study (its kept weights, ``trained_trial``) or from a directory
``reftsearch export`` wrote (``trained_export``: no storage needed); either way the same
code encodes and scores. Inputs are encoded as the task's examples are (the same tokenizer,
``max_length`` and positions), so a trial predicts here exactly what it predicted when it was
scored: run on dev rows, the predictions reproduce its dev score. Classification gives each
input's label (by name: the task's labels as they appear in its files) and every class's
probability; generation gives the greedy continuation of each prompt, as dev scoring decodes
it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from reftsearch.data.batches import encode
from reftsearch.data.splits import clean_value, load_split
from reftsearch.engine.scoring import class_probabilities, generate
from reftsearch.errors import BadInputError
from reftsearch.export.pyreft import pick_trial
from reftsearch.export.reader import PyreftExport
from reftsearch.methods.adapter import Adapter
from reftsearch.models.base import EXACT_DTYPE, BaseModel
from reftsearch.progress import Log
from reftsearch.search.study import load_study_of, prepare
from reftsearch.search.test_split import trained_adapter
from reftsearch.spec.study_file import StudySpec, TaskSpec


@dataclass(frozen=True)
class TrainedTrial:
    """A trial's trained adapter on its base model (its head loaded into the model), with
    the task settings inputs are read and encoded with."""

    base: BaseModel
    adapter: Adapter
    task: TaskSpec
    label_names: list[str] | None
    source: str  # which trial, and where its weights came from, for the user


def trained_trial(spec: StudySpec, storage_url: str, number: int | None, log: Log) -> TrainedTrial:
    """The study's best trial (or trial ``number``), from its kept weights (else retrained),
    in float32 as export ships it: a 16-bit search's pick predicts from its float32 rerun."""
    study = load_study_of(spec, storage_url)
    trial = pick_trial(study, number)
    prepared = prepare(spec, dtype=EXACT_DTYPE)
    adapter, source = trained_adapter(prepared, study, trial, log)
    source = f"trial {trial.number} ({source})"
    return TrainedTrial(prepared.base, adapter, spec.task, prepared.data.label_names, source)


def trained_export(export: PyreftExport) -> TrainedTrial:
    """The trial an export directory holds (``reftsearch.export.reader``)."""
    base, reft = export.load()
    return TrainedTrial(base, reft, export.task, export.label_names, export.description)


ESCAPED = str.maketrans({"\t": "\\t", "\n": "\\n", "\r": "\\r"})


@dataclass(frozen=True)
class Prediction:
    """One input and what the trial makes of it."""

    input: dict[str, str]  # text (and text_pair), or prompt
    label: str | None = None  # classification
    probabilities: dict[str, float] | None = None
    text: str | None = None  # generation

    def line(self) -> str:
        """What predict prints: one line per classified input (tab-separated: its tabs and
        line breaks are shown escaped), or a prompt and its continuation."""
        shown = " | ".join(value.translate(ESCAPED) for value in self.input.values())
        if self.text is not None:
            return f"{shown}\n  -> {self.text}"
        assert self.label is not None and self.probabilities is not None
        spread = ", ".join(f"{name} {p:.3f}" for name, p in self.probabilities.items())
        return f"{self.label}\t({spread})\t{shown}"


def text_inputs(task: TaskSpec, texts: list[str]) -> list[dict[str, str]]:
    """``--text`` values as inputs (prompts for generation), cleaned as the task's files are."""
    if task.kind == "classification" and task.text_pair:
        raise BadInputError(
            f"--text: this task reads text pairs (columns {task.text!r} and "
            f"{task.text_pair!r}); give them in a file with --input"
        )
    key = "prompt" if task.kind == "generation" else "text"
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:  # bytes the shell passed that are not UTF-8
            raise BadInputError(
                f"--text[{i}]: is not UTF-8 text (a byte that is not, at character {err.start})"
            ) from None
    return [{key: clean_value(key, text, f"--text[{i}]")} for i, text in enumerate(texts)]


def file_inputs(task: TaskSpec, path: Path) -> list[dict[str, str]]:
    """The rows of a file in the task's format (its columns and read options); a label or
    response column, if present, is left out."""
    if path.is_dir():
        raise BadInputError(f"--input: {path} is a directory; give a file of inputs")
    if not path.is_file():
        raise BadInputError(f"--input: file not found: {path}")
    data = dataclasses.replace(task.data, builtin=None, hub=None, test=str(path.resolve()))
    as_split = dataclasses.replace(task, data=data)
    try:
        rows = load_split(as_split, "test", optional=("label", "response"), given_as="--input")
    except BadInputError as err:
        raise BadInputError(
            f"{err}; --input is read as the task's files are: {_format(task)}"
        ) from None
    return [{key: row[key] for key in _input_keys(task) if key in row} for row in rows]


def _input_keys(task: TaskSpec) -> tuple[str, ...]:
    """The parts of a row a prediction reads (the label or response is what it gives)."""
    return ("prompt",) if task.kind == "generation" else ("text", "text_pair")


def _format(task: TaskSpec) -> str:
    """The file format ``--input`` must have: the task's input columns and read settings."""
    keys = _input_keys(task)
    names = [f"{getattr(task, key)!r} (task.{key})" for key in keys if getattr(task, key)]
    parts = [f"column{'s' if len(names) > 1 else ''} {' and '.join(names)}"]
    data = task.data
    if data.columns:
        parts.append(f"no header line, columns in the order {list(data.columns)}")
    elif not data.header:
        parts.append("no header line (columns by position)")
    if data.read_options:
        parts.append(f"read_options {dict(data.read_options)}")
    return ", ".join(parts)


def predict(trained: TrainedTrial, inputs: list[dict]) -> list[Prediction]:
    """What the trained trial predicts for ``inputs``."""
    task, base, adapter = trained.task, trained.base, trained.adapter
    placeholder = {"label": None} if task.kind == "classification" else {"response": ""}
    examples = encode([{**placeholder, **row} for row in inputs], base.tokenizer, task)
    with adapter.attached(base.blocks):
        if task.kind == "generation":
            texts = generate(base, adapter, examples, task.max_new_tokens)
            return [Prediction(row, text=text) for row, text in zip(inputs, texts, strict=True)]
        probabilities = class_probabilities(base, adapter, examples)
    names = trained.label_names or [str(i) for i in range(probabilities.shape[1])]
    return [
        Prediction(
            row,
            label=names[int(p.argmax())],
            probabilities={name: round(float(q), 6) for name, q in zip(names, p, strict=True)},
        )
        for row, p in zip(inputs, probabilities, strict=True)
    ]
