"""ReFT intervention modules: LoReFT, DiReFT and NoReFT.

Each module maps hidden states ``h`` (``[..., hidden]``) to edited hidden states of the same
shape. Parameter names and forward math follow pyreft 0.1.0 (``LoreftIntervention``,
``NodireftIntervention``, ``NoreftIntervention``) so that a trained module exports to a
directory that ``pyreft.ReftModel.load`` reads and behaves the same there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from reftsearch.methods.reft.config import max_rank


def householder_product(reflectors: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.householder_product(reflectors, tau)`` for a tall ``[n, k]`` matrix: the
    first ``k`` columns of ``H_1 ... H_k``, ``H_j = I - tau_j v_j v_j^T``, where ``v_j`` is
    column ``j`` below the diagonal with a 1 on it.

    Through the compact WY form ``H_1 ... H_k = I - V T^-1 V^T``, ``T^-1 = diag(1 / tau) +
    (the strictly upper part of V^T V)``: a few matmuls and one ``k x k`` triangular solve,
    whose autograd is fast, where torch's backward loops over the reflectors."""
    n, k = reflectors.shape
    first_columns = torch.eye(n, k, dtype=reflectors.dtype, device=reflectors.device)
    vectors = reflectors.tril(diagonal=-1) + first_columns
    t_inverse = (vectors.T @ vectors).triu(diagonal=1) + torch.diag(1 / tau)
    # V^T E is the transposed top k x k block of V
    solved = torch.linalg.solve_triangular(t_inverse, vectors[:k].T, upper=True)
    return first_columns - vectors @ solved


class LowRankRotateLayer(nn.Module):
    """Holds ``R`` of shape ``[hidden, rank]`` (pyreft's name and layout; ``LoReFT.edit``
    applies it)."""

    def __init__(self, hidden_size: int, rank: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size, rank))
        nn.init.orthogonal_(self.weight)


