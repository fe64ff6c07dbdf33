"""A profile's device time by kind of kernel: the linear layers (cuBLAS GEMMs and our GEMV), attention,
and everything else; with the linear layers' achieved TFLOP/s when the window's FLOPs are known.

The throughput targets of the engine-limit issue turn on one question this answers: is a step's time
in the GEMMs (then their efficiency against the card's peak decides) or in attention's KV reads?
"""

from __future__ import annotations

from dataclasses import dataclass

# Substrings of kernel names, lowercased. cuBLAS on Hopper names its GEMMs nvjet_* or sm90_xmma_*,
# CUTLASS's cutlass*, older ones *gemm*; our one-token linears are kernels/gemv.py's; on the CPU the
# ops are aten::mm/addmm and oneDNN's prepacked mkldnn::_linear_pointwise.
LINEAR_MARKERS = ("gemm", "nvjet", "xmma", "cutlass", "gemv", "linear", "aten::mm", "aten::addmm", "aten::bmm")
ATTENTION_MARKERS = ("paged_decode", "_prefill_kernel", "attention", "flash")


@dataclass(frozen=True)
class KernelTime:
    name: str
    seconds: float


def kind_of(name: str) -> str:
    lowered = name.lower()
    if any(marker in lowered for marker in ATTENTION_MARKERS):
        return "attention"
    if any(marker in lowered for marker in LINEAR_MARKERS):
        return "linear"
    return "other"


def by_kind(kernels: list[KernelTime]) -> dict[str, float]:
    """Seconds per kind, every kind present (0.0 when none ran)."""
    totals = {"linear": 0.0, "attention": 0.0, "other": 0.0}
    for kernel in kernels:
        totals[kind_of(kernel.name)] += kernel.seconds
    return totals


def from_profiler(profile, on_cuda: bool) -> list[KernelTime]:
    """The kernels of a finished torch.profiler run: device time on CUDA; on the CPU each op's self
    time (an op's total would count the ops it calls again)."""
    kernels = []
    for event in profile.key_averages():
        if on_cuda:
            microseconds = getattr(event, "device_time_total", None)
            if microseconds is None:
                microseconds = event.cuda_time_total
            if getattr(event, "device_type", None) is not None and "CUDA" not in str(event.device_type):
                continue  # a host-side op: its kernels are counted as kernels
        else:
            microseconds = event.self_cpu_time_total
        if microseconds:
            kernels.append(KernelTime(event.key, microseconds / 1e6))
    return kernels


def summary_lines(kernels: list[KernelTime], num_steps: int, linear_flops: float | None) -> list[str]:
    totals = by_kind(kernels)
    busy = sum(totals.values())
    lines = [f"device time by kind over {num_steps} steps ({1000 * busy / max(num_steps, 1):.2f} ms/step busy):"]
    for kind, seconds in totals.items():
        line = (f"  {kind:9s} {seconds:8.3f} s  {1000 * seconds / max(num_steps, 1):7.2f} ms/step  "
                f"{100 * seconds / busy if busy else 0.0:5.1f}%")
        if kind == "linear" and linear_flops and seconds > 0:
            line += f"  {linear_flops / seconds / 1e12:7.2f} TFLOP/s achieved"
        lines.append(line)
    return lines
