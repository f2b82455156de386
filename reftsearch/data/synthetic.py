"""Deterministic synthetic tasks built from reftsearch's own word lists.

The README demo study and the tests need tasks that run with no download and no external data,
and that still reward a good intervention configuration. Two tasks are provided:

``sentiment`` (classification, rows ``{"sentence": str, "label": int}``)
    One- or two-clause film reviews with negation ("not", "never"), downtoners ("hardly",
    "barely"), intensifiers ("very", "really", ...) and contrast connectives ("but", "yet",
    "although", ...). The label follows fixed rules in which *word order* decides: a negator
    flips its own clause only, after "but"/"yet" the second clause decides, with "although X, Y"
    the main clause Y decides while in "X although Y" the main clause X decides. The same bag of
    words therefore occurs with both labels, so where an intervention reads or writes matters.

``arithmetic`` (generation, rows ``{"prompt": str, "response": str}``)
    ``"7 plus 5 ="`` -> ``" 12"`` and ``"12 minus 5 ="`` -> ``" 7"`` over small operands: tiny
    and regular enough for a small decoder to learn something in a short trial.

Everything is drawn from a ``random.Random(seed)`` of its own (never the global random state),
so a seed gives the same splits on every run, and no text occurs in two splits.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Row = dict[str, Any]
Splits = dict[str, list[Row]]


def _words(text: str) -> tuple[str, ...]:
    """Word lists as space-separated text: long lists stay compact and readable."""
    return tuple(text.split())


# --------------------------------------------------------------------------------------------
# sentiment
# --------------------------------------------------------------------------------------------

#: Aspects of a film; every clause is "the <noun> was ...".
NOUNS: tuple[str, ...] = _words(
    "acting plot ending script soundtrack cast dialogue pacing cinematography direction "
    "story humor villain hero finale premise editing score lighting opening twist setting "
    "camerawork performance"
)

POSITIVE_ADJECTIVES: tuple[str, ...] = _words(
    "good great excellent brilliant wonderful superb charming clever moving gripping "
    "fresh funny beautiful strong delightful original memorable engaging stunning solid"
)

NEGATIVE_ADJECTIVES: tuple[str, ...] = _words(
    "bad awful terrible dull boring weak clumsy bland predictable messy tedious lifeless "
    "forgettable flat painful sloppy shallow stale dreadful poor"
)

#: Words that flip the polarity of the clause they stand in (and only that clause).
NEGATORS: tuple[str, ...] = ("not", "never", "hardly", "barely")

#: Degree words that never change polarity; only combined with no negator, "not" or "never"
#: ("hardly very good" is not English).
INTENSIFIERS: tuple[str, ...] = ("very", "really", "truly", "quite", "so", "especially")

_NEGATORS_WITH_INTENSIFIER: frozenset[str] = frozenset({"", "not", "never"})

#: Sentence structure -> (template, which clause decides the label). ``"first"``/``"second"``
#: name the clause ``{a}``/``{b}``; ``"both"`` requires the two clauses to agree.
STRUCTURES: dict[str, tuple[str, str]] = {
    "single": ("{a}", "first"),
    "and": ("{a} and {b}", "both"),
    "but": ("{a} but {b}", "second"),
    "yet": ("{a} yet {b}", "second"),
    "although_lead": ("although {a}, {b}", "second"),
    "even_though_lead": ("even though {a}, {b}", "second"),
    "although_tail": ("{a} although {b}", "first"),
    "though_tail": ("{a} though {b}", "first"),
}

# Sampling weights: most mass on the two-clause contrasts, where order decides the label.
_STRUCTURE_WEIGHTS: dict[str, float] = {
    "single": 0.25,
    "and": 0.10,
    "but": 0.20,
    "yet": 0.08,
    "although_lead": 0.12,
    "even_though_lead": 0.05,
    "although_tail": 0.12,
    "though_tail": 0.08,
}

_NEGATION_RATE = 0.35
_INTENSIFIER_RATE = 0.35


@dataclass(frozen=True)
class Clause:
    """One clause "the <noun> was [negator] [intensifier] <adjective>" and its polarity.

    Public so that tests (and readers) can build a sentence from known parts and check that the
    label follows the rules.
    """

    noun: str
    adjective: str
    negator: str = ""
    intensifier: str = ""

    def __post_init__(self) -> None:
        if self.adjective not in POSITIVE_ADJECTIVES and self.adjective not in NEGATIVE_ADJECTIVES:
            raise ValueError(f"unknown adjective {self.adjective!r}")
        if self.negator and self.negator not in NEGATORS:
            raise ValueError(f"unknown negator {self.negator!r}")
        if self.intensifier and self.intensifier not in INTENSIFIERS:
            raise ValueError(f"unknown intensifier {self.intensifier!r}")
        if self.intensifier and self.negator not in _NEGATORS_WITH_INTENSIFIER:
            raise ValueError(f"negator {self.negator!r} cannot take an intensifier")

    @property
    def text(self) -> str:
        words = ["the", self.noun, "was", self.negator, self.intensifier, self.adjective]
        return " ".join(w for w in words if w)

    @property
    def positive(self) -> bool:
        """Adjective polarity, flipped by a negator; intensifiers do not change it."""
        return (self.adjective in POSITIVE_ADJECTIVES) != bool(self.negator)


def sentiment_row(structure: str, first: Clause, second: Clause | None = None) -> Row:
    """Render a sentence and its label by the rules of :data:`STRUCTURES`.

    ``"and"`` with clauses of opposite polarity has no defined label and raises ``ValueError``.
    """
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}: must be one of {sorted(STRUCTURES)}")
    template, decides = STRUCTURES[structure]
    if structure == "single":
        if second is not None:
            raise ValueError("structure 'single' takes one clause")
        return {"sentence": first.text, "label": int(first.positive)}
    if second is None:
        raise ValueError(f"structure {structure!r} takes two clauses")
    if decides == "both" and first.positive != second.positive:
        raise ValueError(f"structure {structure!r} needs clauses of the same polarity")
    positive = second.positive if decides == "second" else first.positive
    return {"sentence": template.format(a=first.text, b=second.text), "label": int(positive)}


def _random_clause(rng: random.Random, positive: bool, avoid_noun: str = "") -> Clause:
    """A clause with the given polarity, negated at ``_NEGATION_RATE``."""
    noun = rng.choice([n for n in NOUNS if n != avoid_noun])
    negator = rng.choice(NEGATORS) if rng.random() < _NEGATION_RATE else ""
    surface_positive = positive != bool(negator)
    adjective = rng.choice(POSITIVE_ADJECTIVES if surface_positive else NEGATIVE_ADJECTIVES)
    intensifier = ""
    if negator in _NEGATORS_WITH_INTENSIFIER and rng.random() < _INTENSIFIER_RATE:
        intensifier = rng.choice(INTENSIFIERS)
    return Clause(noun, adjective, negator, intensifier)


def _random_sentiment_row(rng: random.Random, label: int) -> Row:
    """A random sentence with the given label.

    In contrast structures the two clauses always have opposite polarity, so that the words of
    both polarities are present and only their position tells the label.
    """
    structure = rng.choices(list(_STRUCTURE_WEIGHTS), weights=list(_STRUCTURE_WEIGHTS.values()))[0]
    if structure == "single":
        return sentiment_row(structure, _random_clause(rng, bool(label)))
    decides = STRUCTURES[structure][1]
    deciding = bool(label)
    other = deciding if decides == "both" else not deciding
    a_positive, b_positive = (other, deciding) if decides == "second" else (deciding, other)
    first = _random_clause(rng, a_positive)
    second = _random_clause(rng, b_positive, avoid_noun=first.noun)
    return sentiment_row(structure, first, second)


def sentiment_task(seed: int = 0, sizes: dict[str, int] | None = None) -> Splits:
    """Sentiment splits with exactly balanced labels (up to one row for an odd size)."""
    split_sizes = _resolve_sizes({"train": 2000, "dev": 500, "test": 500}, sizes)
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: Splits = {}
    for split, size in split_sizes.items():
        labels = [1] * (size // 2) + [0] * (size - size // 2)
        rng.shuffle(labels)
        rows: list[Row] = []
        for label in labels:
            for _ in range(1000):
                row = _random_sentiment_row(rng, label)
                if row["sentence"] not in seen:
                    break
            else:  # pragma: no cover - the sentence space is millions wide
                raise RuntimeError("could not draw a new unique sentence")
            seen.add(row["sentence"])
            rows.append(row)
        splits[split] = rows
    return splits


# --------------------------------------------------------------------------------------------
# arithmetic
# --------------------------------------------------------------------------------------------

#: Operands are drawn from ``0..ARITHMETIC_MAX_OPERAND``; subtraction never goes below zero.
ARITHMETIC_MAX_OPERAND = 30


def _all_arithmetic_rows() -> list[Row]:
    rows: list[Row] = []
    for a in range(ARITHMETIC_MAX_OPERAND + 1):
        for b in range(ARITHMETIC_MAX_OPERAND + 1):
            rows.append({"prompt": f"{a} plus {b} =", "response": f" {a + b}"})
            if a >= b:
                rows.append({"prompt": f"{a} minus {b} =", "response": f" {a - b}"})
    return rows


def arithmetic_task(seed: int = 0, sizes: dict[str, int] | None = None) -> Splits:
    """Arithmetic splits: every problem is enumerated once, shuffled, then sliced.

    Slicing one shuffled list is what keeps the splits disjoint; the pool holds 1,457 problems.
    """
    split_sizes = _resolve_sizes({"train": 1000, "dev": 200, "test": 200}, sizes)
    pool = _all_arithmetic_rows()
    if sum(split_sizes.values()) > len(pool):
        raise ValueError(
            f"arithmetic has only {len(pool)} distinct problems, "
            f"asked for {sum(split_sizes.values())}"
        )
    random.Random(seed).shuffle(pool)
    splits: Splits = {}
    start = 0
    for split, size in split_sizes.items():
        splits[split] = pool[start : start + size]
        start += size
    return splits


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------


def _resolve_sizes(defaults: dict[str, int], sizes: dict[str, int] | None) -> dict[str, int]:
    """Defaults overridden per split; unknown split names and negative sizes are errors."""
    merged = dict(defaults)
    for split, size in (sizes or {}).items():
        if split not in defaults:
            raise ValueError(f"unknown split {split!r}: must be one of {list(defaults)}")
        if size < 0:
            raise ValueError(f"split {split!r} size must be >= 0, got {size}")
        merged[split] = size
    return merged


BUILTIN_TASKS: dict[str, Callable[..., Splits]] = {
    "sentiment": sentiment_task,
    "arithmetic": arithmetic_task,
}

TASK_KINDS: dict[str, str] = {
    "sentiment": "classification",
    "arithmetic": "generation",
}


def make_builtin_task(name: str, seed: int = 0, sizes: dict[str, int] | None = None) -> Splits:
    """Splits ``{"train", "dev", "test"}`` of the builtin task ``name``, the same for a seed."""
    if name not in BUILTIN_TASKS:
        raise ValueError(f"unknown builtin task {name!r}: must be one of {sorted(BUILTIN_TASKS)}")
    return BUILTIN_TASKS[name](seed=seed, sizes=sizes)
