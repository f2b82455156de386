"""Frozen linear layers run from weights packed once for oneDNN (CPU only).

On a CPU, torch's linear (MKL's sgemm in float32, oneDNN in bfloat16) copies its weight into
the kernel's blocked layout on every call. A frozen model's weights never change, so each
frozen linear layer of a CPU model is packed once, on first use, and run by oneDNN's linear
on the packed copy (the kernel ``torch.compile`` uses for frozen weights). What it saves is
largest where a trial spends its time, on few rows: measured on an AMD EPYC (Zen 4, 2
threads), a SmolLM2 MLP layer (1,536 x 576) on 16 rows whose weight is not in cache took
432 us in float32 and 300 us in bfloat16 with torch's linear, 305 and 148 us packed; on
2,048 rows (a frozen pass) 23.5 and 10.3 ms against 17.5 and 9.3 ms. A trial's training step
on SmolLM2 (LoReFT at layer 15, 8 rows; the two ways interleaved in one process) took
139-162 ms in float32 and 98-115 ms in bfloat16-mixed with torch's linear, 80-107 and
79-98 ms packed (benchmarks/README.md has whole runs).

A frozen layer's backward computes one gradient, its input's: ``grad_output @ weight``, which
is the linear of the transposed weight, so it runs from a second packed copy, the
transposed weight's, made on the first backward (only the layers above an intervention ever
run one). The results equal torch's linear within float rounding (bit for bit in bfloat16,
~1e-6 apart in float32: another summation order).

Each copy is made only if the system keeps a quarter of its memory available after it
(other workers, frozen activations); a layer without room runs torch's linear. The packed
copies are kept beside the modules, not in them: ``state_dict``, ``deepcopy`` and
the exports never see them (oneDNN's opaque tensors can be neither saved nor copied). A layer
runs torch's own linear whenever the packed copy may not be its weight's: the weight was
swapped (full fine-tuning attaches trainable copies), changed in place, needs a gradient, or
meets an input of another dtype.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psutil
import torch
from torch import nn

# "0": never pack (torch's linear everywhere), e.g. to compare the two or rule this out
PACKED_LINEARS_ENV = "REFTSEARCH_PACKED_LINEARS"
# a packed copy is made only if this share of the system's memory stays available after it
MEMORY_KEPT_SHARE = 0.25
PACKED_DTYPES = (torch.float32, torch.bfloat16)


@dataclass
class _Packed:
    """A weight's packed copies, valid while the weight is this tensor at this version."""

    weight: torch.Tensor
    key: tuple[int, int, torch.dtype]  # data pointer, in-place version, dtype
    forward: torch.Tensor
    transposed: torch.Tensor | None = None  # for the input's gradient, on the first backward
    no_room_for_transposed: bool = False

    @staticmethod
    def key_of(weight: torch.Tensor) -> tuple[int, int, torch.dtype]:
        return weight.data_ptr(), weight._version, weight.dtype

    def input_gradient(self, grad_output: torch.Tensor) -> torch.Tensor:
        """``grad_output @ weight``: from the transposed weight's packed copy where there is
        room for one."""
        grad_output = grad_output.to(self.weight.dtype).contiguous()
        if self.transposed is None and not self.no_room_for_transposed:
            if _room_for(self.weight):
                self.transposed = _pack(self.weight.detach().t())
            else:
                self.no_room_for_transposed = True
        if self.transposed is None:
            return grad_output @ self.weight.detach()
        return _linear(grad_output, self.transposed, None)


_PACKED: weakref.WeakKeyDictionary[nn.Module, _Packed] = weakref.WeakKeyDictionary()
_NO_ROOM: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # layers left to torch's linear


def _pack(weight: torch.Tensor) -> torch.Tensor:
    # the batch-size hint only steers oneDNN's choice of layout: a trial's step has ~16 rows
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 16)


def _linear(input: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(input, packed, bias, "none", [], "")


class _PackedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: torch.Tensor, packed: _Packed, bias: torch.Tensor | None):
        ctx.packed = packed
        return _linear(input, packed.forward, bias)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return ctx.packed.input_gradient(grad_output), None, None


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` whose frozen weight runs packed (see the module's docstring)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        packed = _current(self, input)
        if packed is None:
            return super().forward(input)
        return _PackedLinearFunction.apply(input, packed, self.bias)


def _current(module: nn.Linear, input: torch.Tensor) -> _Packed | None:
    """``module``'s packed copy of its weight (made or remade as needed), or None where torch's
    own linear must run."""
    weight, bias = module.weight, module.bias
    trained = weight.requires_grad or (bias is not None and bias.requires_grad)
    if trained or input.dtype != weight.dtype or input.device != weight.device or not input.numel():
        return None
    key = _Packed.key_of(weight)
    packed = _PACKED.get(module)
    if packed is None or packed.weight is not weight or packed.key != key:
        if module in _NO_ROOM or not _room_for(weight):
            _NO_ROOM.add(module)
            return None
        packed = _PACKED[module] = _Packed(weight, key, _pack(weight.detach()))
    return packed


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch packs ``dtype`` weights on ``device`` (a CPU with oneDNN), unless
    ``$REFTSEARCH_PACKED_LINEARS`` is ``0``. Callers check that ``dtype``'s math is native."""
    return (
        os.environ.get(PACKED_LINEARS_ENV) != "0"
        and device.type == "cpu"
        and dtype in PACKED_DTYPES
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def pack_linears(linears: Iterable[nn.Module]) -> int:
    """Turn the plain ``nn.Linear`` layers among ``linears`` into ``PackedLinear`` ones (their
    weights are packed on first use); returns how many were turned."""
    plain = [m for m in linears if type(m) is nn.Linear]
    for module in plain:
        module.__class__ = PackedLinear
    return len(plain)


@contextmanager
def torch_linears(model: nn.Module) -> Iterator[None]:
    """Run ``model``'s packed layers as torch's own ``nn.Linear`` for the duration: what a
    library that loads an export computes, to the last bit (an export's reference outputs)."""
    packed = _packed_layers(model)
    for module in packed:
        module.__class__ = nn.Linear
    try:
        yield
    finally:
        for module in packed:
            module.__class__ = PackedLinear


def linear_kernels(model: nn.Module) -> str:
    """Which kernels ``model``'s linear layers run: their outputs differ in the last bits."""
    return "oneDNN, packed" if _packed_layers(model) else "torch"


def _packed_layers(model: nn.Module) -> list[PackedLinear]:
    return [module for module in model.modules() if type(module) is PackedLinear]


def forget_packed(model: nn.Module) -> None:
    """Free the packed copies of ``model``'s layers (its weights are being dropped)."""
    for module in model.modules():
        _PACKED.pop(module, None)


def _room_for(weight: torch.Tensor) -> bool:
    """Whether a packed copy of ``weight`` leaves ``MEMORY_KEPT_SHARE`` of the memory
    available."""
    total, available = _memory()
    return available - weight.numel() * weight.element_size() >= MEMORY_KEPT_SHARE * total


def _memory() -> tuple[int, int]:
    """The system's memory and what of it is available, in bytes (Linux: MemTotal and
    MemAvailable)."""
    memory = psutil.virtual_memory()
    return memory.total, memory.available