class Intervention(nn.Module, ABC):
    """A trainable edit of hidden states at the intervened positions."""

    #: pyreft class that loads this intervention's state dict (see export).
    pyreft_class: str

    def __init__(self, hidden_size: int, rank: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.rank = rank
        self.learned_source = nn.Linear(hidden_size, rank)
        # pyreft applies dropout to the whole edited state, not only to the edit: kept so that
        # a config found here trains the same way in pyreft.
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        base = h.to(self.learned_source.weight.dtype)
        return self.dropout(base + self.edit(base)).to(h.dtype)

    @abstractmethod
    def edit(self, h: torch.Tensor) -> torch.Tensor:
        """The additive edit ``f(h) - h`` before dropout."""

    def no_decay_parameters(self) -> list[nn.Parameter]:
        """Parameters that must not get weight decay (see train.build_optimizer)."""
        return []

    def pyreft_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under the names pyreft's ``load_state_dict`` expects.

        pyvene registers ``embed_dim`` and ``interchange_dim`` as (int64) buffers of every
        intervention, so pyreft's saved files hold them and its strict ``load_state_dict`` of
        NoReFT/DiReFT requires them (LoReFT overrides ``state_dict`` and drops them).
        """
        dim = torch.tensor(self.hidden_size)
        weights = {k: v.detach().clone() for k, v in self.state_dict().items()}
        return {"embed_dim": dim, "interchange_dim": dim.clone(), **weights}

    def load_pyreft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load what ``pyreft_state_dict`` wrote (an exported ``intkey_<key>.bin``)."""
        weights = {k: v for k, v in state.items() if k not in ("embed_dim", "interchange_dim")}
        self.load_state_dict(weights)


class LoReFT(Intervention):
    """``h + R^T (W h + b - R h)`` with orthonormal ``R`` (``RR^T = I``)."""

    pyreft_class = "pyreft.interventions.LoreftIntervention"

    def __init__(self, hidden_size: int, rank: int, dropout: float = 0.0) -> None:
        super().__init__(hidden_size, rank, dropout)
        self.rotate_layer = nn.utils.parametrizations.orthogonal(
            LowRankRotateLayer(hidden_size, rank)
        )

    def edit(self, h: torch.Tensor) -> torch.Tensor:
        rotation = self.rotation()  # once: ``rotate_layer.weight`` recomputes it at each read
        return (self.learned_source(h) - h @ rotation) @ rotation.T

    def rotation(self) -> torch.Tensor:
        """``R`` (``[hidden, rank]``), the value of ``rotate_layer.weight``: torch's orthogonal
        parametrization of a tall matrix (its Householder map, trivialized by the ``base``
        buffer), computed through ``householder_product``, whose backward is 8-36x faster
        than that of the ``torch.linalg.householder_product`` it calls (rank 4-32, hidden
        576: 9-65 ms per call, several per training step)."""
        orthogonal = self.rotate_layer.parametrizations.weight
        raw = orthogonal.original
        reflectors = raw.tril(diagonal=-1)
        tau = 2.0 / (1.0 + (reflectors * reflectors).sum(dim=-2))
        # as torch does: the raw diagonal holds each column's sign, which is not trained
        signs = raw.diagonal().int().unsqueeze(-2)
        return orthogonal[0].base @ (householder_product(reflectors, tau) * signs)

    def no_decay_parameters(self) -> list[nn.Parameter]:
        # AdamW's decoupled weight decay on the orthogonal parametrization's raw matrix drives
        # a non-square R to zero within one step (measured), so R is never decayed.
        return list(self.rotate_layer.parameters())

    def pyreft_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "weight": self.learned_source.weight.detach().clone(),
            "bias": self.learned_source.bias.detach().clone(),
            "rotate_layer": self.rotate_layer.weight.detach().clone(),
        }

    @torch.no_grad()
    def load_pyreft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load ``W``, ``b`` and ``R`` as ``pyreft_state_dict`` wrote them. Assigning ``R``
        runs the orthogonal parametrization's ``right_inverse``: its ``base`` becomes ``R``
        completed to an orthonormal basis (by a QR decomposition, off from ``R`` by ~1e-7),
        its raw matrix the one that selects ``base``'s first columns; those columns are then
        set to ``R`` itself, so that ``rotation()`` gives back exactly the exported ``R``."""
        self.learned_source.load_state_dict({"weight": state["weight"], "bias": state["bias"]})
        rotation = state["rotate_layer"].to(self.learned_source.weight)
        self.rotate_layer.weight = rotation
        self.rotate_layer.parametrizations.weight[0].base[:, : self.rank] = rotation


class NoReFT(Intervention):
    """LoReFT without the orthogonality constraint: ``h + P^T (W h + b - P h)``."""

    pyreft_class = "pyreft.interventions.NoreftIntervention"

    def __init__(self, hidden_size: int, rank: int, dropout: float = 0.0) -> None:
        super().__init__(hidden_size, rank, dropout)
        self.proj_layer = nn.Linear(hidden_size, rank, bias=False)

    def edit(self, h: torch.Tensor) -> torch.Tensor:
        return (self.learned_source(h) - self.proj_layer(h)) @ self.proj_layer.weight


class DiReFT(Intervention):
    """Direct edit, no projection back: ``h + P^T (W h + b)`` (pyreft: NodireftIntervention)."""

    pyreft_class = "pyreft.interventions.NodireftIntervention"

    def __init__(self, hidden_size: int, rank: int, dropout: float = 0.0) -> None:
        super().__init__(hidden_size, rank, dropout)
        self.proj_layer = nn.Linear(hidden_size, rank, bias=False)

    def edit(self, h: torch.Tensor) -> torch.Tensor:
        return self.learned_source(h) @ self.proj_layer.weight


INTERVENTIONS: dict[str, type[Intervention]] = {
    "loreft": LoReFT,
    "direft": DiReFT,
    "noreft": NoReFT,
}


def build_intervention(
    name: str, hidden_size: int, rank: int, dropout: float = 0.0
) -> Intervention:
    """Instantiate the intervention registered under ``name`` in float32."""
    if name not in INTERVENTIONS:
        raise ValueError(f"intervention must be one of {sorted(INTERVENTIONS)}, got {name!r}")
    if not 0 < rank <= max_rank(hidden_size):
        raise ValueError(
            f"rank must be in [1, {max_rank(hidden_size)}] (below the hidden size), got {rank}"
        )
    return INTERVENTIONS[name](hidden_size, rank, dropout).float()


def count_parameters(module: nn.Module) -> int:
    """Number of trainable scalars (what pyreft reports as trainable intervention params)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
