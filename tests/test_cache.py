"""The frozen-prefix cache: replayed forwards equal full ones, and it stays within budget."""

import math
import re
import socket
import subprocess
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import replace

import psutil
import pytest
import torch
from conftest import DEVICES, tiny_study

from reftsearch.data.batches import (
    SplitData,
    batches,
    collate_rows,
    encode,
    pass_tokens,
    sorted_batch_rows,
)
from reftsearch.engine import activation_cache as cache_module
from reftsearch.engine import frozen_store as frozen_store_module
from reftsearch.engine import scoring as scoring_module
from reftsearch.engine.activation_cache import PrefixCache, compute_states
from reftsearch.engine.frozen_store import FrozenStore
from reftsearch.engine.losses import span_losses
from reftsearch.engine.scoring import evaluate, evaluate_examples, generate
from reftsearch.engine.train import TrainConfig, train_trial
from reftsearch.methods.reft.config import ReftConfig
from reftsearch.methods.reft.module import ReftModule
from reftsearch.models.base import load_base_model
from reftsearch.search.study import prepare
from reftsearch.spec.study_file import DataSpec, TaskSpec, parse_spec

WORDS = ["the", "film", "was", "not", "good", "but", "actors", "were", "hardly", "bad", "at"]


def rows(n, generation=False, seed=0):
    rng = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 2 + int(torch.randint(0, 9, (1,), generator=rng))
        text = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(length))
        if generation:
            out.append({"prompt": text, "response": WORDS[i % len(WORDS)]})
        else:
            out.append({"text": text, "label": i % 2})
    return out


def setup(model, kind="classification", device="cpu", dtype="float32"):
    head = "classification" if kind == "classification" else "causal_lm"
    base = load_base_model(model, head, device=device, dtype=dtype)
    task = TaskSpec(kind=kind, data=DataSpec(), text="text", max_length=96)
    generation = kind == "generation"
    metric = "loss" if generation else "accuracy"
    train = encode(rows(24, generation), base.tokenizer, task)
    dev = encode(rows(12, generation, seed=1), base.tokenizer, task)
    return base, SplitData(train, dev, kind, metric)


def make_reft(base, layers=(2, 3), seed=0, **changes):
    options = {"prefix": 1, "suffix": 2, "tied": False, "rank": 2, **changes}
    torch.manual_seed(seed)
    config = ReftConfig("loreft", layers, **options)
    return ReftModule(config, base.hidden_size).to(base.device)


def visible_edit(reft) -> None:
    """A trained-looking edit of ``reft``'s weights, not the near-identity init."""
    with torch.no_grad():
        for param in reft.parameters():
            param.add_(0.5 * torch.randn_like(param))


def forward(base, reft, batch, states=None):
    """Loss, per-row outputs at real tokens (logits or last hidden states), intervention grads."""
    batch = batch.to(base.device)
    reft.zero_grad()
    reft.set_locations(batch.prompt_lengths, batch.offsets)
    replay = states.replaying(base.blocks, batch) if states else nullcontext()
    with reft.attached(base.blocks), replay:
        loss = span_losses(base, batch, [slice(None)])[0]
        reft.set_locations(batch.prompt_lengths, batch.offsets)
        out = base.model.base_model(**batch.model_inputs()).last_hidden_state
    loss.backward()
    real = out[batch.attention_mask.bool()]
    grads = {name: p.grad.clone() for name, p in reft.named_parameters()}
    return loss.detach(), real.detach(), grads


