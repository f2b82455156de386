"""Exact-match dev scoring settles rows with one teacher-forced pass (``forced_outputs``) and
decodes the rest: the same outputs, and so the same hits, as greedy decoding of every row.

Generation only: an encoder such as MiniLM scores classification heads, which this does not
touch (tests/test_cache.py covers that path on the real models)."""

from dataclasses import replace

import pytest
from test_cache import make_reft, setup, visible_edit
from test_real_tasks import smollm2_cache  # noqa: F401

from reftsearch.data.batches import IGNORE_INDEX, Encoded, encode
from reftsearch.engine.activation_cache import PrefixCache
from reftsearch.engine.scoring import (
    evaluate_examples,
    forced_outputs,
    generate,
    greedy_outputs,
    hopeless_for,
)
from reftsearch.metrics import exact_matches
from reftsearch.models.base import load_base_model
from reftsearch.spec.study_file import DataSpec, TaskSpec


def with_reference(example: Encoded, tokenizer, reference: str) -> Encoded:
    """``example``'s prompt with ``reference`` as its response, tokenized as ``encode`` does."""
    prompt = example.input_ids[: example.prompt_length]
    response = [*tokenizer(reference, add_special_tokens=False)["input_ids"]]
    response.append(tokenizer.eos_token_id)
    labels = [IGNORE_INDEX] * len(prompt) + response
    return Encoded(prompt + response, len(prompt), labels=labels, target=reference)


@pytest.mark.parametrize("cached", [False, True])
def test_forced_pass_settles_rows_as_greedy_decoding_ends_them(cached):
    base, data = setup("tiny:llama", "generation")
    reft = make_reft(base, layers=(1, 3), prefix=0, suffix=1)
    visible_edit(reft)
    steps = 6
    with reft.attached(base.blocks):
        own = generate(base, reft, data.dev, steps)
    # even rows: their own output (greedy decoding follows the reference to its end); odd
    # rows: a text their output cannot begin
    references = [text if i % 2 == 0 else f"never {text}" for i, text in enumerate(own)]
    dev = [with_reference(e, base.tokenizer, r) for e, r in zip(data.dev, references, strict=True)]
    frozen = PrefixCache(budget_mb=64).frozen(base, 1, "dev", [dev]) if cached else None
    hopeless = hopeless_for("exact_match", references)
    with reft.attached(base.blocks):
        decoded = generate(base, reft, dev, steps, frozen, hopeless)
        forced = forced_outputs(base, reft, dev, steps, frozen, hopeless)
        outputs = greedy_outputs(base, reft, dev, steps, frozen, hopeless)
    want = [i % 2 == 0 for i in range(len(dev))]
    assert exact_matches(decoded, references) == want
    assert exact_matches(outputs, references) == want
    settled = [i for i, text in enumerate(forced) if text is not None]
    # the byte-level tokenizer splits some outputs otherwise when they are encoded again
    # (an incomplete character decodes as U+FFFD): those rows are decoded instead
    undecided = [i for i, text in enumerate(forced) if text is None]
    assert {i % 2 for i in settled} == {0, 1} and undecided
    assert all(i % 2 == 0 for i in undecided)  # a hopeless row is always settled
    for i in settled:
        if i % 2 == 0:  # right: the whole output, as decoded
            assert forced[i] == decoded[i] == outputs[i]


def test_the_last_allowed_token_ends_a_forced_row():
    """A reference longer than ``max_new_tokens``: greedy decoding stops on the reference's
    path, and its output is that many tokens of it."""
    base, data = setup("tiny:llama", "generation")
    reft = make_reft(base, layers=(1, 3))
    with reft.attached(base.blocks):
        own = generate(base, reft, data.dev, 8)
        dev = [with_reference(e, base.tokenizer, t) for e, t in zip(data.dev, own, strict=True)]
        short = generate(base, reft, dev, 3)
        forced = forced_outputs(base, reft, dev, 3, None, lambda index, text: False)
    settled = [i for i, text in enumerate(forced) if text is not None]
    assert settled
    assert all(forced[i] == short[i] for i in settled)


def test_evaluate_scores_exact_match_through_the_forced_pass():
    base, data = setup("tiny:llama", "generation")
    reft = make_reft(base, layers=(1, 3), prefix=0, suffix=1)
    visible_edit(reft)
    with reft.attached(base.blocks):
        own = generate(base, reft, data.dev, 6)
    references = [text if i % 3 else "nothing like it" for i, text in enumerate(own)]
    dev = [with_reference(e, base.tokenizer, r) for e, r in zip(data.dev, references, strict=True)]
    split = replace(data, dev=dev, metric="exact_match", max_new_tokens=6)
    cache = PrefixCache(budget_mb=64)
    with reft.attached(base.blocks):
        scores = evaluate_examples(base, reft, split, cache=cache)
    assert scores.per_example == [i % 3 != 0 for i in range(len(dev))]
    assert scores.score == pytest.approx(8 / 12)


@pytest.mark.slow
@pytest.mark.usefixtures("smollm2_cache")
def test_smollm2_forced_scoring_equals_decoding():
    """SmolLM2 from its cached layer, its own outputs as references: every row right, most
    of them settled by the forced pass, the rest decoded."""
    base = load_base_model("embedded:smollm2", "causal_lm")
    task = TaskSpec(kind="generation", data=DataSpec(builtin="arithmetic"), max_length=96)
    prompts = [
        "Review: a gorgeous, witty film.\nSentiment:",
        "Question: what is 12 plus 30? Answer:",
        "The capital of France is",
        "Review: dull and far too long.\nSentiment:",
        "2+2=",
        "List three colours:",
    ]
    examples = encode([{"prompt": p, "response": "x"} for p in prompts], base.tokenizer, task)
    reft = make_reft(base, layers=(10, 20), prefix=0, suffix=1, rank=4)
    visible_edit(reft)
    steps = 8
    with reft.attached(base.blocks):
        own = generate(base, reft, examples, steps)
    dev = [with_reference(e, base.tokenizer, t) for e, t in zip(examples, own, strict=True)]
    frozen = PrefixCache(budget_mb=256).frozen(base, 10, "dev", [dev])
    hopeless = hopeless_for("exact_match", own)
    with reft.attached(base.blocks):
        forced = forced_outputs(base, reft, dev, steps, frozen, hopeless)
        outputs = greedy_outputs(base, reft, dev, steps, frozen, hopeless)
    assert outputs == own
    assert sum(text is not None for text in forced) >= len(dev) - 1
    assert all(text in (None, own[i]) for i, text in enumerate(forced))


def test_a_reference_cut_by_max_length_is_decoded():
    """Without its end (``task.max_length`` cut it), a reference cannot settle a row that
    follows it: such rows are decoded, and the outputs stay generation's."""
    base, data = setup("tiny:llama", "generation")
    reft = make_reft(base, layers=(1, 3))
    with reft.attached(base.blocks):
        own = generate(base, reft, data.dev, 8)
    full = [with_reference(e, base.tokenizer, t) for e, t in zip(data.dev, own, strict=True)]
    # each reference cut to its first two tokens: no end of sequence left
    cut = [
        replace(
            e, input_ids=e.input_ids[: e.prompt_length + 2], labels=e.labels[: e.prompt_length + 2]
        )
        for e in full
    ]
    hopeless = hopeless_for("exact_match", own)
    with reft.attached(base.blocks):
        forced = forced_outputs(base, reft, cut, 8, None, hopeless)
        outputs = greedy_outputs(base, reft, cut, 8, None, hopeless)
    assert forced == [None] * len(cut)
    assert outputs == own
