"""Micro-benchmark of the batched LoRA kernels: python -m engine.bench.lora_kernels [--json PATH].

For each token count: the LoRA path of one projection (mapping fill + shrink + expand) against the
base layer's own `F.linear`, and against the torch reference, with tokens spread over every slot.
On CUDA the Triton path and the linear are timed as replays of a CUDA graph holding `--iters`
calls, as the engine's decode graphs run them (no launch overhead); the reference, which reads
slot groups back to the host, is timed eagerly. Shrink alone is also timed for several SPLIT_K.
`--one-token` times instead the batch-1 path of engine/lora/layers.py on a projection: the base
weight with every slot's A stacked under it in one product (`linear`, as the model runs it), then
lora_expand_per_token for several BLOCK_N, against the base layer's own product.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
import torch.nn.functional as F

from engine.bench.kernel_report import report
from engine.bench.timing import eager_ms, graph_ms
from engine.layers.linear import linear
from kernels.lora_expand import lora_expand
from kernels.lora_expand_per_token import lora_expand_per_token
from kernels.lora_mapping import LoRATokenMapping
from kernels.lora_ref import lora_expand_ref, lora_shrink_ref
from kernels.lora_shrink import lora_shrink, shrink_launch_for

SPLIT_K_CHOICES = (1, 4, 8, 16)


def run_lora_kernels_bench(num_tokens: int, num_slots: int, rank: int, num_slices: int, in_features: int,
                           out_features: int, dtype: torch.dtype, iters: int) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(num_tokens, in_features, device=device, dtype=dtype)
    weight = torch.randn(out_features * num_slices, in_features, device=device, dtype=dtype) / in_features ** 0.5
    lora_a = torch.randn(num_slots, num_slices * rank, in_features, device=device, dtype=dtype) / in_features ** 0.5
    lora_b = torch.randn(num_slots, out_features * num_slices, rank, device=device, dtype=dtype) / rank ** 0.5
    slice_starts = tuple(j * out_features for j in range(num_slices + 1))
    token_slots = (torch.arange(num_tokens, device=device) % num_slots).to(torch.int32)
    mapping = LoRATokenMapping(num_tokens, num_slots, device)
    shrunk = torch.empty(num_tokens, num_slices * rank, device=device)
    out = torch.zeros(num_tokens, out_features * num_slices, device=device, dtype=dtype)

    def lora_path():
        mapping.fill(token_slots)
        lora_shrink(x, lora_a, mapping, shrunk)
        lora_expand(shrunk, lora_b, mapping, slice_starts, out)

    def reference_path():
        mapping.fill(token_slots)
        lora_shrink_ref(x, lora_a, mapping, shrunk)
        lora_expand_ref(shrunk, lora_b, mapping, slice_starts, out)

    mapping.fill(token_slots)
    expected = lora_expand_ref(lora_shrink_ref(x, lora_a, mapping, torch.empty_like(shrunk)), lora_b, mapping,
                               slice_starts, torch.zeros_like(out))
    lora_path()
    max_error = (out.float() - expected.float()).abs().max().item()

    base_ms = graph_ms(lambda: F.linear(x, weight), iters)
    lora_ms = graph_ms(lora_path, iters)
    default = shrink_launch_for(num_tokens, num_slices * rank, in_features)
    shrink_ms = {split_k: graph_ms(lambda s=split_k: lora_shrink(x, lora_a, mapping, shrunk,
                                                                 launch=replace(default, split_k=s)), iters)
                 for split_k in SPLIT_K_CHOICES}
    return {"num_tokens": num_tokens, "base_linear_ms": base_ms, "lora_ms": lora_ms,
            "lora_over_base": lora_ms / base_ms, "reference_ms": eager_ms(reference_path, max(1, iters // 10)),
            "default_split_k": default.split_k, "shrink_ms_by_split_k": shrink_ms,
            "max_abs_error_vs_reference": max_error}


def run_one_token_bench(num_slots: int, rank: int, num_slices: int, in_features: int, out_features: int,
                        dtype: torch.dtype, iters: int) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, rank_width = out_features * num_slices, num_slices * rank
    x = torch.randn(1, in_features, device=device, dtype=dtype)
    stacked = torch.randn(rows + num_slots * rank_width, in_features, device=device, dtype=dtype) / in_features ** 0.5
    lora_b = torch.randn(num_slots, rows, rank, device=device, dtype=dtype) / rank ** 0.5
    slice_starts = tuple(j * out_features for j in range(num_slices + 1))
    token_slots = torch.tensor([num_slots - 1], dtype=torch.int32, device=device)

    def one_token(block_n):
        y = linear(x, stacked)
        lora_expand_per_token(y[:, rows:], lora_b, token_slots, slice_starts, y[:, :rows], block_n=block_n)

    return {"num_slices": num_slices, "in_features": in_features, "out_features": out_features,
            "base_linear_ms": graph_ms(lambda: linear(x, stacked[:rows]), iters),
            "stacked_linear_ms": graph_ms(lambda: linear(x, stacked), iters),
            "stacked_and_expand_ms_by_block_n": {n: graph_ms(lambda n=n: one_token(n), iters)
                                                 for n in (64, 128, 256, 512)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.bench.lora_kernels", description=__doc__)
    parser.add_argument("--num-tokens", type=int, nargs="+", default=[1, 16, 256, 1024])
    parser.add_argument("--num-slots", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--num-slices", type=int, default=1, help="3 for a merged q/k/v, 2 for gate/up")
    parser.add_argument("--in-features", type=int, default=4096)
    parser.add_argument("--out-features", type=int, default=4096, help="per slice")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--one-token", action="store_true", help="the stacked batch-1 path instead")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.one_token:
        results = [run_one_token_bench(args.num_slots, args.rank, args.num_slices, args.in_features,
                                       args.out_features, dtype, args.iters)]
    else:
        results = [run_lora_kernels_bench(t, args.num_slots, args.rank, args.num_slices, args.in_features,
                                          args.out_features, dtype, args.iters) for t in args.num_tokens]
    return report(results, args)


if __name__ == "__main__":
    raise SystemExit(main())
