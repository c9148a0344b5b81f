"""The benchmark suite's library: FLOP counting (analytic and per component), interleaved
latency runs, component timing, throughput, baselines, reports and plots."""

from .baselines import SDXLAlone, mapping_alone
from .components import count_component_flops, workload_component_flops
from .flops import WorkloadFlops, count_flops, mapping_flops, unet_flops, workload_flops
from .runner import PLANNED, VARIANTS, Workload, efficiency, peak_tflops, run_latency, summarize
from .suite import MODES, SuiteOptions, run_suite

__all__ = [
    "MODES", "PLANNED", "SDXLAlone", "SuiteOptions", "VARIANTS", "Workload", "WorkloadFlops", "count_component_flops",
    "count_flops", "efficiency", "mapping_alone", "mapping_flops", "peak_tflops", "run_latency", "run_suite",
    "summarize", "unet_flops", "workload_component_flops", "workload_flops",
]
