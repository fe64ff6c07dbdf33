"""The plain-torch LoRA shrink and expand: the CPU path of engine/lora/layers.py and the oracle of the
Triton kernels in lora_shrink.py / lora_expand.py (kept apart from them so CPU runs never import
Triton). One matmul per adapter slot over the tokens that use it.
"""

from __future__ import annotations

import torch

from kernels.lora_mapping import LoRATokenMapping


def lora_shrink_ref(x: torch.Tensor, lora_a: torch.Tensor, mapping: LoRATokenMapping,
                    out: torch.Tensor) -> torch.Tensor:
    """x `[T, in]`; lora_a `[num_slots, num_slices * max_rank, in]`; out `[T, num_slices * max_rank]`
    float32, written: lora_a[slot[t]] @ x[t] in float32, zero where slot[t] is -1."""
    assert x.shape[0] == mapping.num_tokens
    out.zero_()
    for slot, tokens in mapping.slot_token_groups():
        out[tokens] = x[tokens].float() @ lora_a[slot].float().T
    return out



def lora_expand_ref(y: torch.Tensor, lora_b: torch.Tensor, mapping: LoRATokenMapping,
                    slice_starts: tuple[int, ...], out: torch.Tensor, y_per_slot: bool = False) -> torch.Tensor:
    """y `[T, num_slices * max_rank]` float32; lora_b `[num_slots, out_features, max_rank]`;
    slice_starts: output-row boundaries of the slices (0, ..., out_features); out `[T, out_features]`
    accumulated in place: rows of slice j += lora_b[slot[t], rows] @ y[t, j * max_rank:(j + 1) * max_rank].
    `y_per_slot`: y is `[T, num_slots * num_slices * max_rank]`, every slot's shrink, and token t reads
    the block of slot[t]."""
    assert y.shape[0] == mapping.num_tokens
    max_rank = lora_b.shape[2]
    rank_width = (len(slice_starts) - 1) * max_rank
    for slot, tokens in mapping.slot_token_groups():
        first = slot * rank_width if y_per_slot else 0
        for j, (start, end) in enumerate(zip(slice_starts, slice_starts[1:])):
            shrunk = y[tokens, first + j * max_rank:first + (j + 1) * max_rank].to(lora_b.dtype).float()
            delta = shrunk @ lora_b[slot, start:end].float().T
            out[tokens, start:end] = (out[tokens, start:end].float() + delta).to(out.dtype)
    return out
