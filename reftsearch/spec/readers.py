"""Small typed readers for YAML values; every failure is a SpecError naming the key path."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from reftsearch.errors import SpecError


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def mapping(raw: Any, path: str, allowed: Iterable[str], required: Iterable[str] = ()) -> dict:
    """A mapping with only ``allowed`` keys and all ``required`` ones."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise SpecError(path, f"must be a mapping, got {_show(raw)}")
    allowed = list(allowed)
    for key in raw:
        if key not in allowed:
            raise SpecError(join(path, str(key)), f"unknown key; allowed keys are {allowed}")
    for key in required:
        if key not in raw:
            raise SpecError(join(path, key), "is required")
    return dict(raw)


def string(raw: Any, path: str, pattern: str | None = None, hint: str = "") -> str:
    if not isinstance(raw, str) or not raw:
        raise SpecError(path, f"must be a non-empty string, got {_show(raw)}")
    if pattern and not re.fullmatch(pattern, raw):
        raise SpecError(path, f"must be {hint or 'matching ' + pattern}, got {_show(raw)}")
    return raw


def choice(raw: Any, path: str, choices: Iterable[str]) -> str:
    choices = sorted(choices)
    if raw not in choices:
        raise SpecError(path, f"must be one of {choices}, got {_show(raw)}")
    return raw


def boolean(raw: Any, path: str) -> bool:
    if not isinstance(raw, bool):
        raise SpecError(path, f"must be true or false, got {_show(raw)}")
    return raw


# No count in a study file comes near this; anything larger is a typo, and an integer past
# 64 bits would overflow torch, numpy or SQLite wherever it first reached them.
MAX_INTEGER = 2**31 - 1


def integer(raw: Any, path: str, minimum: int | None = None, maximum: int = MAX_INTEGER) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise SpecError(path, f"must be {_int_words(minimum)}, got {_show(raw)}")
    if minimum is not None and raw < minimum:
        raise SpecError(path, f"must be {_int_words(minimum)}, got {raw}")
    if raw > maximum:
        raise SpecError(path, f"must be {_int_words(minimum)} <= {maximum}, got {_show(raw)}")
    return raw


def number(
    raw: Any,
    path: str,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_min: bool = False,
    exclusive_max: bool = False,
) -> float:
    expected = f"must be a number{_range_words(minimum, maximum, exclusive_min, exclusive_max)}"
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise SpecError(path, f"{expected}, got {_show(raw)}")
    if not math.isfinite(raw):  # .nan passes every comparison; .inf trains nothing
        raise SpecError(path, f"{expected} (finite), got {raw}")
    too_low = minimum is not None and (raw <= minimum if exclusive_min else raw < minimum)
    too_high = maximum is not None and (raw >= maximum if exclusive_max else raw > maximum)
    if too_low or too_high:
        raise SpecError(path, f"{expected}, got {raw}")
    return float(raw)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(raw: Any, path: str) -> float:
    """Seconds from a number or a string like ``90``, ``30m``, ``2h``, ``1.5h``."""
    if isinstance(raw, int | float) and not isinstance(raw, bool) and 0 < raw < math.inf:
        return float(raw)
    match = _DURATION.fullmatch(raw.strip()) if isinstance(raw, str) else None
    if not match or float(match.group(1)) <= 0:
        raise SpecError(
            path, f"must be a positive duration like 90, '30m' or '2h', got {_show(raw)}"
        )
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _int_words(minimum: int | None) -> str:
    return {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}.get(
        minimum, f"an integer >= {minimum}"
    )


def _range_words(lo: float | None, hi: float | None, ex_lo: bool, ex_hi: bool) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if ex_lo else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if ex_hi else '<='} {hi}")
    return (" " + " and ".join(parts)) if parts else ""


def _show(raw: Any) -> str:
    if isinstance(raw, Mapping):
        return "a mapping"
    if isinstance(raw, list):
        return "a list"
    if isinstance(raw, int) and not isinstance(raw, bool) and raw.bit_length() > 64:
        return f"an integer of {len(str(abs(raw)))} digits"
    text = repr(raw)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"
