"""Tests for the builtin synthetic tasks (reftsearch.data.synthetic)."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from reftsearch.data.synthetic import (
    BUILTIN_TASKS,
    INTENSIFIERS,
    NEGATIVE_ADJECTIVES,
    NEGATORS,
    POSITIVE_ADJECTIVES,
    STRUCTURES,
    TASK_KINDS,
    Clause,
    make_builtin_task,
    sentiment_row,
)


@pytest.fixture(scope="module")
def sentiment() -> dict[str, list[dict]]:
    return make_builtin_task("sentiment", seed=0)


@pytest.fixture(scope="module")
def arithmetic() -> dict[str, list[dict]]:
    return make_builtin_task("arithmetic", seed=0)


def _bag(sentence: str) -> tuple[str, ...]:
    return tuple(sorted(sentence.replace(",", " ").split()))


# ---------------------------------------------------------------------------- registry


def test_registry_names_and_kinds() -> None:
    assert set(BUILTIN_TASKS) == {"sentiment", "arithmetic"}
    assert TASK_KINDS == {"sentiment": "classification", "arithmetic": "generation"}


def test_unknown_name_error_message() -> None:
    with pytest.raises(ValueError) as info:
        make_builtin_task("x")
    assert str(info.value) == "unknown builtin task 'x': must be one of ['arithmetic', 'sentiment']"


@pytest.mark.parametrize("name", ["sentiment", "arithmetic"])
def test_same_seed_same_output_other_seed_differs(name: str) -> None:
    state = random.getstate()
    first = make_builtin_task(name, seed=3)
    random.seed(12345)  # the global random state must not matter
    assert make_builtin_task(name, seed=3) == first
    assert make_builtin_task(name, seed=4) != first
    random.setstate(state)


@pytest.mark.parametrize("name", ["sentiment", "arithmetic"])
def test_does_not_touch_global_random_state(name: str) -> None:
    random.seed(7)
    expected = random.random()
    random.seed(7)
    make_builtin_task(name, seed=0)
    assert random.random() == expected


def test_default_split_sizes(sentiment, arithmetic) -> None:
    assert {k: len(v) for k, v in sentiment.items()} == {"train": 2000, "dev": 500, "test": 500}
    assert {k: len(v) for k, v in arithmetic.items()} == {"train": 1000, "dev": 200, "test": 200}


@pytest.mark.parametrize("name", ["sentiment", "arithmetic"])
def test_custom_sizes_override_per_split(name: str) -> None:
    splits = make_builtin_task(name, seed=1, sizes={"train": 50, "test": 7})
    assert len(splits["train"]) == 50
    assert len(splits["test"]) == 7
    assert len(splits["dev"]) > 0  # the default stays


def test_bad_sizes_rejected() -> None:
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        make_builtin_task("sentiment", sizes={"validation": 10})
    with pytest.raises(ValueError, match=">= 0"):
        make_builtin_task("sentiment", sizes={"train": -1})
    with pytest.raises(ValueError, match="distinct problems"):
        make_builtin_task("arithmetic", sizes={"train": 100_000})


# ---------------------------------------------------------------------------- sentiment


def test_sentiment_rows_schema_and_length(sentiment) -> None:
    for rows in sentiment.values():
        for row in rows:
            assert set(row) == {"sentence", "label"}
            assert isinstance(row["sentence"], str)
            assert row["label"] in (0, 1)
            assert len(row["sentence"].split()) <= 20


def test_sentiment_labels_balanced(sentiment) -> None:
    for split, rows in sentiment.items():
        share = sum(r["label"] for r in rows) / len(rows)
        assert 0.45 <= share <= 0.55, split


def test_sentiment_splits_disjoint_and_unique(sentiment) -> None:
    sentences = [r["sentence"] for rows in sentiment.values() for r in rows]
    assert len(sentences) == len(set(sentences))


def test_sentiment_uses_varied_vocabulary_and_structures(sentiment) -> None:
    words = Counter(w for r in sentiment["train"] for w in _bag(r["sentence"]))
    assert sum(w in words for w in POSITIVE_ADJECTIVES + NEGATIVE_ADJECTIVES) >= 36
    assert all(w in words for w in NEGATORS + INTENSIFIERS)
    assert all(w in words for w in ("but", "yet", "although", "though", "even", "and"))


def test_clause_polarity_rules() -> None:
    assert Clause("plot", "good").positive
    assert not Clause("plot", "dull").positive
    for negator in NEGATORS:
        assert not Clause("plot", "good", negator).positive
        assert Clause("plot", "dull", negator).positive
    assert Clause("plot", "good", intensifier="very").positive
    assert not Clause("plot", "good", "not", "very").positive
    assert Clause("acting", "good", "not", "very").text == "the acting was not very good"
    with pytest.raises(ValueError, match="cannot take an intensifier"):
        Clause("plot", "good", "hardly", "very")


def test_sentiment_contrast_and_negation_rules_on_known_parts() -> None:
    not_good = Clause("acting", "good", "not", "very")
    great = Clause("ending", "great")
    dull = Clause("plot", "dull")
    never_boring = Clause("score", "boring", "never")

    row = sentiment_row("but", not_good, great)
    assert row == {"sentence": "the acting was not very good but the ending was great", "label": 1}
    # Same words, other order: the clause after "but" decides.
    assert sentiment_row("but", great, not_good)["label"] == 0
    assert sentiment_row("yet", great, dull)["label"] == 0
    # "although X, Y": main clause Y decides; "X although Y": main clause X decides.
    lead = sentiment_row("although_lead", dull, great)
    assert lead == {"sentence": "although the plot was dull, the ending was great", "label": 1}
    tail = sentiment_row("although_tail", dull, great)
    assert tail == {"sentence": "the plot was dull although the ending was great", "label": 0}
    assert _bag(lead["sentence"]) == _bag(tail["sentence"])
    assert sentiment_row("even_though_lead", great, dull)["label"] == 0
    assert sentiment_row("though_tail", never_boring, not_good)["label"] == 1
    assert sentiment_row("single", never_boring) == {
        "sentence": "the score was never boring",
        "label": 1,
    }
    assert sentiment_row("and", great, never_boring)["label"] == 1
    with pytest.raises(ValueError, match="same polarity"):
        sentiment_row("and", great, dull)


def _rule_label(sentence: str) -> int:
    """An independent reading of the rules, from the sentence text alone."""

    def clause_positive(clause: str) -> bool:
        words = clause.split()
        assert words[0] == "the" and words[2] == "was", clause
        adjective = words[-1]
        assert adjective in POSITIVE_ADJECTIVES or adjective in NEGATIVE_ADJECTIVES
        negated = sum(w in NEGATORS for w in words)
        assert negated <= 1
        return (adjective in POSITIVE_ADJECTIVES) != bool(negated)

    for lead in ("although ", "even though "):
        if sentence.startswith(lead):
            _, main = sentence[len(lead) :].split(", ")
            return int(clause_positive(main))
    for connective in (" but ", " yet "):
        if connective in sentence:
            return int(clause_positive(sentence.split(connective)[1]))
    for connective in (" although ", " though "):
        if connective in sentence:
            return int(clause_positive(sentence.split(connective)[0]))
    if " and " in sentence:
        first, second = sentence.split(" and ")
        assert clause_positive(first) == clause_positive(second)
        return int(clause_positive(first))
    return int(clause_positive(sentence))


def test_every_generated_label_follows_the_rules(sentiment) -> None:
    for rows in sentiment.values():
        for row in rows:
            assert _rule_label(row["sentence"]) == row["label"], row["sentence"]


def test_same_bag_of_words_occurs_with_both_labels(sentiment) -> None:
    """Swapping the clauses of any generated contrast keeps its words and flips its label."""
    flipped = 0
    for row in sentiment["test"]:
        sentence = row["sentence"]
        if " but " in sentence:
            a, b = sentence.split(" but ")
            swapped = f"{b} but {a}"
            assert _bag(swapped) == _bag(sentence)
            assert _rule_label(swapped) != row["label"]
            flipped += 1
    assert flipped >= 50


def _bow_features(sentence: str) -> Counter:
    return Counter(_bag(sentence))


def test_bag_of_words_classifier_is_well_below_perfect(sentiment) -> None:
    """A trained bag-of-words logistic regression cannot fit the order-dependent rules."""
    weights: dict[str, float] = {}
    bias = 0.0
    rng = random.Random(0)
    train = list(sentiment["train"])
    data = [(_bow_features(r["sentence"]), r["label"]) for r in train]
    for _ in range(30):
        rng.shuffle(data)
        for features, label in data:
            z = bias + sum(weights.get(w, 0.0) * c for w, c in features.items())
            grad = 1.0 / (1.0 + math.exp(-max(min(z, 30.0), -30.0))) - label
            bias -= 0.1 * grad
            for w, c in features.items():
                weights[w] = weights.get(w, 0.0) - 0.1 * grad * c

    def accuracy(rows: list[dict]) -> float:
        hits = 0
        for r in rows:
            features = _bow_features(r["sentence"])
            z = bias + sum(weights.get(w, 0.0) * c for w, c in features.items())
            hits += int((z > 0) == bool(r["label"]))
        return hits / len(rows)

    train_acc, test_acc = accuracy(sentiment["train"]), accuracy(sentiment["test"])
    print(f"bag-of-words accuracy: train {train_acc:.3f}, test {test_acc:.3f}")
    assert train_acc < 0.85
    assert test_acc < 0.85


# ---------------------------------------------------------------------------- arithmetic


def test_arithmetic_rows_are_correct(arithmetic) -> None:
    for rows in arithmetic.values():
        for row in rows:
            assert set(row) == {"prompt", "response"}
            a, op, b, eq = row["prompt"].split()
            assert eq == "="
            assert row["response"].startswith(" ")
            expected = int(a) + int(b) if op == "plus" else int(a) - int(b)
            assert op in ("plus", "minus")
            assert int(row["response"]) == expected >= 0


def test_arithmetic_splits_disjoint_and_mixed(arithmetic) -> None:
    prompts = [r["prompt"] for rows in arithmetic.values() for r in rows]
    assert len(prompts) == len(set(prompts))
    ops = Counter(r["prompt"].split()[1] for r in arithmetic["train"])
    assert ops["plus"] > 300 and ops["minus"] > 200


def test_structures_cover_all_templates() -> None:
    a, b = Clause("plot", "good"), Clause("cast", "great")
    for structure in STRUCTURES:
        second = None if structure == "single" else b
        row = sentiment_row(structure, a, second)
        assert row["label"] == 1
