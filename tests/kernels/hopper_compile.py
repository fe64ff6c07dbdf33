"""Compiles every Triton kernel of `kernels/` for sm_90 (H100/H200) through Triton's real compiler and
ptxas, without a GPU: what the interpreter lets through but a GPU would refuse (an op with no
lowering, a type that does not unify, too much shared memory) shows up on any machine.

Each kernel is reached through its own Python wrapper, called with CPU tensors of a real model's
shapes (Llama 3.1 8B, Gemma 2's head size and soft-cap, Mixtral's experts, rank-16 LoRA): while
`compiling_instead_of_launching()` is on, a launch compiles its kernel with the launch's argument
types and constants and runs nothing. CPU tensors would pick the interpreter's loop in the decode
attention kernel (`PIPELINED=query.is_cuda`), so the GPU's choice, True, is compiled instead.
Run in a process without TRITON_INTERPRET (a kernel decorated under it is not compilable):
`python -m tests.kernels.hopper_compile` prints each compiled kernel's PTX size, shared memory and
atomics.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, mangle_type

HOPPER = GPUTarget("cuda", 90, 32)
GPU_CHOICES = {"PIPELINED": True}  # constants a wrapper derives from `tensor.is_cuda`


@dataclass
class CompiledKernel:
    name: str
    case: str
    constants: dict
    ptx_lines: int
    cubin_bytes: int
    shared_bytes: int
    atomics: list[str]

    def __str__(self) -> str:
        atomics = f", {' '.join(self.atomics)}" if self.atomics else ""
        return (f"{self.case}: {self.name}, {self.ptx_lines} PTX lines, {self.cubin_bytes} cubin bytes, "
                f"{self.shared_bytes} B shared{atomics}")


def compile_launch(kernel: JITFunction, args: tuple, kwargs: dict, case: str) -> CompiledKernel:
    """What `kernel[grid](*args, **kwargs)` would compile on an H200, from the launch's own arguments."""
    bound = kernel.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in kernel.arg_names})
    bound.apply_defaults()
    options = {k: v for k, v in kwargs.items() if k not in kernel.arg_names}
    signature, constants = {}, {}
    for index, (param, (name, value)) in enumerate(zip(kernel.params, bound.arguments.items())):
        value = GPU_CHOICES.get(name, value)
        kind = "constexpr" if param.is_constexpr else mangle_type(value)
        signature[name] = kind
        if kind == "constexpr":
            constants[(index,)] = value
        elif isinstance(kind, tuple):  # a tuple argument: its constant members by (argument, member)
            constants.update({(index, member): value[member] for member, k in enumerate(kind) if k == "constexpr"})
    compiled = triton.compile(ASTSource(kernel, signature, constants), target=HOPPER, options=options)
    ptx = compiled.asm["ptx"].splitlines()
    atomics = sorted({line.split()[1] for line in ptx if line.strip().startswith("@") and " atom." in line})
    named = {kernel.arg_names[key[0]]: value for key, value in constants.items() if len(key) == 1}
    return CompiledKernel(kernel.__name__, case, named, len(ptx), len(compiled.asm["cubin"]),
                          compiled.metadata.shared, atomics)


@contextmanager
def compiling_instead_of_launching(compiled: list[CompiledKernel], case: list[str]):
    """While on, every Triton launch appends what it compiles for sm_90 to `compiled` (tagged case[0])."""
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        compiled.append(compile_launch(self, args, kwargs, case[0]))

    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = original


def empty(*shape: int, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype)


def zeros(*shape: int, dtype=torch.int32) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype)