# BERT pools its first token, so only decoders are ever run left-padded
@pytest.mark.parametrize(
    ("model", "kind", "left_pad"),
    [
        ("tiny:llama", "classification", False),
        ("tiny:llama", "classification", True),
        ("tiny:llama", "generation", False),
        ("tiny:llama", "generation", True),
        ("tiny:bert", "classification", False),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_replayed_forward_equals_full_forward(model, kind, left_pad, device):
    base, data = setup(model, kind, device)
    reft = make_reft(base)
    states = compute_states(base, 2, data.train)
    batch = collate_rows(
        data.train, [5, 0, 17, 3, 9], base.tokenizer.pad_token_id, left_pad=left_pad
    )
    assert batch.offsets.any() == left_pad and batch.attention_mask.sum(-1).unique().numel() > 1
    full = forward(base, reft, batch)
    cached = forward(base, reft, batch, states)
    torch.testing.assert_close(cached[0], full[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached[1], full[1], rtol=1e-5, atol=1e-5)
    # the lowest intervened layer (the first one replayed) gets its gradients through
    assert all(g.any() for name, g in full[2].items() if name.startswith("interventions.2/"))
    for name, want in full[2].items():
        torch.testing.assert_close(cached[2][name], want, rtol=1e-4, atol=1e-6)
    # the model runs normally again afterwards: no block left patched
    assert all("forward" not in block.__dict__ for block in base.blocks)


def test_left_padded_rows_equal_unpadded_rows():
    """A left-padded row gets the states it has alone (positions count from its first token)."""
    base, data = setup("tiny:llama")
    alone = base.model.base_model(**collate_rows(data.train, [0], 0).model_inputs())
    batch = collate_rows(data.train, [0, 1, 2], base.tokenizer.pad_token_id, left_pad=True)
    padded = base.model.base_model(**batch.model_inputs()).last_hidden_state
    row = padded[0][batch.attention_mask[0].bool()]
    torch.testing.assert_close(row, alone.last_hidden_state[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("model", "kind", "prefix", "dtype"),
    [
        ("tiny:llama", "classification", 1, "float32"),
        # suffix only: rows start after unedited tokens
        ("tiny:llama", "classification", 0, "float32"),
        ("tiny:llama", "generation", 0, "float32"),
        # an encoder: nothing above layer 1 is frozen
        ("tiny:bert", "classification", 0, "float32"),
        # 16-bit keys and values cached beside float32 states
        ("tiny:llama", "generation", 0, "bfloat16-mixed"),
        ("tiny:llama", "generation", 1, "bfloat16-mixed"),
        ("tiny:bert", "classification", 0, "bfloat16-mixed"),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_dev_score_and_training_equal_with_and_without_cache(model, kind, prefix, dtype, device):
    base, data = setup(model, kind, device, dtype)
    config = TrainConfig(lr=5e-3, epochs=2, batch_size=8, seed=4)
    results = []
    for cache in (None, PrefixCache(budget_mb=64)):
        reft = make_reft(base, layers=(1, 3), prefix=prefix)
        curve: list[float] = []
        score = train_trial(
            base, reft, data, config, lambda e, d, c=curve: c.append(d.score), cache
        ).score
        with reft.attached(base.blocks):
            results.append((score, curve, evaluate(base, reft, data, cache=cache), reft))
        if cache is not None:
            assert {key[-2] for key in cache._entries} == {"train", "dev"}  # both were replayed
            kinds = {key[0] for key in cache._entries}
            assert kinds == ({"states", "keys_values"} if base.is_decoder else {"states"})
    (score, curve, dev, reft), (c_score, c_curve, c_dev, c_reft) = results
    got, want = (flat_parameters(r) for r in (c_reft, reft))
    if dtype != "float32":
        untrained = make_reft(base, layers=(1, 3), prefix=prefix)
        with untrained.attached(base.blocks):
            before = evaluate(base, untrained, data)
        scores = ([c_score, *c_curve, c_dev], [score, *curve, dev], before)
        assert_trained_alike_in_16_bits(got, want, scores, base, config, len(data.train))
        return
    # close, not equal: replayed rows are shorter (from their first edited token), and matmul
    # kernels (MKL's on AVX-512, a GPU's) pick their blocking by shape. float32 rounds to
    # 2**-24: the parameters came 50x inside these bounds over four seeds, on CPU
    rel = 1e-6 if device == "cpu" else 1e-4
    assert c_score == pytest.approx(score, rel=rel)
    assert c_curve == pytest.approx(curve, rel=rel)
    assert c_dev == pytest.approx(dev, rel=rel)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def assert_trained_alike_in_16_bits(got, want, scores, base, config, n_train) -> None:
    """Two trainings of the same config in 16 bits (``got``, ``want``: their parameters;
    ``scores``: their dev scores and the untrained one) that differ only in how their matmul
    outputs round: bounds from the unit roundoff ``u`` (2**-8 for bfloat16), whatever CPU.

    Where two paths' kernels differ (replayed rows are shorter, the frozen pass runs larger
    batches, and oneDNN blocks AMX, AVX512-BF16 and emulated kernels by shape), a value may
    round to either neighbour: the gradients agree to a few u. Adam moves each parameter at
    most ``lr`` per step (its first step is ``lr * sign(g)``), so a parameter whose gradient
    keeps its sign ends within 4u of ``lr`` per step of the other run's; one whose gradient
    lies within rounding of zero at some step (a share of about u of them per step) may step
    the other way, up to ``2 * lr`` apart. The dev score moves through the parameters that
    matter, not through those near-zero ones: it agrees to 16u of how far training moved it
    (an accuracy: exactly, its logit margins being far wider than rounding). Measured over six
    seeds on an AVX512-BF16 CPU, and with every matmul output rounded at random either way:
    at most 4 parameters past the 4u bound (12 of 516, 24 of 1032 allowed), scores within 4u;
    a frozen state or key read one token off, or the layer below replayed, put 6-61% of the
    parameters past it.
    """
    got_scores, want_scores, before = scores
    u = torch.finfo(base.precision.matmul).eps / 2
    steps = config.epochs * len(range(0, n_train, config.batch_size))
    moved = abs(want_scores[-1] - before)
    for got_score, want_score in zip(got_scores, want_scores, strict=True):
        assert abs(got_score - want_score) <= 16 * u * moved, (got_scores, want_scores, before)
    apart = (got - want).abs() > 4 * u * config.lr * steps
    assert apart.sum() <= steps * u * len(got), f"{int(apart.sum())} of {len(got)} parameters"


def flat_parameters(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


@pytest.mark.parametrize("kind", ["classification", "generation"])
@pytest.mark.parametrize("device", DEVICES)
def test_rows_started_after_unedited_tokens_equal_full_rows(kind, device):
    """Suffix-only interventions in a decoder: each row runs from its first edited token,
    attending to the frozen keys and values of the tokens before it; loss and gradients
    equal the full forward's."""
    base, data = setup("tiny:llama", kind, device)
    reft = make_reft(base, prefix=0, suffix=2)
    cache = PrefixCache(budget_mb=64)
    frozen = cache.frozen(base, 2, "train", [data.train])
    rows = [5, 0, 17, 3, 9]
    examples = [data.train[i] for i in rows]
    starts = frozen.starts([(examples, 0, 2)])
    assert min(starts) > 0 and len(set(starts)) > 1
    pad = base.tokenizer.pad_token_id
    trimmed = collate_rows(data.train, rows, pad, starts=starts).to(base.device)
    frozen.add_past(trimmed, [slice(None)], starts)
    full = collate_rows(data.train, rows, pad).to(base.device)
    assert trimmed.input_ids.shape[1] < full.input_ids.shape[1]

    def loss_and_grads(batch, replayed):
        reft.zero_grad()
        reft.set_locations(batch.prompt_lengths, batch.offsets)
        with reft.attached(base.blocks), replayed:
            loss = span_losses(base, batch, [slice(None)])[0]
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in reft.named_parameters()}

    want_loss, want_grads = loss_and_grads(full, nullcontext())
    got_loss, got_grads = loss_and_grads(
        trimmed, frozen.replaying(base.blocks, trimmed, [slice(None)])
    )
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    assert all(g.any() for g in want_grads.values())
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("prefix", [0, 1])
@pytest.mark.parametrize("device", DEVICES)
def test_generation_from_the_cache_equals_full_generation(prefix, device):
    base, data = setup("tiny:llama", "generation", device)
    reft = make_reft(base, layers=(1, 3), prefix=prefix, suffix=2)
    visible_edit(reft)  # so that the interventions matter
    frozen = PrefixCache(budget_mb=64).frozen(base, 1, "dev", [data.dev])
    with reft.attached(base.blocks):
        want = generate(base, reft, data.dev, max_new_tokens=5)
        got = generate(base, reft, data.dev, max_new_tokens=5, frozen=frozen)
    plain = generate(base, reft, data.dev, max_new_tokens=5)  # detached: the frozen model
    assert got == want
    assert want != plain  # the interventions change what is generated


def test_exact_match_decoding_gives_up_on_hopeless_rows_with_the_same_scores():
    base, data = setup("tiny:llama", "generation")
    reft = make_reft(base, layers=(1, 3))
    with reft.attached(base.blocks):
        full = generate(base, reft, data.dev, max_new_tokens=6)
        first_tokens = generate(base, reft, data.dev, max_new_tokens=1)
        # rows all hopeless at once: every batch stops after its first token
        hopeless = generate(base, reft, data.dev, 6, hopeless=lambda index, text: True)
        # half the references are the whole output (right), half cannot be reached
        dev = [
            replace(e, target=text if i % 2 == 0 else f"never {text}")
            for i, (e, text) in enumerate(zip(data.dev, full, strict=True))
        ]
        split = replace(data, dev=dev, metric="exact_match", max_new_tokens=6)
        scores = evaluate_examples(base, reft, split)
    assert hopeless == first_tokens != full
    assert scores.per_example == [i % 2 == 0 for i in range(len(dev))]
    assert scores.score == 0.5


def test_a_higher_layer_starts_from_the_cached_lower_one():
    base, data = setup("tiny:llama")
    cache = PrefixCache(budget_mb=64)
    cache.states(base, 1, "train", data.train)
    calls = []
    # a skipped block's own hooks still fire; its attention does not run
    handle = base.blocks[0].self_attn.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        derived = cache.states(base, 3, "train", data.train)
    finally:
        handle.remove()
    assert calls == []  # blocks 0 and 1 were replayed, not run
    fresh = compute_states(base, 3, data.train)
    torch.testing.assert_close(derived.flat, fresh.flat, rtol=1e-5, atol=1e-5)


def test_one_pass_keeps_every_expected_layer_it_computes():
    base, data = setup("tiny:llama")
    fresh = {layer: compute_states(base, layer, data.train) for layer in (1, 3)}
    cache = PrefixCache(budget_mb=64, expected_layers=[1, 3, 0])
    one_pass = len(batches(data.train, base.tokenizer.pad_token_id, pass_tokens(base.device)))
    passes = []
    handle = base.blocks[0].register_forward_pre_hook(lambda *args: passes.append(1))
    try:
        frozen = cache.frozen(base, 1, "train", [data.train])  # keys and values: every block
        assert len(passes) == one_pass
        higher = cache.states(base, 3, "train", data.train)  # kept by that pass, not rerun
        assert len(passes) == one_pass
    finally:
        handle.remove()
    torch.testing.assert_close(frozen.states[0].flat, fresh[1].flat)
    torch.testing.assert_close(higher.flat, fresh[3].flat)
    assert sorted(key[1] for key in cache._entries if key[0] == "states") == [0, 1, 3]


def test_each_pass_is_reported_as_it_starts_and_ends():
    base, data = setup("tiny:llama")
    lines = []
    cache = PrefixCache(budget_mb=64, expected_layers=[3])
    cache.log = lines.append
    cache.frozen(base, 1, "train", [data.train])
    blocks = f"blocks 0-{base.num_layers - 1}"
    what = f"frozen pass over 24 train examples ({blocks}: layers 1, 3 and keys/values)"
    assert lines[0] == f"{what}..."
    assert re.fullmatch(re.escape(what) + r": [0-9.]+s, [0-9]+ MB kept", lines[1])
    cache.frozen(base, 1, "train", [data.train])
    cache.states(base, 3, "train", data.train)
    assert len(lines) == 2  # both served by that pass: nothing more to say
    cache.states(base, 2, "dev", data.dev)
    assert lines[2] == "frozen pass over 12 dev examples (blocks 0-2: layer 2)..."
    lower = PrefixCache(budget_mb=64, expected_layers=[1])  # kept beside the wanted 3
    lower.log = lines.append
    lower.frozen(base, 3, "dev", [data.dev])
    assert (
        lines[4] == f"frozen pass over 12 dev examples ({blocks}: layers 1, 3 and keys/values)..."
    )


def test_a_long_pass_says_how_far_it_has_come(monkeypatch):
    base, data = setup("tiny:llama")
    monkeypatch.setattr(cache_module, "pass_tokens", lambda device: 48)  # many small batches
    lines = []
    cache = PrefixCache(budget_mb=64)
    cache.log, cache.progress_every_s = lines.append, 0.0  # every batch but the last
    cache.states(base, 2, "train", data.train)
    what = "frozen pass over 24 train examples (blocks 0-2: layer 2)"
    assert lines[0] == f"{what}..." and lines[-1].startswith(f"{what}: ")
    progress = re.escape(what) + r": ([0-9]+)% after [0-9.]+s, ~[0-9.]+s left"
    percents = [int(re.fullmatch(progress, line).group(1)) for line in lines[1:-1]]
    assert len(percents) >= 2 and percents == sorted(percents)
    assert percents[0] > 0 and percents[-1] < 100


def test_expected_layers_only_take_free_room():
    base, data = setup("tiny:llama")
    one = compute_states(base, 0, data.train).nbytes
    cache = PrefixCache(budget_mb=1.5 * one / 2**20, expected_layers=[0, 1, 2])
    cache.states(base, 2, "train", data.train)  # stops at block 2: 0 and 1 computed on the way
    assert [key[1] for key in cache._entries] == [2]  # no room for a second layer
    roomy = PrefixCache(budget_mb=64, expected_layers=[0, 1, 3])
    roomy.states(base, 2, "train", data.train)
    assert sorted(key[1] for key in roomy._entries) == [0, 1, 2]  # 3 is above the stop
    # beside keys and values: room for the layer and them, half a layer more
    keys_values = PrefixCache(64).frozen(base, 2, "train", [data.train]).keys_values[0].nbytes
    budget = one + keys_values + 0.5 * one
    tight = PrefixCache(budget_mb=budget / 2**20, expected_layers=[0, 1, 3])
    assert tight.frozen(base, 2, "train", [data.train]).keys_values is not None
    assert sorted(key[:2] for key in tight._entries) == [("keys_values", "train"), ("states", 2)]
    assert tight.used_bytes <= tight.budget_bytes


def test_cache_keeps_within_budget_least_recently_used_out():
    base, data = setup("tiny:llama")
    one = compute_states(base, 0, data.train).nbytes
    cache = PrefixCache(budget_mb=2.5 * one / 2**20)
    first = cache.states(base, 0, "train", data.train)
    assert cache.states(base, 0, "train", data.train) is first  # reused, not recomputed
    cache.states(base, 1, "train", data.train)
    cache.states(base, 0, "train", data.train)  # touch: layer 1 is now the oldest
    cache.states(base, 2, "train", data.train)
    assert sorted(key[1] for key in cache._entries) == [0, 2]
    assert cache.used_bytes <= cache.budget_bytes
    # a re-tokenized split is a different split: recomputed, not served stale
    again = list(data.train)
    assert cache.states(base, 0, "train", again).examples is again
    # over budget on its own: not cached, the caller runs the full model
    assert PrefixCache(budget_mb=0.5 * one / 2**20).states(base, 0, "train", data.train) is None


@pytest.mark.parametrize("kind", ["classification", "generation"])
def test_a_spilled_cache_trains_and_scores_as_one_in_memory(kind, tmp_path):
    """What does not fit the memory budget goes to memory-mapped files: the same scores and
    weights as a cache in memory, and no file left behind (they are unlinked at once)."""
    base, data = setup("tiny:llama", kind)
    config = TrainConfig(lr=5e-3, epochs=2, batch_size=8, seed=4)
    spill = tmp_path / "spill"
    results = []
    for cache in (PrefixCache(64), PrefixCache(0, spill_mb=64, spill_dir=spill)):
        reft = make_reft(base, layers=(1, 3), prefix=0)
        score = train_trial(base, reft, data, config, cache=cache).score
        with reft.attached(base.blocks):
            results.append((score, evaluate(base, reft, data, cache=cache), reft))
    assert {key[0] for key in cache._entries} == {"states", "keys_values"}
    assert cache.used_bytes == 0 and cache.spilled_bytes > 0
    assert spill.is_dir() and not list(spill.iterdir())
    (score, dev, reft), (s_score, s_dev, s_reft) = results
    assert s_score == score and s_dev == dev
    for got, want in zip(s_reft.parameters(), reft.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_keys_values_spill_beside_states_in_memory_and_over_both_budgets_nothing(tmp_path):
    base, data = setup("tiny:llama", "generation")
    one = compute_states(base, 1, data.train).nbytes
    cache = PrefixCache(1.5 * one / 2**20, spill_mb=64, spill_dir=tmp_path)
    frozen = cache.frozen(base, 1, "train", [data.train])
    assert frozen.keys_values is not None
    assert cache.used_bytes == one and cache.spilled_bytes == frozen.keys_values[0].nbytes
    tight = PrefixCache(0.5 * one / 2**20, spill_mb=0.5 * one / 2**20, spill_dir=tmp_path)
    assert tight.frozen(base, 1, "train", [data.train]) is None


def test_an_unwritable_spill_folder_leaves_the_cache_in_memory_alone(tmp_path):
    base, data = setup("tiny:llama", "generation")
    blocked = tmp_path / "file"
    blocked.write_text("a file where the spill folder should be")
    cache = PrefixCache(0, spill_mb=64, spill_dir=blocked / "spill")  # everything spills
    with pytest.warns(UserWarning, match="cache spill disabled"):
        assert cache.frozen(base, 1, "train", [data.train]) is None
    assert cache.spill is None and not cache._entries


def test_eval_batches_come_back_in_example_order():
    base, data = setup("tiny:llama")
    bucketed = batches(data.dev, base.tokenizer.pad_token_id, max_tokens=64)
    order = [i for b in bucketed for i in b.rows.tolist()]
    assert sorted(order) == list(range(len(data.dev))) and order != sorted(order)
    lengths = [len(data.dev[i].input_ids) for i in order]
    assert lengths == sorted(lengths)
    assert all(b.input_ids.numel() <= 64 for b in bucketed if len(b.input_ids) > 1)


def test_sorted_batches_respect_the_token_and_row_budgets():
    lengths = [5, 30, 7, 6, 100, 8, 7, 29]
    chunks = sorted_batch_rows(lengths, max_tokens=32)
    assert sorted(i for chunk in chunks for i in chunk) == list(range(len(lengths)))
    assert [lengths[i] for chunk in chunks for i in chunk] == sorted(lengths)
    # rows x the longest row of a batch within budget; the 100-token row goes alone
    assert chunks == [[0, 3, 2, 6], [5], [7], [1], [4]]
    assert list(map(len, sorted_batch_rows(lengths, max_tokens=None, max_rows=3))) == [3, 3, 2]


@pytest.mark.parametrize(
    ("dtype", "states_dtype"), [("bfloat16", torch.bfloat16), ("bfloat16-mixed", torch.float32)]
)
def test_16_bit_base_with_float32_interventions_replays_too(dtype, states_dtype):
    base = load_base_model("tiny:llama", "causal_lm", dtype=dtype)
    task = TaskSpec(kind="generation", data=DataSpec(), max_length=96)
    examples = encode(rows(8, generation=True), base.tokenizer, task)
    reft = make_reft(base)
    states = compute_states(base, 2, examples)
    assert states.flat.dtype == states_dtype
    batch = collate_rows(examples, list(range(8)), base.tokenizer.pad_token_id)
    full, cached = forward(base, reft, batch), forward(base, reft, batch, states)
    assert all(p.dtype == torch.float32 for p in reft.parameters())
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in cached[2].values())
    torch.testing.assert_close(cached[0], full[0])
    for name, want in full[2].items():
        torch.testing.assert_close(cached[2][name], want)


# ------------------------------------------------------------------------ the frozen store


def count_passes(monkeypatch) -> list[int]:
    """The number of examples of each frozen pass computed from now on."""
    passes, real = [], cache_module.compute_frozen

    def counted(base, examples, *args, **kwargs):
        passes.append(len(examples))
        return real(base, examples, *args, **kwargs)

    monkeypatch.setattr(cache_module, "compute_frozen", counted)
    return passes


def trained(base, data, cache, layers=(1, 3), epochs=2):
    """A short trial's score, dev scores and weights, trained through ``cache``."""
    config = TrainConfig(lr=5e-3, epochs=epochs, batch_size=8, seed=4)
    reft = make_reft(base, layers=layers, prefix=0)
    score = train_trial(base, reft, data, config, cache=cache).score
    with reft.attached(base.blocks):
        dev = evaluate(base, reft, data, cache=cache)
    return score, dev, flat_parameters(reft)


def assert_same_trial(got, want) -> None:
    assert got[0] == want[0] and got[1] == want[1]
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["classification", "generation"])
@pytest.mark.parametrize("device", DEVICES)
def test_a_stored_pass_is_read_by_the_next_cache_with_the_same_results(
    kind, device, tmp_path, monkeypatch
):
    """A second process (here: a second cache) reads what the first computed, for the very
    same split re-tokenized too, and trains and scores to the bit as without a store (on a
    GPU: copied to the store after the pass, and to the GPU when read)."""
    base, data = setup("tiny:llama", kind, device)
    without = trained(base, data, PrefixCache(64))
    passes = count_passes(monkeypatch)
    first = trained(base, data, PrefixCache(64, store=FrozenStore(tmp_path, 64)))
    assert passes == [24, 12]  # train and dev, each one full pass (keys and values)
    lines = []
    second = PrefixCache(64, store=FrozenStore(tmp_path, 64))
    second.log = lines.append
    again = replace(data, train=list(data.train), dev=list(data.dev))
    reread = trained(base, again, second)
    assert passes == [24, 12]  # nothing computed again
    assert lines == [
        f"frozen layer 1 and keys/values of 24 train examples read from {tmp_path}",
        f"frozen layer 1 and keys/values of 12 dev examples read from {tmp_path}",
    ]
    assert_same_trial(first, without)
    assert_same_trial(reread, without)
    # another split (a subset) or another precision is another entry
    second.states(base, 1, "train", data.train[:10])
    assert passes == [24, 12, 10]
    half, _ = setup("tiny:llama", kind, device, "bfloat16-mixed")
    PrefixCache(64, store=FrozenStore(tmp_path, 64)).states(half, 1, "train", data.train)
    assert passes == [24, 12, 10, 24]


def test_a_damaged_or_truncated_entry_is_computed_again_not_trusted(tmp_path, monkeypatch):
    base, data = setup("tiny:llama")
    want = compute_states(base, 2, data.train).flat
    PrefixCache(64, store=FrozenStore(tmp_path, 64)).states(base, 2, "train", data.train)
    (entry,) = tmp_path.glob("*.frozen")
    whole = entry.read_bytes()
    passes = count_passes(monkeypatch)
    damaged = bytearray(whole)
    damaged[100] ^= 0x40  # one bit of one state
    for broken in (whole[:-10], whole[: len(whole) // 2], bytes(damaged)):
        entry.write_bytes(broken)
        cache = PrefixCache(64, store=FrozenStore(tmp_path, 64))
        with pytest.warns(UserWarning, match="is damaged .*: computed again"):
            got = cache.states(base, 2, "train", data.train)
        torch.testing.assert_close(got.flat, want, rtol=0, atol=0)
        assert entry.read_bytes() == whole  # written again, whole
    assert passes == [24, 24, 24]


def test_the_store_keeps_within_its_budget_and_removes_only_its_own_files(tmp_path):
    base, data = setup("tiny:llama")
    one = compute_states(base, 0, data.train).nbytes
    store = FrozenStore(tmp_path, 2.5 * one / 2**20)
    theirs = [tmp_path / "notes.txt", tmp_path / f"{'0' * 64}.frozen.bak"]
    for path in theirs:
        path.write_text("not the store's")
    exited = subprocess.Popen(["true"])  # noqa: S607
    exited.wait()  # its pid is free now: a writer that was killed
    zombie = subprocess.Popen(["true"])  # noqa: S607
    while psutil.Process(zombie.pid).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.01)  # ended, not yet reaped: a writer whose parent has not noticed
    stale = [
        tmp_path / f"{'1' * 64}.{socket.gethostname()}.{writer.pid}.tmp"
        for writer in (exited, zombie)
    ]
    for path in stale:
        path.write_bytes(b"left by a killed writer")
    cache = PrefixCache(64, store=store)
    for layer in (0, 1, 0, 2):  # layer 0 used again: 1 is the least recently used
        cache.states(base, layer, "train", data.train)
        if layer == 0:
            time.sleep(0.01)  # distinct modification times
            PrefixCache(64, store=store).states(base, 0, "train", data.train)
    kept = sorted(tmp_path.glob("*.frozen"))
    assert len(kept) == 2 and sum(p.stat().st_size for p in kept) <= store.budget_bytes
    layer_key = PrefixCache(64, store=store)._store_key
    assert kept == sorted(store.path(layer_key(base, data.train, layer)) for layer in (0, 2))
    assert all(path.exists() for path in theirs)
    assert not any(path.exists() for path in stale)
    zombie.wait()


def test_a_process_waits_for_anothers_pass_and_reads_it(tmp_path, monkeypatch):
    """Two workers that want the same split at once: one computes, the other waits for the
    store's lock and then reads its files (threads here: the lock is per open file)."""
    base, data = setup("tiny:llama", "generation")
    first = PrefixCache(64, store=FrozenStore(tmp_path, 64))
    second = PrefixCache(64, store=FrozenStore(tmp_path, 64))
    lines, results = [], []
    second.log = lines.append
    waiter = threading.Thread(
        target=lambda: results.append(second.frozen(base, 1, "train", [data.train]))
    )
    passes, real = [], cache_module.compute_frozen

    def first_pass(*args, **kwargs):
        passes.append(1)
        waiter.start()
        deadline = time.monotonic() + 30
        while not lines and time.monotonic() < deadline:
            time.sleep(0.01)
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_module, "compute_frozen", first_pass)
    computed = first.frozen(base, 1, "train", [data.train])
    waiter.join()
    assert passes == [1]
    assert lines == [
        f"waiting for another process's frozen pass over 24 train examples (in {tmp_path})",
        f"frozen layer 1 and keys/values of 24 train examples read from {tmp_path}",
    ]
    (read,) = results
    torch.testing.assert_close(read.states[0].flat, computed.states[0].flat, rtol=0, atol=0)
    torch.testing.assert_close(
        read.keys_values[0].both, computed.keys_values[0].both, rtol=0, atol=0
    )


def test_an_unwritable_store_leaves_the_cache_as_without_one(tmp_path):
    base, data = setup("tiny:llama", "generation")
    blocked = tmp_path / "file"
    blocked.write_text("a file where the store's folder should be")
    cache = PrefixCache(64, store=FrozenStore(blocked / "frozen", 64))
    with pytest.warns(UserWarning, match="frozen store disabled"):
        frozen = cache.frozen(base, 1, "train", [data.train])
    assert frozen is not None and cache.store is None
    # a run's cache says it in its output: a warning printed its source line, as a crash does
    lines = []
    logged = PrefixCache(64, store=FrozenStore(blocked / "frozen", 64))
    logged.log = lines.append  # as a worker sets its own
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert logged.frozen(base, 1, "train", [data.train]) is not None
    assert any(line.startswith("frozen store disabled (") for line in lines), lines


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "kind"), [("embedded:minilm", "classification"), ("embedded:smollm2", "generation")]
)
def test_real_models_read_their_stored_passes_with_the_same_results(
    model, kind, tmp_path, monkeypatch
):
    base, data = setup(model, kind)
    passes = count_passes(monkeypatch)
    first = trained(base, data, PrefixCache(2048, store=FrozenStore(tmp_path, 2048)), (2, 4), 1)
    assert passes == [24, 12]
    second = trained(base, data, PrefixCache(2048, store=FrozenStore(tmp_path, 2048)), (2, 4), 1)
    assert passes == [24, 12]  # the second cache (a rerun, another worker) computed nothing
    assert_same_trial(second, first)


def test_the_study_file_places_or_disables_the_store(easy_task_files, tmp_path, frozen_store):
    def store_of(resources):
        raw = tiny_study(easy_task_files, resources=resources)
        return prepare(parse_spec(raw, base_dir=tmp_path)).cache.store

    default = store_of({})  # tests set $REFTSEARCH_FROZEN_STORE (conftest)
    assert default.folder == frozen_store and default.budget_bytes == 10240 * 2**20
    placed = store_of({"store_dir": "frozen-here", "store_mb": 512})
    assert placed.folder == tmp_path / "frozen-here" and placed.budget_bytes == 512 * 2**20
    assert store_of({"store_mb": 0}) is None


def test_a_trained_head_is_not_part_of_the_model_that_keys_the_store(tmp_path, monkeypatch):
    """BERT's pooler sits in the model body but trains with the head: a worker whose head
    was reset or trained still reads what another stored."""
    base, data = setup("tiny:bert")
    assert base.model.base_model.pooler is not None
    PrefixCache(64, store=FrozenStore(tmp_path, 64)).states(base, 1, "train", data.train)
    base.reset_head(seed=5)  # another pooler, as after a trial
    frozen_store_module._model_keys.clear()  # hashed again, as in another process
    passes = count_passes(monkeypatch)
    PrefixCache(64, store=FrozenStore(tmp_path, 64)).states(base, 1, "train", data.train)
    assert passes == []


def test_dev_loss_does_not_depend_on_how_rows_are_batched(monkeypatch):
    """``metric: loss`` is the mean over response tokens, whatever the batches (512 tokens
    on a CPU, 16,384 on a GPU); a batch of prompts that fill ``max_length`` adds nothing."""
    base, data = setup("tiny:llama", "generation")
    assert len({len(e.labels) - e.prompt_length for e in data.dev}) > 1  # answers differ
    reft = make_reft(base, layers=(1, 3))
    overlong = replace(data.dev[0], input_ids=data.dev[0].input_ids[:5], labels=None)
    overlong = replace(overlong, prompt_length=5, labels=[-100] * 5)
    split = replace(data, dev=[*data.dev, overlong, overlong])
    scores = []
    for tokens in (16, 96, 100_000):
        monkeypatch.setattr(scoring_module, "pass_tokens", lambda device, n=tokens: n)
        with reft.attached(base.blocks):
            scores.append(evaluate(base, reft, split))
    assert scores[0] == pytest.approx(scores[1], rel=1e-6) == pytest.approx(scores[2], rel=1e-6)
    assert not math.isnan(scores[0])
