"""Device memory: which modules stay resident, offload of the others, peak memory.

With offload "encoders_vaes" the text encoders and VAEs live on the CPU and are moved to
the device only while they run (a plain .to() around the use); the UNets and mapping
layers stay resident. On the CPU offload is a no-op (nothing to offload to).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class Residency:
    """`home(module)`: where a module waits; `use(*modules)`: on the device meanwhile."""

    def __init__(self, device: torch.device | str, offload: bool):
        self.device = torch.device(device)
        self.offload = offload and self.device.type != "cpu"

    def home(self, module: nn.Module) -> torch.device:
        return torch.device("cpu") if self.offload else self.device

    @contextmanager
    def use(self, *modules: nn.Module) -> Iterator[None]:
        if not self.offload:
            yield
            return
        for m in modules:
            m.to(self.device)
        try:
            yield
        finally:
            for m in modules:
                m.to("cpu")


def reset_peak_memory(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device | str) -> int | None:
    """torch.cuda.max_memory_allocated since the last reset; None off CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None