def launch_cases():
    """(case, a call of a kernel wrapper): each launches one or more kernels."""
    from kernels.apply_token_bitmask import apply_token_bitmask
    from kernels.argmax import argmax
    from kernels.fused_add_rms_norm import fused_add_rms_norm
    from kernels.gelu_and_mul import gelu_and_mul
    from kernels.gemv import gemv
    from kernels.paged_decode_attention import paged_decode_attention
    from kernels.paged_prefill_attention import paged_prefill_attention
    from kernels.rotary_and_cache import rotary_and_cache
    from kernels.silu_and_mul import silu_and_mul

    blocks, vocab = 4096, 128256
    llama_cache = empty(blocks, 16, 8, 128)
    gemma_cache = empty(blocks, 16, 8, 256)
    yield "argmax, batch 1", lambda: argmax(empty(1, vocab))
    yield "argmax, batch 1024", lambda: argmax(empty(1024, vocab))
    yield "rms norm with residual", lambda: fused_add_rms_norm(empty(1, 4096), empty(4096), 1e-5, empty(1, 4096))
    yield "rms norm, Gemma's 1 + w", lambda: fused_add_rms_norm(empty(8, 3584), empty(3584), 1e-6, None,
                                                                one_plus_weight=True)
    yield "silu and mul", lambda: silu_and_mul(empty(256, 2 * 14336))
    yield "gelu and mul", lambda: gelu_and_mul(empty(256, 2 * 14336))
    yield "gemv, q/k/v", lambda: gemv(empty(1, 4096), empty(6144, 4096))
    yield "gemv, down with silu", lambda: gemv(empty(1, 2 * 14336), empty(4096, 14336), silu_gated=True)
    yield "gemv, odd width and bias", lambda: gemv(empty(1, 100), empty(37, 100), empty(37))
    rope = empty(4096, 64, dtype=torch.float32)
    yield "rotary and cache", lambda: rotary_and_cache(
        zeros(1, dtype=torch.long), empty(1, 32, 128), empty(1, 8, 128), empty(1, 8, 128), rope, rope, llama_cache,
        llama_cache, zeros(1, dtype=torch.long))
    for batch in (1, 256):
        yield f"decode attention, batch {batch}", lambda batch=batch: paged_decode_attention(
            empty(batch, 32, 128), llama_cache, llama_cache, zeros(batch, 256), zeros(batch), 128 ** -0.5,
            max_seq_len=4096)
    yield "decode attention, Gemma 2 window and soft-cap", lambda: paged_decode_attention(
        empty(4, 16, 256), gemma_cache, gemma_cache, zeros(4, 256), zeros(4), 256 ** -0.5, max_seq_len=4096,
        sliding_window=4096, logits_soft_cap=50.0)
    yield "prefill attention", lambda: paged_prefill_attention(
        empty(512, 32, 128), llama_cache, llama_cache, zeros(2, 256), zeros(2), zeros(3), 128 ** -0.5, 256)
    yield "prefill attention, Gemma 2 window and soft-cap", lambda: paged_prefill_attention(
        empty(512, 16, 256), gemma_cache, gemma_cache, zeros(2, 256), zeros(2), zeros(3), 256 ** -0.5, 256,
        sliding_window=4096, logits_soft_cap=50.0)
    yield "token bitmask", lambda: apply_token_bitmask(empty(4, vocab, dtype=torch.float32),
                                                       zeros(4, -(-vocab // 32)), zeros(4, dtype=torch.long))
    yield from lora_cases()
    yield from moe_cases()


def lora_cases():
    from kernels.lora_expand import lora_expand
    from kernels.lora_expand_per_token import lora_expand_per_token
    from kernels.lora_mapping import LoRATokenMapping
    from kernels.lora_shrink import lora_shrink

    slots, rank, tokens = 8, 16, 64
    mapping = LoRATokenMapping(tokens, slots, "cpu")
    mapping.fill(zeros(tokens))
    qkv_slices = (0, 4096, 5120, 6144)
    yield "LoRA shrink, q/k/v", lambda: lora_shrink(empty(tokens, 4096), empty(slots, 3 * rank, 4096), mapping,
                                                   empty(tokens, 3 * rank, dtype=torch.float32))
    yield "LoRA expand, q/k/v", lambda: lora_expand(empty(tokens, 3 * rank, dtype=torch.float32),
                                                   empty(slots, 6144, rank), mapping, qkv_slices, empty(tokens, 6144))
    yield "LoRA expand per token, q/k/v", lambda: lora_expand_per_token(
        empty(1, slots * 3 * rank), empty(slots, 6144, rank), zeros(1), qkv_slices, empty(1, 6144))


def moe_cases():
    from kernels.fused_moe import fused_moe
    from kernels.moe_align_block_size import moe_align_block_size

    experts, top_k, hidden, inter = 8, 2, 4096, 14336
    yield "MoE align", lambda: moe_align_block_size(zeros(64, top_k), experts, 16)
    yield "fused MoE, Mixtral", lambda: fused_moe(
        empty(64, hidden), empty(experts, 2 * inter, hidden), empty(experts, hidden, inter),
        empty(64, top_k, dtype=torch.float32), zeros(64, top_k))


def compile_all() -> list[CompiledKernel]:
    compiled, case = [], [""]
    with compiling_instead_of_launching(compiled, case):
        for name, call in launch_cases():
            case[0] = name
            call()
    return compiled


def main() -> None:
    for kernel in compile_all():
        print(kernel)


if __name__ == "__main__":
    main()
