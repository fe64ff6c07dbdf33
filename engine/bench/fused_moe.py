"""Micro-benchmark of the fused MoE kernel: python -m engine.bench.fused_moe [--json PATH] [--sweep].

For the expert shapes of the dummy presets mixtral-8x7b (8 experts of 14336 over 4096, top 2) and
qwen3-30b-a3b (128 experts of 768 over 2048, top 8): the fused Triton path (token sorting, two grouped
GEMMs, the top-k sum) against the torch reference, at decode sizes and at a prefill of 4096 tokens,
with routing from random router logits (every expert about equally loaded). The Triton path is timed
eagerly (as prefill steps run) and as replays of a CUDA graph holding `--iters` calls (as decode steps
run); the reference, which reads the routing back to the host, eagerly. The table also gives the
expert-weight bandwidth (bytes of the experts a call touches, over the graph time) and TFLOP/s.
`--sweep` also times each launch of LAUNCH_CHOICES per size, to tune `moe_launch_for`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import torch

from engine.bench.timing import eager_ms, graph_ms
from engine.layers.fused_moe import select_experts
from kernels.fused_moe import MoELaunch, fused_moe, moe_launch_for
from kernels.fused_moe_ref import fused_moe_ref

PRESETS = ("mixtral-8x7b", "qwen3-30b-a3b")
LAUNCH_CHOICES = (
    MoELaunch(16, 64, 128, group_m=1, num_stages=4), MoELaunch(16, 32, 128, group_m=1, num_stages=4),
    MoELaunch(16, 128, 128, group_m=1), MoELaunch(16, 32, 256, group_m=1), MoELaunch(16, 64, 256, group_m=1),
    MoELaunch(32, 64, 128), MoELaunch(64, 64, 64), MoELaunch(64, 128, 64, num_stages=4),
    MoELaunch(128, 128, 64, num_warps=8, num_stages=3), MoELaunch(128, 256, 64, num_warps=8, num_stages=3),
)


def expert_shape(preset: str) -> tuple[int, int, int, int]:
    """(hidden, expert intermediate, experts, top_k) of a dummy preset's MoE layers."""
    from engine.models.moe import num_experts_of
    from engine.weights.dummy import dummy_config

    config = dummy_config(preset)
    intermediate = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    return config.hidden_size, intermediate, num_experts_of(config), config.num_experts_per_tok


def run_fused_moe_bench(hidden: int, intermediate: int, num_experts: int, top_k: int, num_tokens: int,
                        dtype: torch.dtype, iters: int, sweep: bool = False) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(num_tokens, hidden, device=device, dtype=dtype, generator=generator)
    w13 = torch.randn(num_experts, 2 * intermediate, hidden, device=device, dtype=dtype, generator=generator)
    w2 = torch.randn(num_experts, hidden, intermediate, device=device, dtype=dtype, generator=generator)
    w13, w2 = w13 / hidden ** 0.5, w2 / intermediate ** 0.5
    logits = torch.randn(num_tokens, num_experts, device=device, generator=generator)
    weights, ids = select_experts(logits, top_k, renormalize=True)
    out = torch.empty_like(x)

    expected = fused_moe_ref(x.float(), w13.float(), w2.float(), weights, ids)
    max_error = (fused_moe(x, w13, w2, weights, ids, out=out).float() - expected).abs().max().item()
    touched_bytes = ids.unique().numel() * 3 * intermediate * hidden * x.element_size()
    flops = 2 * num_tokens * top_k * 3 * intermediate * hidden
    fused_graph_ms = graph_ms(lambda: fused_moe(x, w13, w2, weights, ids, out=out), iters)
    fused_eager_ms = eager_ms(lambda: fused_moe(x, w13, w2, weights, ids, out=out), iters)
    reference_ms = eager_ms(lambda: fused_moe_ref(x, w13, w2, weights, ids), max(1, iters // 10))
    row = {"num_tokens": num_tokens, "launch": asdict(moe_launch_for(num_tokens * top_k, num_experts)),
           "fused_graph_ms": fused_graph_ms, "fused_eager_ms": fused_eager_ms, "reference_ms": reference_ms,
           "speedup_eager": reference_ms / fused_eager_ms, "weight_gb_per_s": touched_bytes / fused_graph_ms / 1e6,
           "tflops": flops / fused_graph_ms / 1e9, "max_abs_error_vs_float32_reference": max_error}
    if sweep:
        timings = {str(launch): graph_ms(lambda l=launch: fused_moe(x, w13, w2, weights, ids, out=out, launch=l),
                                         iters) for launch in LAUNCH_CHOICES}
        row["sweep_graph_ms"] = timings
        row["best_launch"] = min(timings, key=timings.get)
    return row


def format_table(preset: str, rows: list[dict]) -> str:
    lines = [f"{preset}: fused MoE vs torch reference",
             f"{'tokens':>7} {'graph ms':>9} {'eager ms':>9} {'ref ms':>9} {'speedup':>8} {'GB/s':>7} "
             f"{'TFLOP/s':>8} {'max err':>8}"]
    for row in rows:
        lines.append(f"{row['num_tokens']:>7} {row['fused_graph_ms']:>9.3f} {row['fused_eager_ms']:>9.3f} "
                     f"{row['reference_ms']:>9.3f} {row['speedup_eager']:>7.1f}x {row['weight_gb_per_s']:>7.0f} "
                     f"{row['tflops']:>8.1f} {row['max_abs_error_vs_float32_reference']:>8.1e}")
        if "best_launch" in row:
            lines.append(f"        best: {row['best_launch']} ({row['sweep_graph_ms'][row['best_launch']]:.3f} ms)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.bench.fused_moe", description=__doc__)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--num-tokens", type=int, nargs="+", default=[1, 16, 64, 256, 4096])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--sweep", action="store_true", help="also time every launch in LAUNCH_CHOICES")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (the kernel tests run it on the CPU through the Triton interpreter)")
    results = {}
    for preset in args.presets:
        shape = expert_shape(preset)
        results[preset] = [run_fused_moe_bench(*shape, t, getattr(torch, args.dtype), args.iters, args.sweep)
                           for t in args.num_tokens]
        print(format_table(preset, results[preset]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "device": torch.cuda.get_device_name(), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
