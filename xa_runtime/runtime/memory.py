"""Device memory: which modules stay resident, offload of the others, peak memory, and the
estimate of a generation's memory that the CLI checks before it runs.

With offload "encoders_vaes" the text encoders and VAEs live on the CPU and are moved to
the device only while they run (a plain .to() around the use); the UNets and mapping
layers stay resident. On the CPU offload is a no-op (nothing to offload to).
"""

from __future__ import annotations

import os
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


# Peak activation memory of one generation, per image and pixel of each branch, in units of
# the VAE's first width x the dtype's bytes: the VAE decoder at full resolution dominates.
# Measured on the tiny models (fp32, CPU, peak RSS): 5.4 at 1024^2, 5.8 at 512^2 x 4 images,
# 6.5 at 512^2; the estimate takes 6.
ACTIVATION_UNITS_PER_PIXEL = 6


def estimate_generation_bytes(images: int, sdxl_pixels: int, sd15_pixels: int, vae_widths: tuple[int, int],
                              dtype_bytes: int) -> int:
    """Estimated peak activation bytes of a generation of `images` images (weights not
    included). vae_widths: (SDXL, SD1.5) VAE block_out_channels[0]."""
    per_image = sdxl_pixels * vae_widths[0] + sd15_pixels * vae_widths[1]
    return images * per_image * ACTIVATION_UNITS_PER_PIXEL * dtype_bytes


def device_memory_bytes(device: torch.device | str) -> int | None:
    """All the memory of `device`: the GPU's total, or the machine's physical memory; None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
