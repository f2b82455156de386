"""What a trial costs besides its budget: peak memory and the size of its trained weights.

Peak memory is what the loaded model and the trial's training hold at most. On a GPU that is
``torch.cuda.max_memory_allocated``, reset when the trial starts (the model is on the GPU). On
a CPU the process also holds the data, the previous trials' freed heap and, in ``compare``,
other studies' leftovers, so it is the loaded model's bytes plus what the resident set grew
by while the trial trained: Linux's ``VmHWM``, reset at the start by writing 5 to
``/proc/self/clear_refs``, minus ``VmRSS`` then. Where that cannot be done (not Linux), it is
the process's lifetime peak, ``ru_maxrss``. Trials packed side by side share one figure.
"""

from __future__ import annotations

import resource
import sys

import torch
from torch import nn

MB = 2**20


class PeakMemory:
    """Started when a trial starts; ``mb()`` is its peak so far (see the module docstring)."""

    def __init__(self, device: torch.device, model: nn.Module) -> None:
        self.device = device
        self.start: float | None = None  # resident MB when started, where the peak was reset
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            return
        self.model_mb = weights_bytes(model) / MB
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
            self.start = _status_mb("VmRSS")
        except OSError:
            pass

    def mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / MB
        if self.start is not None:
            return self.model_mb + max(_status_mb("VmHWM") - self.start, 0.0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, B on macOS
        return peak / MB if sys.platform == "darwin" else peak * 1024 / MB


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024 / MB
    raise OSError(f"/proc/self/status has no {field}")


def weights_bytes(*modules: nn.Module | None) -> int:
    """Bytes of the modules' parameters: for an adapter and a head, the trained tensors an
    export writes (numel x element size, without file headers, configs or a copied base
    model). Parameters, not the state: LoReFT's orthogonal parametrization keeps a square
    ``base`` buffer per intervention (hidden x hidden) that its export does not need."""
    return sum(
        p.numel() * p.element_size()
        for module in modules
        if module is not None
        for p in module.parameters()
    )
