"""The Triton LoRA shrink against its torch reference, and the reference against a per-token loop.

Poison: NaN in the inputs of tokens without an adapter and in the A matrices of slots without
tokens (never to be read), NaN in `out` (every element must be written), garbage past the
mapping's filled entries."""

import pytest
import torch

from kernels.lora_ref import lora_shrink_ref
from kernels.lora_shrink import ShrinkLaunch, lora_shrink
from tests.kernels.kernel_testing import DEVICE, DTYPES, assert_matches, gpu_only, randn
from tests.kernels.test_lora_mapping import filled_mapping, random_slots


def shrink_case(token_slots: list[int], num_slots: int, in_features: int, rank_width: int, dtype, seed: int = 0):
    """(x, lora_a, mapping) with every part the kernel must not read set to NaN."""
    mapping = filled_mapping(token_slots, num_slots)
    x = randn(len(token_slots), in_features, dtype=dtype, seed=seed)
    lora_a = randn(num_slots, rank_width, in_features, dtype=dtype, seed=seed + 1) / in_features ** 0.5
    slots = torch.tensor(token_slots, dtype=torch.long, device=DEVICE)
    x[slots == -1] = float("nan")
    unused = [s for s in range(num_slots) if s not in token_slots]
    lora_a[unused] = float("nan")
    return x, lora_a, mapping


def check(token_slots, num_slots, in_features, rank_width, dtype, launch=None, seed=0):
    x, lora_a, mapping = shrink_case(token_slots, num_slots, in_features, rank_width, dtype, seed)
    out = torch.full((len(token_slots), rank_width), float("nan"), device=DEVICE)
    assert lora_shrink(x, lora_a, mapping, out, launch=launch) is out
    expected = lora_shrink_ref(x, lora_a, mapping, torch.full_like(out, float("nan")))
    assert_matches(out, expected, dtype)
    no_adapter = torch.tensor(token_slots, device=DEVICE) == -1
    assert torch.equal(out[no_adapter], torch.zeros_like(out[no_adapter]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("token_slots, num_slots, in_features, rank_width", [
    ([1], 2, 32, 8),                                          # one token; slot 0 empty; rank below a tile
    ([-1], 2, 32, 16),                                        # one token without an adapter
    ([2, -1, 0, 2, -1, 3, 2], 4, 100, 48),                    # odd in_features; 3 slices of rank 16
    ([1] * 40, 3, 64, 16),                                    # all tokens on one slot, two token tiles
    (random_slots(40, 3, seed=4, empty_slot=1), 3, 300, 24),  # several token tiles, odd rank width
])
def test_matches_reference(dtype, token_slots, num_slots, in_features, rank_width):
    check(token_slots, num_slots, in_features, rank_width, dtype)


@pytest.mark.parametrize("split_k", [1, 3])
def test_split_k_adds_up_and_no_split_writes_zeros(split_k):
    """in_features 100 in K tiles of 32: 4 tiles over 3 splits, one split with two tiles; ~20 tokens
    per slot in tiles of 16; 20 rank columns in tiles of 16."""
    launch = ShrinkLaunch(block_m=16, block_n=16, block_k=32, split_k=split_k)
    check(random_slots(60, 3, seed=5, empty_slot=1), 3, 100, 20, torch.float32, launch=launch)


def test_reference_is_a_per_token_product():
    token_slots = [2, -1, 0, 2, 1]
    x, lora_a, mapping = shrink_case(token_slots, 3, 12, 6, torch.float32, seed=7)
    out = lora_shrink_ref(x, lora_a, mapping, torch.full((5, 6), float("nan"), device=DEVICE))
    for t, slot in enumerate(token_slots):
        expected = torch.zeros(6, device=DEVICE) if slot == -1 else lora_a[slot] @ x[t]
        torch.testing.assert_close(out[t], expected)


@gpu_only
@pytest.mark.parametrize("num_tokens", [1, 16, 256, 1024])
def test_bfloat16_llama_sizes_on_gpu(num_tokens):
    check(random_slots(num_tokens, 8, seed=num_tokens), 8, 4096, 3 * 16, torch.bfloat16)
