"""Micro-benchmark of one-token linear layers: python -m engine.bench.gemv [--json PATH].

For each shape (default: Llama 3.1 8B's q/k/v, o, gate/up, down and LM head), cuBLAS (`F.linear`)
against kernels/gemv.py at its default launch and at the best of a sweep, timed as replays of a CUDA
graph as the decode graphs run them. Each call reads another copy of the weight, enough copies to
pass 300 MB, so the L2 cache (50 MB on an H100/H200) never holds the next call's weight, as in a
model whose every layer has its own. A down projection's shape (input 14,336 wide, or any with
`--silu-gated`) also times the GEMV that applies SiLU-and-multiply as it reads the gate/up
projection against the activation kernel followed by the plain GEMV, as the model ran it before. CUDA only.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from engine.bench.kernel_report import report
from engine.bench.timing import graph_ms

LLAMA_8B_SHAPES = ["6144x4096", "4096x4096", "28672x4096", "4096x14336", "128256x4096"]


def run_gemv_bench(out_features: int, in_features: int, dtype: torch.dtype, iters: int, sweep: bool,
                   silu_gated: bool = False) -> dict:
    from kernels.gemv import GemvLaunch, gemv, gemv_launch_for
    from kernels.silu_and_mul import silu_and_mul

    nbytes = out_features * in_features * dtype.itemsize
    copies = max(2, -(-300_000_000 // nbytes))
    weights = [torch.randn(out_features, in_features, device="cuda", dtype=dtype) / in_features ** 0.5
               for _ in range(copies)]
    x = torch.randn(1, in_features, device="cuda", dtype=dtype)
    turn = itertools.count()

    def timed_us(linear) -> float:
        return graph_ms(lambda: linear(x, weights[next(turn) % copies]), iters) * 1e3

    expected = F.linear(x, weights[0]).float()
    error = (gemv(x, weights[0]).float() - expected).abs().max().item()
    row = {"shape": [out_features, in_features], "cublas_us": timed_us(F.linear), "gemv_us": timed_us(gemv),
           "default_launch": vars(gemv_launch_for(out_features, in_features)), "max_abs_error": error}
    if silu_gated:
        gate_up = torch.randn(1, 2 * in_features, device="cuda", dtype=dtype)
        row["silu_then_gemv_us"] = timed_us(lambda _, w: gemv(silu_and_mul(gate_up), w))
        row["silu_gated_gemv_us"] = timed_us(lambda _, w: gemv(gate_up, w, silu_gated=True))
    if sweep:
        tried = {}
        for block_n, block_k, warps, stages in itertools.product((2, 4, 8, 16), (256, 512, 1024), (4, 8), (3,)):
            if block_n * block_k <= 8192:
                launch = GemvLaunch(block_n, block_k, warps, stages)
                tried[launch] = timed_us(lambda a, w, launch=launch: gemv(a, w, launch=launch))
        best = min(tried, key=tried.get)
        row |= {"best_us": tried[best], "best_launch": vars(best)}
    for name in ("cublas", "gemv", "best"):
        if f"{name}_us" in row:
            row[f"{name}_TB_per_s"] = nbytes / row[f"{name}_us"] / 1e6
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.bench.gemv", description=__doc__)
    parser.add_argument("--shapes", nargs="+", default=LLAMA_8B_SHAPES, help="OUTxIN")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--sweep", action="store_true", help="also time a sweep of launches")
    parser.add_argument("--silu-gated", action="store_true", help="time the SiLU-gated GEMV at every shape")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    args = parser.parse_args(argv)
    shapes = [tuple(map(int, shape.split("x"))) for shape in args.shapes]
    return report([run_gemv_bench(out_features, in_features, getattr(torch, args.dtype), args.iters, args.sweep,
                                  args.silu_gated or in_features == 14336)
                   for out_features, in_features in shapes], args)


if __name__ == "__main__":
    raise SystemExit(main())
