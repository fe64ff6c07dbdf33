"""The fused LoRA shrink + expand against shrink_ref then expand_ref, and (on CUDA) captured with the
mapping fill in a CUDA graph and replayed for new slots.

Poison: NaN in the x rows of tokens without an adapter and in the A and B matrices of slots without
tokens (never to be read), garbage past the mapping's filled entries; `out` starts random, and the
rows of tokens without an adapter must come back bit-identical."""

import pytest
import torch

from kernels.lora_mapping import LoRATokenMapping
from kernels.lora_ref import lora_shrink_expand_ref
from kernels.lora_shrink_expand import ShrinkExpandLaunch, lora_shrink_expand
from tests.kernels.kernel_testing import (DEVICE, DTYPES, TOLERANCE, assert_matches, capture_cuda_graph, gpu_only,
                                          randn)
from tests.kernels.test_lora_mapping import filled_mapping, random_slots


def fused_case(token_slots: list[int], num_slots: int, in_features: int, slice_starts: tuple[int, ...],
               max_rank: int, dtype, seed: int = 0):
    """(x, lora_a, lora_b, mapping, out) with every part the kernel must not read set to NaN."""
    num_tokens, num_slices = len(token_slots), len(slice_starts) - 1
    mapping = filled_mapping(token_slots, num_slots)
    x = randn(num_tokens, in_features, dtype=dtype, seed=seed)
    lora_a = randn(num_slots, num_slices * max_rank, in_features, dtype=dtype, seed=seed + 1) / in_features ** 0.5
    lora_b = randn(num_slots, slice_starts[-1], max_rank, dtype=dtype, seed=seed + 2) / max_rank ** 0.5
    out = randn(num_tokens, slice_starts[-1], dtype=dtype, seed=seed + 3)
    x[torch.tensor(token_slots, device=DEVICE) == -1] = float("nan")
    unused = [s for s in range(num_slots) if s not in token_slots]
    lora_a[unused] = float("nan")
    lora_b[unused] = float("nan")
    return x, lora_a, lora_b, mapping, out


def check(token_slots, num_slots, in_features, slice_starts, max_rank, dtype, launch=None, seed=0):
    x, lora_a, lora_b, mapping, out = fused_case(token_slots, num_slots, in_features, slice_starts, max_rank,
                                                 dtype, seed)
    base = out.clone()
    assert lora_shrink_expand(x, lora_a, lora_b, mapping, slice_starts, out, launch=launch) is out
    expected = lora_shrink_expand_ref(x, lora_a, lora_b, mapping, slice_starts, base.clone())
    no_adapter = torch.tensor(token_slots, device=DEVICE) == -1
    assert_matches(out[~no_adapter], expected[~no_adapter], dtype)
    assert torch.equal(out[no_adapter], base[no_adapter])  # bit-identical (NaN x never read)
    if not no_adapter.all():
        assert not torch.equal(out[~no_adapter], base[~no_adapter])  # added, not skipped


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("token_slots, num_slots, in_features, slice_starts, max_rank", [
    ([1], 2, 300, (0, 24), 8),                                                 # T=1, slot 0 empty, small rank
    ([-1], 2, 64, (0, 16), 16),                                                # T=1 without an adapter
    ([2, -1, 0], 4, 517, (0, 37, 50, 63), 16),                                 # T=3, q/k/v-like odd slices
    (random_slots(17, 3, seed=4, empty_slot=1), 3, 129, (0, 70, 141), 24),     # T=17, gate/up-like, rank 24
    (random_slots(17, 2, seed=6), 2, 96, (0, 90), 16),                         # T=17, one slice
])
def test_matches_shrink_then_expand(dtype, token_slots, num_slots, in_features, slice_starts, max_rank):
    check(token_slots, num_slots, in_features, slice_starts, max_rank, dtype)


def test_small_tiles_loop_over_input_and_rows():
    """K tiles of 32 over 200 inputs (7 steps), row tiles of 16 over slices of 45 and 7, 30 tokens a slot
    in tiles of 16."""
    launch = ShrinkExpandLaunch(block_m=16, block_n=16, block_k=32)
    check(random_slots(60, 2, seed=5), 2, 200, (0, 45, 52), 16, torch.float32, launch=launch)


