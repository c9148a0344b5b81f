"""Runtime switches that change how, not what, the pipeline computes (RuntimeConfig), and
which of them can act on a given device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ParameterError

OFFLOAD_MODES = ("none", "encoders_vaes")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")  # the last two only for tests and debugging
COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs")
CHANNELS_LAST_PARTS = ("sd15_unet", "mapping", "sdxl_unet")  # channels_last=True: all of them
# The stage-2 profile on an H100 (fp16, 2026-11-23): channels-last made the SD1.5 UNet
# 12.2 -> 10.6 ms and the mapping 7.8 -> 6.1 ms per step, but the SDXL UNet 43.2 -> 45.4 ms
# (eager, GPU time; benchmarks/results/stage2-profile-h100-2026-11-23.log). So the mixed
# layout converts only the first two; the remap-inject and epilogue kernels read either.
MIXED_LAYOUT = ("sd15_unet", "mapping")


@dataclass(frozen=True)
class RuntimeConfig:
    """How the pipeline executes; every switch keeps the result of the plain eager run
    (bit-identical for streams and graphs, within a tolerance for compile, channels-last
    and fused QKV, which reorder floating-point math).

    triton_kernels: the fused Triton kernels (xa_runtime.kernels) where Triton can run:
        remap-inject, the CFG + sampler step, the mapping's conv epilogues, the UNets'
        GEGLU (module swap), and GroupNorm on channels-last activations in the UNets that
        channels_last names. Swapped modules carry a flag the pipeline sets at the start
        of each request, so pipelines sharing models each get their own setting. With
        compile, only the CFG + sampler step (see traced_kernels_active).
    streams: stage 2 overlaps SD1.5 step i+1 with mapping + SDXL step i on two CUDA
        streams; on CPU the scheduler runs the plain sequential order (same result).
    cuda_graphs: capture each branch's step as a CUDA graph (per shape), replay per step.
        CUDA only: a pipeline on another device refuses it (ParameterError), rather than
        silently running something else than what was asked for.
    compile: torch.compile the branch steps (`compile_backend`, `compile_mode`); compiled
        once per shape, the time it took reported in XAdapterOutput.overheads["compile"].
    channels_last: modules in channels-last memory format: True for all of
        CHANNELS_LAST_PARTS (both UNets and the mapping layers), or a tuple naming some of
        them (MIXED_LAYOUT: the SD1.5 UNet and the mapping, SDXL stays NCHW). Stored as the
        tuple of parts in CHANNELS_LAST_PARTS order (() when off). In a channels-last UNet
        the Transformer2D blocks are swapped in place for a subclass whose output keeps the
        layout (diffusers' returns NCHW), and the GroupNorms for one that runs the Triton
        kernel when triton_kernels is on (torch's CUDA GroupNorm returns NCHW); same
        parameters, same values.
    fuse_qkv: diffusers' fuse_qkv_projections() on both UNets (one QKV matmul). The fused
        weights are copies: LoRA applied to to_q/to_k/to_v afterwards is not seen, so do
        not combine it with LoRA on the UNets (no check can see a LoRA fused later).
    offload: "encoders_vaes" keeps the text encoders and VAEs on the CPU and moves each to
        the device only while it runs (smaller GPUs); the UNets and mapping stay resident.
    """

    triton_kernels: bool = False
    streams: bool = False
    cuda_graphs: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: str | None = None
    channels_last: bool | tuple[str, ...] = False
    fuse_qkv: bool = False
    offload: str = "none"

    def __post_init__(self) -> None:
        for name in ("triton_kernels", "streams", "cuda_graphs", "compile", "fuse_qkv"):
            if not isinstance(getattr(self, name), bool):
                raise ParameterError(name, getattr(self, name), "True or False")
        object.__setattr__(self, "channels_last", _channels_last_parts(self.channels_last))
        if self.offload not in OFFLOAD_MODES:
            raise ParameterError("offload", self.offload, f"one of {', '.join(OFFLOAD_MODES)}")
        if self.compile_backend not in COMPILE_BACKENDS:
            raise ParameterError("compile_backend", self.compile_backend, f"one of {', '.join(COMPILE_BACKENDS)}")
        if self.compile_mode not in COMPILE_MODES:
            # "reduce-overhead" / "max-autotune" capture CUDA graphs of their own, which
            # would nest inside (or fight with) the runtime's graphs and stream scheduling.
            accepted = ", ".join(repr(m) for m in COMPILE_MODES)
            raise ParameterError("compile_mode", self.compile_mode, f"one of {accepted} (CUDA graphs come from cuda_graphs=True)")
        if self.compile_mode is not None and not self.compile:
            raise ParameterError("compile_mode", self.compile_mode, "None unless compile=True")

    def channels_last_parts(self) -> tuple[str, ...]:
        """The parts in channels-last format (a subset of CHANNELS_LAST_PARTS)."""
        return self.channels_last  # type: ignore[return-value]  # normalised in __post_init__

    def check_device(self, device: torch.device | str) -> None:
        """Raise ParameterError for switches that cannot run on `device`."""
        device = torch.device(device)
        if self.cuda_graphs and device.type != "cuda":
            raise ParameterError("cuda_graphs", True, f"False on a {device.type} device (CUDA graphs need CUDA)")

    def traced_kernels_active(self, device: torch.device) -> bool:
        """The kernels that run inside the branch steps (remap-inject, conv epilogues,
        GroupNorm, GEGLU): off under compile, where inductor generates fused kernels for
        the same ops itself and would otherwise have to break its graphs around ours.
        The CFG + sampler step runs outside the compiled steps and follows kernels_active."""
        return self.kernels_active(device) and not self.compile

    def kernels_active(self, device: torch.device) -> bool:
        if not self.triton_kernels:
            return False
        from ..kernels.availability import triton_usable

        return triton_usable(device)

    def streams_active(self, device: torch.device | str) -> bool:
        return self.streams and torch.device(device).type == "cuda"

    def graphs_active(self, device: torch.device | str) -> bool:
        return self.cuda_graphs and torch.device(device).type == "cuda"

    def offload_active(self, device: torch.device | str) -> bool:
        return self.offload != "none" and torch.device(device).type != "cpu"


def _channels_last_parts(value: object) -> tuple[str, ...]:
    accepted = f"True, False or a tuple of names from {', '.join(CHANNELS_LAST_PARTS)}"
    if isinstance(value, bool):
        return CHANNELS_LAST_PARTS if value else ()
    if isinstance(value, str) or not isinstance(value, (tuple, list, frozenset, set)):
        raise ParameterError("channels_last", value, accepted)
    unknown = [v for v in value if v not in CHANNELS_LAST_PARTS]
    if unknown:
        raise ParameterError("channels_last", value, f"{accepted} ({unknown[0]!r} is not one)")
    return tuple(p for p in CHANNELS_LAST_PARTS if p in value)
