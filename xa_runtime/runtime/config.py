"""Runtime switches that change how, not what, the pipeline computes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RuntimeConfig:
    """triton_kernels: use the fused Triton kernels (xa_runtime.kernels) where Triton can run.

    Off by default until a GPU benchmark in benchmarks/results/ shows the win (issue 6);
    on CPU the kernels only run under TRITON_INTERPRET=1 (tests).
    """

    triton_kernels: bool = False

    def kernels_active(self, device: torch.device) -> bool:
        if not self.triton_kernels:
            return False
        from ..kernels import triton_usable

        return triton_usable(device)
