"""Micro-benchmark of a decoder layer's ops at a step's token count: python -m engine.bench.layer_ops.

Times each op of a Llama 3.1 8B layer alone at the token counts a step has (a decode batch of 256 or
1,024 sequences, prefill steps of 4,096 and 16,384 tokens), as replays of a CUDA graph: the four
projections through cuBLAS (`F.linear`, as the model calls it) with their TFLOP/s, and the Triton
SiLU-and-mul and fused add + RMSNorm with their TB/s; `--chunk-tokens` also times each projection in
row chunks. Set against `step_profile`'s device time by kind, it says whether the GEMMs in a run fall
short of what cuBLAS does alone (on the H200, 2026-12-05: the runs' 678-696 TFLOP/s is what gate_up
and down reach alone at 16,384 tokens, 760-830 at 1,024, and chunks do not help; benchmarks/RESULTS.md).
Each call reads another copy of the weight (as a model whose layers each have their own), so the 50 MB
L2 never holds it. On the CPU it runs eagerly (a smoke run, not a figure).
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from engine.bench.kernel_report import report
from engine.bench.timing import graph_ms

LLAMA_8B_PROJECTIONS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
LLAMA_8B_HIDDEN, LLAMA_8B_INTERMEDIATE = 4096, 14336


def time_projection(name: str, out_features: int, in_features: int, num_tokens: int, dtype: torch.dtype,
                    device: str, iters: int, chunk_tokens: int | None = None) -> dict:
    """One projection's GEMM; with `chunk_tokens`, as GEMMs of at most that many rows into one output
    (does cuBLAS do better on a large step's rows in pieces?)."""
    nbytes = out_features * in_features * dtype.itemsize
    copies = max(2, -(-300_000_000 // nbytes)) if device == "cuda" else 1
    weights = [torch.randn(out_features, in_features, device=device, dtype=dtype) for _ in range(copies)]
    x = torch.randn(num_tokens, in_features, device=device, dtype=dtype)
    turn = itertools.count()
    if chunk_tokens:
        out = torch.empty(num_tokens, out_features, device=device, dtype=dtype)
        pieces = [(x[i:i + chunk_tokens], out[i:i + chunk_tokens]) for i in range(0, num_tokens, chunk_tokens)]

        def run():
            weight = weights[next(turn) % copies].t()
            for rows, into in pieces:
                torch.mm(rows, weight, out=into)

        ms = graph_ms(run, iters)
        name = f"{name}/{chunk_tokens}"
    else:
        ms = graph_ms(lambda: F.linear(x, weights[next(turn) % copies]), iters)
    flops = 2.0 * num_tokens * out_features * in_features
    return {"op": name, "tokens": num_tokens, "shape": [out_features, in_features], "us": ms * 1e3,
            "tflops": flops / ms / 1e9}


def time_elementwise(name: str, fn, bytes_moved: int, num_tokens: int, iters: int) -> dict:
    ms = graph_ms(fn, iters)
    return {"op": name, "tokens": num_tokens, "us": ms * 1e3, "tb_per_s": bytes_moved / ms / 1e9}


def layer_rows(num_tokens: int, dtype: torch.dtype, device: str, iters: int,
               chunk_tokens: int | None = None) -> list[dict]:
    from engine.layers.activation import apply_silu_and_mul
    from engine.layers.norm import RMSNorm

    rows = [time_projection(name, *shape, num_tokens, dtype, device, iters)
            for name, shape in LLAMA_8B_PROJECTIONS.items()]
    if chunk_tokens and num_tokens > chunk_tokens:
        rows += [time_projection(name, *shape, num_tokens, dtype, device, iters, chunk_tokens)
                 for name, shape in LLAMA_8B_PROJECTIONS.items()]
    size = dtype.itemsize
    gate_up = torch.randn(num_tokens, 2 * LLAMA_8B_INTERMEDIATE, device=device, dtype=dtype)
    rows.append(time_elementwise("silu_and_mul", lambda: apply_silu_and_mul(gate_up),
                                 3 * num_tokens * LLAMA_8B_INTERMEDIATE * size, num_tokens, iters))
    norm = RMSNorm(LLAMA_8B_HIDDEN).to(device=device, dtype=dtype)
    hidden = torch.randn(num_tokens, LLAMA_8B_HIDDEN, device=device, dtype=dtype)
    residual = torch.randn_like(hidden)
    rows.append(time_elementwise("add_rms_norm", lambda: norm(hidden, residual),
                                 4 * num_tokens * LLAMA_8B_HIDDEN * size, num_tokens, iters))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.bench.layer_ops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--chunk-tokens", type=int, default=None,
                        help="also time each projection in GEMMs of at most this many rows (steps larger than it)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    return report([row for num_tokens in args.tokens for row in layer_rows(num_tokens, dtype, device, args.iters,
                                                                                 args.chunk_tokens)],
                  args)


if __name__ == "__main__":
    raise SystemExit(main())
