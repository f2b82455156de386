import pytest
import torch

from reftsearch.methods.reft.interventions import (
    INTERVENTIONS,
    DiReFT,
    LoReFT,
    NoReFT,
    build_intervention,
    count_parameters,
    householder_product,
)
from reftsearch.spec.space import INTERVENTION_NAMES


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def test_loreft_matches_the_formula():
    module = LoReFT(hidden_size=12, rank=3)
    h = torch.randn(5, 12)
    R = module.rotate_layer.weight  # [d, r], orthonormal columns
    W, b = module.learned_source.weight, module.learned_source.bias
    # column form h + R (W h + b - R^T h) for every row h
    expected = h + (h @ W.T + b - h @ R) @ R.T
    torch.testing.assert_close(module(h), expected)


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_householder_product_and_its_gradient_match_torch(rank):
    raw = torch.randn(24, rank, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(24, rank, dtype=torch.float64)
    results = []
    for product in (torch.linalg.householder_product, householder_product):
        reflectors = raw.tril(diagonal=-1)
        tau = 2.0 / (1.0 + (reflectors * reflectors).sum(dim=-2))
        q = product(reflectors, tau)
        (gradient,) = torch.autograd.grad((q * upstream).sum(), raw)
        results.append((q, gradient))
    (q_torch, grad_torch), (q_ours, grad_ours) = results
    torch.testing.assert_close(q_ours, q_torch, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad_ours, grad_torch, atol=1e-12, rtol=0)


def test_loreft_rotation_and_its_gradient_equal_torchs_parametrization():
    module = LoReFT(hidden_size=16, rank=4)
    # away from its initial value, with a base from an assigned R (as pyreft's load does)
    with torch.no_grad():
        module.rotate_layer.parametrizations.weight.original.add_(torch.randn(16, 4) * 0.3)
    module.rotate_layer.weight = torch.linalg.qr(torch.randn(16, 4))[0]
    with torch.no_grad():
        module.rotate_layer.parametrizations.weight.original.add_(torch.randn(16, 4) * 0.3)
    raw = module.rotate_layer.parametrizations.weight.original
    upstream = torch.randn(16, 4)
    by_torch, ours = module.rotate_layer.weight, module.rotation()
    torch.testing.assert_close(ours, by_torch, atol=1e-6, rtol=0)
    expected = torch.autograd.grad((by_torch * upstream).sum(), raw)[0]
    torch.testing.assert_close(
        torch.autograd.grad((ours * upstream).sum(), raw)[0], expected, atol=1e-5, rtol=0
    )


def test_noreft_and_direft_match_their_formulas():
    h = torch.randn(4, 10)
    noreft = NoReFT(10, 2)
    P, W, b = noreft.proj_layer.weight, noreft.learned_source.weight, noreft.learned_source.bias
    torch.testing.assert_close(noreft(h), h + (h @ W.T + b - h @ P.T) @ P)
    direft = DiReFT(10, 2)
    P, W, b = direft.proj_layer.weight, direft.learned_source.weight, direft.learned_source.bias
    torch.testing.assert_close(direft(h), h + (h @ W.T + b) @ P)


def test_rotation_stays_orthonormal_after_training_with_weight_decay():
    module = build_intervention("loreft", 16, 4)
    decayed = [
        p for p in module.parameters() if all(p is not q for q in module.no_decay_parameters())
    ]
    optimizer = torch.optim.AdamW(
        [
            {"params": decayed, "weight_decay": 0.1},
            {"params": module.no_decay_parameters(), "weight_decay": 0.0},
        ],
        lr=1e-2,
    )
    target = torch.randn(32, 16)
    for _ in range(20):
        loss = (module(torch.randn(32, 16)) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    R = module.rotate_layer.weight
    torch.testing.assert_close(R.T @ R, torch.eye(4), atol=1e-5, rtol=0)
    assert R.abs().sum() > 1  # not collapsed to zero


def test_parameter_counts():
    d, r = 64, 4
    assert count_parameters(LoReFT(d, r)) == 2 * r * d + r
    assert count_parameters(NoReFT(d, r)) == 2 * r * d + r
    assert count_parameters(DiReFT(d, r)) == 2 * r * d + r


def test_pyreft_state_dict_names_and_shapes():
    state = LoReFT(20, 3).pyreft_state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "weight": (3, 20),
        "bias": (3,),
        "rotate_layer": (20, 3),
    }
    assert all(v.dtype == torch.float32 for v in state.values())


@pytest.mark.parametrize("name", sorted(INTERVENTIONS))
def test_a_pyreft_state_dict_loads_back_exactly(name):
    """What export writes, read back (reftsearch.export.reader): the same tensors, bit for
    bit; LoReFT's R through its orthogonal parametrization, trained off its init."""
    torch.manual_seed(0)
    trained = build_intervention(name, 24, 3)
    with torch.no_grad():
        for key, param in trained.named_parameters():
            noise = 0.3 * torch.randn_like(param)
            # LoReFT's raw orthogonal matrix keeps its diagonal: it holds the columns' signs
            param.add_(noise.tril(-1) if "parametrizations" in key else noise)
    state = trained.pyreft_state_dict()
    fresh = build_intervention(name, 24, 3)
    fresh.load_pyreft_state_dict(state)
    for key, tensor in fresh.pyreft_state_dict().items():
        assert torch.equal(tensor, state[key]), key
    if name == "loreft":  # what it computes with
        assert torch.equal(fresh.rotation(), state["rotate_layer"])
    # LoReFT's trained R is recomputed from its raw matrix, ~1e-7 off the value exported
    h = torch.randn(5, 24)
    assert torch.allclose(fresh(h), trained(h), atol=1e-6)


def test_unknown_type_and_bad_rank_are_refused():
    with pytest.raises(ValueError, match=r"must be one of \['direft', 'loreft', 'noreft'\]"):
        build_intervention("lora", 8, 2)
    with pytest.raises(ValueError, match="rank must be in"):
        build_intervention("loreft", 8, 9)
    assert set(INTERVENTIONS) == {"loreft", "direft", "noreft"}


def test_the_space_offers_exactly_the_registered_interventions():
    assert sorted(INTERVENTION_NAMES) == sorted(INTERVENTIONS)
