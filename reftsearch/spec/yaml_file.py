"""Reading a study file's YAML with bounds, so that hostile input costs milliseconds.

``yaml.safe_load`` alone accepts what a study file must not hold: a 500-byte "billion
laughs" of nested aliases that expands to gigabytes once copied, recursive aliases, nesting
deep enough to exhaust the stack, and a mapping that gives a key twice (YAML keeps the last
value, silently). Here the file's size is capped before it is read, and one pass over the
parser's events (libyaml's, iterative) counts the nodes the document expands to, its depth,
and each mapping's keys, before anything is built.

Numbers are read as YAML 1.2 and JSON read them, not as YAML 1.1 (PyYAML's) does: ``1e-3``
(no dot) is a float, not a string; ``010`` is ten, not octal eight (``0o10`` is eight); and
``1:30`` is a string, not the base-60 number 90 (a duration that silently became 90 s).
Underscores between digits (``1_000``) are kept, as Python reads them.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from reftsearch.errors import BadInputError
from reftsearch.spec.readers import join

MAX_BYTES = 256 * 1024  # the shipped studies are under 3 KB
MAX_NODES = 20_000  # scalars and collections, aliases expanded (the shipped: under 150)
MAX_DEPTH = 32  # nested mappings and lists (the shipped: 4)

_BASE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class StudyLoader(_BASE_LOADER):  # type: ignore[misc, valid-type]
    """The safe loader (libyaml's when installed), reading numbers as YAML 1.2 does."""


_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_INT = re.compile(r"^[-+]?(?:0b[01_]+|0o[0-7_]+|0x[0-9a-fA-F_]+|[0-9][0-9_]*)$")
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
    re.VERBOSE,
)
_RADIXES = {"0b": 2, "0o": 8, "0x": 16}


def _yaml_1_2_numbers(loader: type[StudyLoader]) -> None:
    """Replace YAML 1.1's number resolvers (sexagesimal, leading-zero octal) with ``_INT``
    and ``_FLOAT``, and its integer constructor with ``_construct_int``."""
    loader.yaml_implicit_resolvers = {  # the class's own: the base loader's stay as they are
        first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
        for first, resolvers in _BASE_LOADER.yaml_implicit_resolvers.items()
    }
    loader.add_implicit_resolver(_INT_TAG, _INT, list("-+0123456789"))
    loader.add_implicit_resolver(_FLOAT_TAG, _FLOAT, list("-+.0123456789"))
    loader.add_constructor(_INT_TAG, _construct_int)


def _construct_int(loader: StudyLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    sign = -1 if text.startswith("-") else 1
    digits = text.lstrip("+-")
    base = _RADIXES.get(digits[:2])
    if base is not None:
        return sign * int(digits[2:], base)
    return sign * int(digits)  # leading zeros and all: decimal


_yaml_1_2_numbers(StudyLoader)


def read_study_file(path: Path) -> Any:
    """The YAML value in ``path``, read within the bounds above."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_BYTES + 1)
    except OSError as err:
        raise BadInputError(f"{path}: cannot read study file ({err.strerror})") from None
    if len(data) > MAX_BYTES:
        raise BadInputError(f"{path}: is over {MAX_BYTES // 1024} KiB, too large for a study file")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data:
        raise BadInputError(f"{path}: is not UTF-8 text (UTF-16 or binary): save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise BadInputError(
            f"{path}: is not UTF-8 text (byte {data[err.start]:#04x} at offset {err.start})"
        ) from None
    return load_yaml(text, str(path))


def load_yaml(text: str, where: str) -> Any:
    """``text``'s YAML value; ``where`` names it in errors (a file, a ``--set`` item)."""
    try:
        _check_events(yaml.parse(_named(text, where), Loader=StudyLoader), where)
        return yaml.load(_named(text, where), Loader=StudyLoader)  # noqa: S506 (a safe loader)
    except (yaml.YAMLError, ValueError) as err:  # ValueError: an integer of 4,300+ digits
        reason = " ".join(str(err).split())  # one line: YAML's spreads over several
        raise BadInputError(f"{where}: not valid YAML: {reason}") from None


def _named(text: str, where: str) -> io.StringIO:
    """``text`` as a stream named ``where``: YAML's errors then say `in "study.yaml", line 4`,
    not `in "<unicode string>"`."""
    stream = io.StringIO(text)
    stream.name = where
    return stream


@dataclass
class _Collection:
    """A mapping or list being read: its key path, expanded size so far, and keys seen."""

    path: str
    anchor: str | None
    is_mapping: bool
    size: int = 1
    items: int = 0  # list items, or mapping keys and values
    key: str | None = None  # a mapping's current key (the last scalar key read)
    keys: dict[str, int] = field(default_factory=dict)  # key -> its line

    def child_path(self) -> str:
        if not self.is_mapping:
            return join(self.path, self.items)
        return join(self.path, self.key) if self.key is not None else self.path


def _check_events(events, where: str) -> None:
    """Refuse a document that expands past ``MAX_NODES``, nests past ``MAX_DEPTH``, aliases
    itself, or repeats a key in a mapping. One pass; memory stays that of the text."""
    stack: list[_Collection] = []
    sizes: dict[str, int] = {}  # anchor -> the expanded size of its node
    total = 0

    def add(size: int, anchor: str | None, event) -> None:
        nonlocal total
        total += size
        if total > MAX_NODES:
            raise BadInputError(
                f"{where}: expands to over {MAX_NODES} values (aliases counted each time they "
                "are used): too large for a study file"
            )
        if anchor is not None:
            sizes[anchor] = size
        if stack:
            parent = stack[-1]
            parent.size += size
            if parent.is_mapping and parent.items % 2 == 0:
                _key(parent, event, where)
            parent.items += 1

    for event in events:
        if isinstance(event, yaml.ScalarEvent):
            add(1, event.anchor, event)
        elif isinstance(event, yaml.AliasEvent):
            if any(c.anchor == event.anchor for c in stack):
                path = stack[-1].child_path() if stack else ""
                raise BadInputError(
                    f"{where}: {path or 'the document'}: alias *{event.anchor} refers to a "
                    "value that contains it (a recursive alias)"
                )
            add(sizes.get(event.anchor, 1), None, event)  # undefined: yaml.load says so
        elif isinstance(event, yaml.CollectionStartEvent):
            path = stack[-1].child_path() if stack else ""
            if len(stack) >= MAX_DEPTH:
                raise BadInputError(
                    f"{where}: {path}: nested over {MAX_DEPTH} levels deep, too deep for a "
                    "study file"
                )
            is_mapping = isinstance(event, yaml.MappingStartEvent)
            if stack and stack[-1].is_mapping and stack[-1].items % 2 == 0:
                stack[-1].key = None  # a list or mapping as a key: no name to report
            stack.append(_Collection(path, event.anchor, is_mapping))
        elif isinstance(event, yaml.CollectionEndEvent):
            done = stack.pop()
            add(done.size, done.anchor, None)


def _key(parent: _Collection, event, where: str) -> None:
    """Record a mapping key; a key given twice is an error naming its path and lines."""
    if not isinstance(event, yaml.ScalarEvent):
        parent.key = None
        return
    parent.key = event.value
    if event.value == "<<":  # a merge key: the merged keys may be overridden, by design
        return
    line = event.start_mark.line + 1
    if event.value in parent.keys:
        first = parent.keys[event.value]
        lines = f"lines {first} and {line}" if first != line else f"line {line}"
        raise BadInputError(
            f"{where}: {join(parent.path, event.value)}: given twice ({lines}); YAML would "
            "keep only the last"
        )
    parent.keys[event.value] = line
