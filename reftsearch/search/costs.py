"""What a trial costs besides its budget: peak memory and the size of its trained weights.

Peak memory is the process's peak resident set on a CPU (Linux's ``VmHWM``, reset when a trial
starts by writing 5 to ``/proc/self/clear_refs``; where that cannot be done, the process's
lifetime peak, ``ru_maxrss``), and ``torch.cuda.max_memory_allocated`` on a GPU (reset at the
trial's start too). On a CPU it includes the loaded model and data, as a user's machine must
hold them. Both are for the whole process: trials packed side by side share one figure.
"""

from __future__ import annotations

import resource
import sys

import torch
from torch import nn

MB = 2**20


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
    except OSError:
        pass  # the lifetime peak then (peak_memory_mb)


def peak_memory_mb(device: torch.device) -> float:
    """The peak since ``reset_peak_memory`` (see the module's docstring), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MB
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / MB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / MB if sys.platform == "darwin" else peak * 1024 / MB


def weights_bytes(*modules: nn.Module | None) -> int:
    """Bytes of the trained tensors an export writes (the adapter's state and the head's):
    numel x element size, without file headers, configs or a copied base model."""
    return sum(
        t.numel() * t.element_size()
        for module in modules
        if module is not None
        for t in module.state_dict().values()
    )
