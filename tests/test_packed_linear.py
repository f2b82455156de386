"""Frozen linear layers packed once for oneDNN: torch's results, from the weight they hold."""

import copy
from contextlib import nullcontext

import pytest
import torch
from test_cache import make_reft, setup
from test_real_tasks import smollm2_cache  # noqa: F401
from torch import nn

from reftsearch.engine import frozen_store
from reftsearch.engine.train import TrainConfig, train_trial
from reftsearch.models import packed_linear
from reftsearch.models.base import load_base_model
from reftsearch.models.packed_linear import (
    PACKED_LINEARS_ENV,
    PackedLinear,
    pack_linears,
    torch_linears,
)

# float32: oneDNN sums in another order than MKL; bfloat16: one rounding of the output
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def packing_on(monkeypatch):
    """As by default, whatever the environment running the tests says."""
    monkeypatch.delenv(PACKED_LINEARS_ENV, raising=False)


def packed_twin(layer: nn.Linear) -> nn.Linear:
    twin = copy.deepcopy(layer)
    assert pack_linears([twin]) == 1
    return twin


def forward_and_input_grad(layer: nn.Linear, x: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y, x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_linear_gives_torchs_output_and_input_gradient(dtype):
    torch.manual_seed(0)
    layer = nn.Linear(64, 48).to(dtype).requires_grad_(False)
    x = torch.randn(3, 5, 64, dtype=dtype)  # batch x tokens x features, as blocks call it
    twin = packed_twin(layer)
    y, grad = forward_and_input_grad(twin, x)
    expected_y, expected_grad = forward_and_input_grad(layer, x)
    tol = TOLERANCE[dtype]
    assert type(twin) is PackedLinear and packed_linear._PACKED[twin].transposed is not None
    torch.testing.assert_close(y, expected_y, atol=tol, rtol=tol)
    torch.testing.assert_close(grad, expected_grad, atol=tol, rtol=tol)


def test_the_packed_copy_follows_its_weight():
    torch.manual_seed(0)
    layer = packed_twin(nn.Linear(32, 16).requires_grad_(False))
    x = torch.randn(4, 32)
    layer(x)
    first = packed_linear._PACKED[layer]

    with torch.no_grad():  # changed in place: packed again
        layer.weight.mul_(-2)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)
    assert packed_linear._PACKED[layer] is not first

    # swapped for a trainable copy, as full fine-tuning attaches one: torch's linear, which
    # gives the copy its gradient
    trained = nn.Parameter(torch.randn(16, 32))
    layer._parameters["weight"] = trained
    layer(x).sum().backward()
    assert trained.grad is not None
    torch.testing.assert_close(trained.grad, x.sum(0).expand(16, 32))


def test_the_loader_packs_the_frozen_linears_but_not_the_trained_head(monkeypatch):
    base = load_base_model("tiny:bert", "classification")
    head = {id(m) for m in base.head.modules()}
    linears = [m for m in base.model.modules() if isinstance(m, nn.Linear)]
    assert {type(m) for m in linears if id(m) in head} == {nn.Linear}
    assert {type(m) for m in linears if id(m) not in head} == {PackedLinear}

    monkeypatch.setenv(PACKED_LINEARS_ENV, "0")
    plain = load_base_model("tiny:bert", "classification")
    assert {type(m) for m in plain.model.modules() if isinstance(m, nn.Linear)} == {nn.Linear}
    # the packed copies are no state: the same keys, and a model that deep-copies after use
    ids = base.tokenizer("a short text", return_tensors="pt")
    base.model(**ids)
    assert base.model.state_dict().keys() == plain.model.state_dict().keys()
    copy.deepcopy(base.model)(**ids)


def test_a_layer_runs_torchs_linear_where_a_packed_copy_would_leave_too_little_memory(
    monkeypatch,
):
    torch.manual_seed(0)
    layer = packed_twin(nn.Linear(256, 256).requires_grad_(False))  # a copy: 256 KiB
    x = torch.randn(4, 256, requires_grad=True)
    # a quarter of the memory must stay available: 1 MiB of 4 leaves no room
    monkeypatch.setattr(packed_linear, "_memory", lambda: (4 * 2**20, 2**20))
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)
    assert layer not in packed_linear._PACKED
    layer = packed_twin(nn.Linear(256, 256).requires_grad_(False))
    # room for the weight's copy, which leaves none for its transpose's
    readings = iter([(4 * 2**20, 2**20 + 2**18), (4 * 2**20, 2**20)])
    monkeypatch.setattr(packed_linear, "_memory", lambda: next(readings))
    layer(x).sum().backward()
    packed = packed_linear._PACKED[layer]
    assert packed.transposed is None and packed.no_room_for_transposed
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(4, 256))


def test_dropped_weights_free_the_packed_copies():
    base = load_base_model("tiny:llama", "causal_lm")
    base.model(input_ids=torch.tensor([[1, 2, 3]]))
    held = [m for m in base.model.modules() if m in packed_linear._PACKED]
    assert held
    base.drop_weights()
    assert not any(m in packed_linear._PACKED for m in base.model.modules())


def train_twice(model: str, kind: str, layers: tuple[int, ...]):
    """The same trial with packed and with torch's linears: (loss curve, weights) each."""
    base, data = setup(model, kind)
    data = type(data)(data.train, data.dev, kind, "loss")  # a smooth metric to compare
    assert any(type(m) is PackedLinear for m in base.model.modules())
    results = []
    for packed in (True, False):
        reft = make_reft(base, layers=layers, seed=0)
        curve = []
        config = TrainConfig(lr=5e-3, epochs=2, batch_size=8, seed=0)
        with nullcontext() if packed else torch_linears(base.model):
            train_trial(base, reft, data, config, lambda e, d, c=curve: c.append(d.score))
        results.append((curve, reft.state_dict()))
        if packed:  # it went through the packed layers, backward included
            trained_through = [packed_linear._PACKED.get(m) for m in base.model.modules()]
            assert any(p is not None and p.transposed is not None for p in trained_through)
    return results


def assert_same_training(packed, plain):
    (packed_curve, packed_weights), (plain_curve, plain_weights) = packed, plain
    assert len(packed_curve) == len(plain_curve) == 2
    torch.testing.assert_close(packed_curve, plain_curve, atol=1e-4, rtol=1e-4)
    for name, weight in plain_weights.items():
        torch.testing.assert_close(packed_weights[name], weight, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("model", "kind"), [("tiny:llama", "generation"), ("tiny:bert", "classification")]
)
def test_a_trial_trains_the_same_with_packed_and_plain_linears(model, kind):
    assert_same_training(*train_twice(model, kind, layers=(1, 3)))


@pytest.mark.slow
def test_a_minilm_trial_trains_the_same_with_packed_and_plain_linears():
    assert_same_training(*train_twice("embedded:minilm", "classification", layers=(2, 4)))


@pytest.mark.slow
@pytest.mark.usefixtures("smollm2_cache")
def test_a_smollm2_trial_trains_the_same_with_packed_and_plain_linears():
    assert_same_training(*train_twice("embedded:smollm2", "generation", layers=(15, 25)))


def test_a_frozen_pass_from_torchs_linears_is_stored_apart_from_a_packed_one(monkeypatch):
    """Their outputs differ in the last bits: a store entry serves the kernels that made it."""
    packed = frozen_store.model_key(load_base_model("tiny:llama", "causal_lm"))
    monkeypatch.setenv(PACKED_LINEARS_ENV, "0")
    plain = frozen_store.model_key(load_base_model("tiny:llama", "causal_lm"))
    assert packed != plain
