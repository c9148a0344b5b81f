"""The benchmark suite's library: FLOP counting, interleaved latency runs, summaries."""

from .flops import WorkloadFlops, mapping_flops, unet_flops, workload_flops
from .runner import PLANNED, VARIANTS, Workload, efficiency, peak_tflops, run_latency, summarize

__all__ = [
    "PLANNED", "VARIANTS", "Workload", "WorkloadFlops", "efficiency", "mapping_flops", "peak_tflops",
    "run_latency", "summarize", "unet_flops", "workload_flops",
]