def test_accumulates_into_out_twice():
    """Two calls add the delta twice: out is read, not overwritten."""
    token_slots, slice_starts = [0, 1, -1, 1], (0, 20, 33)
    x, lora_a, lora_b, mapping, out = fused_case(token_slots, 2, 48, slice_starts, 16, torch.float32, seed=9)
    expected = out.clone()
    for _ in range(2):
        lora_shrink_expand(x, lora_a, lora_b, mapping, slice_starts, out)
        lora_shrink_expand_ref(x, lora_a, lora_b, mapping, slice_starts, expected)
    assert_matches(out, expected, torch.float32)


def test_one_mapping_refilled_for_steps_of_different_sizes():
    """As graph replay does: one mapping, filled for 20 tokens, then 1, then 13; the kernel must read
    only the current step's entries."""
    num_slots, in_features, max_rank, slice_starts = 3, 40, 8, (0, 24, 32)
    mapping = LoRATokenMapping(20, num_slots, DEVICE)
    lora_a = randn(num_slots, 2 * max_rank, in_features, dtype=torch.float32, seed=1)
    lora_b = randn(num_slots, slice_starts[-1], max_rank, dtype=torch.float32, seed=2)
    for seed, num_tokens in enumerate((20, 1, 13)):
        token_slots = random_slots(num_tokens, num_slots, seed=seed) if num_tokens > 1 else [2]
        mapping.fill(torch.tensor(token_slots, dtype=torch.int32, device=DEVICE))
        x = randn(num_tokens, in_features, dtype=torch.float32, seed=seed + 3)
        base = randn(num_tokens, slice_starts[-1], dtype=torch.float32, seed=seed + 4)
        out = lora_shrink_expand(x, lora_a, lora_b, mapping, slice_starts, base.clone())
        expected = lora_shrink_expand_ref(x, lora_a, lora_b, filled_mapping(token_slots, num_slots), slice_starts,
                                          base.clone())
        assert_matches(out, expected, torch.float32)


@gpu_only
@pytest.mark.parametrize("in_features, slice_starts", [
    (4096, (0, 4096)),                 # o_proj
    (4096, (0, 4096, 5120, 6144)),     # qkv_proj
    (4096, (0, 14336, 28672)),         # gate_up_proj
    (14336, (0, 4096)),                # down_proj
])
@pytest.mark.parametrize("num_tokens", [1, 16, 32])
def test_bfloat16_llama_sizes_on_gpu(num_tokens, in_features, slice_starts):
    check(random_slots(num_tokens, 8, seed=num_tokens), 8, in_features, slice_starts, 16, torch.bfloat16)


@gpu_only
def test_cuda_graph_replays_fill_and_fused_kernel_for_new_slots():
    """The model runner captures the whole LoRA path once and replays it with other slots each step."""
    num_slots, slice_starts, dtype = 4, (0, 128, 192, 256), torch.bfloat16
    # Every slot used and no token without one: nothing poisoned.
    x, lora_a, lora_b, mapping, base = fused_case(list(range(num_slots)) * 2, num_slots, 256, slice_starts, 16, dtype)
    num_tokens = x.shape[0]
    slots_input = torch.full((num_tokens,), -1, dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(base)

    def step():
        mapping.fill(slots_input)
        out.copy_(base)
        lora_shrink_expand(x, lora_a, lora_b, mapping, slice_starts, out)

    graph = capture_cuda_graph(step)
    for token_slots in [random_slots(num_tokens, num_slots, seed=10),
                        random_slots(num_tokens, num_slots, seed=11, empty_slot=2),
                        [-1] * num_tokens]:
        slots_input.copy_(torch.tensor(token_slots, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        expected = lora_shrink_expand_ref(x, lora_a, lora_b, filled_mapping(token_slots, num_slots), slice_starts,
                                          base.clone())
        torch.testing.assert_close(out.float(), expected.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
