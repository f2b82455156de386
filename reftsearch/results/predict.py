"""A trained trial on new inputs: ``reftsearch predict``.

Inputs are encoded as the task's examples are (the same tokenizer, ``max_length`` and
positions), so a trial predicts here exactly what it predicted when it was scored: run on dev
rows, the predictions reproduce its dev score. Classification gives each input's label (by
name: the task's labels as they appear in its files) and every class's probability;
generation gives the greedy continuation of each prompt, as dev scoring decodes it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from reftsearch.data.batches import encode
from reftsearch.data.splits import clean_value, load_split
from reftsearch.engine.scoring import class_probabilities, generate
from reftsearch.errors import BadInputError
from reftsearch.methods.adapter import Adapter
from reftsearch.search.study import PreparedStudy
from reftsearch.spec.study_file import TaskSpec


@dataclass(frozen=True)
class Prediction:
    """One input and what the trial makes of it."""

    input: dict[str, str]  # text (and text_pair), or prompt
    label: str | None = None  # classification
    probabilities: dict[str, float] | None = None
    text: str | None = None  # generation

    def line(self) -> str:
        shown = " | ".join(self.input.values())
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
    return [{key: clean_value(key, text, f"--text[{i}]")} for i, text in enumerate(texts)]


def file_inputs(task: TaskSpec, path: Path) -> list[dict[str, str]]:
    """The rows of a file in the task's format (its columns and read options); a label or
    response column, if present, is left out."""
    if not path.is_file():
        raise BadInputError(f"--input: file not found: {path}")
    data = dataclasses.replace(task.data, builtin=None, hub=None, test=str(path.resolve()))
    rows = load_split(dataclasses.replace(task, data=data), "test", optional=("label", "response"))
    inputs = ("prompt",) if task.kind == "generation" else ("text", "text_pair")
    return [{key: row[key] for key in inputs if key in row} for row in rows]


def predict(prepared: PreparedStudy, adapter: Adapter, inputs: list[dict]) -> list[Prediction]:
    """What the trained ``adapter`` (its head already in the model) predicts for ``inputs``."""
    task, base = prepared.spec.task, prepared.base
    placeholder = {"label": None} if task.kind == "classification" else {"response": ""}
    examples = encode([{**placeholder, **row} for row in inputs], base.tokenizer, task)
    with adapter.attached(base.blocks):
        if task.kind == "generation":
            texts = generate(base, adapter, examples, prepared.split.max_new_tokens)
            return [Prediction(row, text=text) for row, text in zip(inputs, texts, strict=True)]
        probabilities = class_probabilities(base, adapter, examples)
    names = prepared.data.label_names or [str(i) for i in range(probabilities.shape[1])]
    return [
        Prediction(
            row,
            label=names[int(p.argmax())],
            probabilities={name: round(float(q), 6) for name, q in zip(names, p, strict=True)},
        )
        for row, p in zip(inputs, probabilities, strict=True)
    ]
