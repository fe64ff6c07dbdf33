"""Compiles Triton kernels for sm_90 (H100/H200) through Triton's real compiler and ptxas, without a
GPU: what the interpreter lets through but a GPU would refuse (a loop-carried value changing type, an
op with no lowering, too much shared memory) shows up on any machine. Run in a process without
TRITON_INTERPRET (kernels decorated under it are not compilable); `python -m tests.kernels.hopper_compile`
prints each kernel's PTX size, shared memory and atomics."""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HOPPER = GPUTarget("cuda", 90, 32)


def compile_for_hopper(kernel, signature: dict[str, str], constants: dict, **options):
    """`signature`: each runtime argument's type ("*bf16", "i32", ...); `constants`: each constexpr's value."""
    arguments = dict(signature) | {name: "constexpr" for name in constants}
    assert list(arguments) == kernel.arg_names or set(arguments) == set(kernel.arg_names), kernel.arg_names
    source = ASTSource(kernel, arguments, {(kernel.arg_names.index(name),): value for name, value in constants.items()})
    return triton.compile(source, target=HOPPER, options=options)


def decode_attention_cases():
    from kernels.paged_decode_attention import _paged_decode_kernel

    pointers = {"out_ptr": "*bf16", "partial_out_ptr": "*fp32", "partial_max_ptr": "*fp32", "partial_sum_ptr": "*fp32",
                "counters_ptr": "*i32", "q_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16",
                "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "scale": "fp32", "window": "i32",
                "soft_cap": "fp32"}
    strides = {name: "i32" for name in ("stride_ob", "stride_oh", "stride_qb", "stride_qh", "stride_cb", "stride_ct",
                                        "stride_ch", "stride_bt")}
    llama = {"NUM_HEADS": 32, "NUM_KV_HEADS": 8, "GROUP": 4, "GROUP_PAD": 16, "HEAD_DIM": 128, "HEAD_DIM_PAD": 128,
             "BLOCK_SIZE": 16, "TILE": 64, "MIN_TILES": 4, "PIPELINED": True, "NUM_STAGES": 3}
    for splits, sliding, soft_cap in ((16, False, False), (1, False, False), (8, True, True)):
        yield (f"paged decode attention, {splits} splits, sliding {sliding}", _paged_decode_kernel,
               pointers | strides, llama | {"NUM_SPLITS": splits, "SLIDING": sliding, "SOFT_CAP": soft_cap}, {})


def cases():
    """(name, kernel, signature, constants, options) for every kernel this checks, at Llama 8B's shapes."""
    from kernels.argmax import _argmax_chunk_kernel, _argmax_pick_kernel
    from kernels.gemv import _gemv_kernel
    from kernels.rotary_and_cache import _rotary_and_cache_kernel

    argmax = {"logits_ptr": "*bf16", "partial_value_ptr": "*fp32", "partial_index_ptr": "*i32", "out_ptr": "*i64",
              "stride_row": "i32"}
    yield ("argmax, chunks", _argmax_chunk_kernel, argmax,
           {"VOCAB": 128256, "CHUNK": 4096, "NUM_CHUNKS": 32, "BLOCK": 2048}, {"num_warps": 8})
    yield ("argmax, a row a program", _argmax_chunk_kernel, argmax | {"logits_ptr": "*fp32"},
           {"VOCAB": 128256, "CHUNK": 129024, "NUM_CHUNKS": 1, "BLOCK": 2048}, {"num_warps": 8})
    yield ("argmax, pick", _argmax_pick_kernel,
           {"partial_value_ptr": "*fp32", "partial_index_ptr": "*i32", "out_ptr": "*i64"},
           {"VOCAB": 128256, "NUM_CHUNKS": 32, "CHUNKS_PAD": 32}, {})
    yield from decode_attention_cases()
    strides = {name: "i32" for name in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                                        "stride_cb", "stride_ct", "stride_ch", "stride_cos")}
    yield ("rotary and cache", _rotary_and_cache_kernel,
           {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "key_cache_ptr": "*bf16", "value_cache_ptr": "*bf16",
            "slot_mapping_ptr": "*i64", "positions_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32"}
           | strides | {"num_q_heads": "i32", "num_kv_heads": "i32"},
           {"BLOCK_SIZE": 16, "Q_HEADS_PAD": 32, "KV_HEADS_PAD": 8, "HALF": 64, "HALF_PAD": 64}, {})
    gemv = {"w_ptr": "*bf16", "x_ptr": "*bf16", "bias_ptr": "*bf16", "y_ptr": "*bf16", "N": "i32", "stride_w": "i32"}
    for gated in (False, True):
        yield (f"gemv, down projection, silu_gated {gated}", _gemv_kernel, gemv,
               {"K": 14336, "HAS_BIAS": False, "EVEN_N": True, "EVEN_K": True, "SILU_GATED": gated, "BLOCK_N": 8,
                "BLOCK_K": 1024}, {"num_stages": 3})


def main() -> None:
    for name, kernel, signature, constants, options in cases():
        compiled = compile_for_hopper(kernel, signature, constants, **options)
        ptx = compiled.asm["ptx"]
        atomics = sorted({line.split()[1] for line in ptx.splitlines() if line.strip().startswith("@") and " atom." in line})
        print(f"{name}: {len(ptx.splitlines())} PTX lines, {len(compiled.asm['cubin'])} cubin bytes, "
              f"{compiled.metadata.shared} B shared{', ' + ' '.join(atomics) if atomics else ''}")


if __name__ == "__main__":
    main()
