"""The Triton LoRA expand against its torch reference, the reference against a per-token loop, and
(on CUDA) mapping + shrink + expand captured in a CUDA graph and replayed for new slots.

Poison: NaN in the shrunk rows of tokens without an adapter and in the B matrices of slots without
tokens (never to be read), garbage past the mapping's filled entries; `out` starts random, and the
rows of tokens without an adapter must come back bit-identical."""

import pytest
import torch

from kernels.lora_expand import ExpandLaunch, lora_expand
from kernels.lora_expand_per_token import lora_expand_per_token
from kernels.lora_mapping import LoRATokenMapping
from kernels.lora_ref import lora_expand_ref, lora_shrink_ref
from kernels.lora_shrink import lora_shrink
from tests.kernels.kernel_testing import DEVICE, DTYPES, TOLERANCE, assert_matches, gpu_only, randn
from tests.kernels.test_lora_mapping import filled_mapping, random_slots


def expand_case(token_slots: list[int], num_slots: int, slice_starts: tuple[int, ...], max_rank: int, dtype,
                seed: int = 0):
    """(y, lora_b, mapping, out) with every part the kernel must not read set to NaN."""
    num_tokens, num_slices = len(token_slots), len(slice_starts) - 1
    mapping = filled_mapping(token_slots, num_slots)
    y = randn(num_tokens, num_slices * max_rank, dtype=torch.float32, seed=seed)
    lora_b = randn(num_slots, slice_starts[-1], max_rank, dtype=dtype, seed=seed + 1) / max_rank ** 0.5
    out = randn(num_tokens, slice_starts[-1], dtype=dtype, seed=seed + 2)
    y[torch.tensor(token_slots, device=DEVICE) == -1] = float("nan")
    lora_b[[s for s in range(num_slots) if s not in token_slots]] = float("nan")
    return y, lora_b, mapping, out


def check(token_slots, num_slots, slice_starts, max_rank, dtype, launch=None, seed=0):
    y, lora_b, mapping, out = expand_case(token_slots, num_slots, slice_starts, max_rank, dtype, seed)
    base = out.clone()
    assert lora_expand(y, lora_b, mapping, slice_starts, out, launch=launch) is out
    expected = lora_expand_ref(y, lora_b, mapping, slice_starts, base.clone())
    assert_matches(out, expected, dtype)
    no_adapter = torch.tensor(token_slots, device=DEVICE) == -1
    assert torch.equal(out[no_adapter], base[no_adapter])
    if not no_adapter.all():
        assert not torch.equal(out[~no_adapter], base[~no_adapter])  # added, not skipped


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("token_slots, num_slots, slice_starts, max_rank", [
    ([1], 2, (0, 24), 8),                                              # one token; slot 0 empty; small rank
    ([-1], 2, (0, 16), 16),                                            # one token without an adapter
    ([2, -1, 0, 2, -1, 3, 2], 4, (0, 37, 50, 63), 16),                 # q/k/v-like slices of odd widths
    ([1] * 40, 3, (0, 130, 150), 16),                                  # one slot, two token tiles, a wide slice
    (random_slots(40, 3, seed=4, empty_slot=1), 3, (0, 70, 140), 24),  # rank not a power of two
])
def test_matches_reference(dtype, token_slots, num_slots, slice_starts, max_rank):
    check(token_slots, num_slots, slice_starts, max_rank, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("token_slots, max_rank, block_n", [
    ([2], 16, None), ([-1], 16, None), ([0, 2, -1, 2], 16, None),
    ([1, 0], 24, 16),  # rank not a power of two; programs of 16 rows, some across a slice boundary
])
def test_every_slots_shrink_side_by_side_reads_the_tokens_own(dtype, token_slots, max_rank, block_n):
    """`y_per_slot` (lora_expand_per_token.py's kernel): y holds every slot's rank block (a stacked base
    GEMM's extra columns, in the model's dtype); a token reads its slot's, and the other slots' blocks
    are NaN."""
    num_slots, slice_starts = 3, (0, 37, 50, 63)
    width = (len(slice_starts) - 1) * max_rank
    y, lora_b, mapping, out = expand_case(token_slots, num_slots, slice_starts, max_rank, dtype)
    y_all = torch.full((len(token_slots), num_slots * width), float("nan"), dtype=dtype, device=DEVICE)
    for t, slot in enumerate(token_slots):
        if slot >= 0:
            y_all[t, slot * width:(slot + 1) * width] = y[t].to(dtype)
    base = out.clone()
    if block_n is None:
        lora_expand(y_all, lora_b, mapping, slice_starts, out, y_per_slot=True)
    else:
        lora_expand_per_token(y_all, lora_b, mapping.token_slots, slice_starts, out, block_n=block_n)
    expected = lora_expand_ref(y.to(dtype).float(), lora_b, mapping, slice_starts, base.clone())
    assert_matches(out, expected, dtype)
    reference = lora_expand_ref(y_all, lora_b, mapping, slice_starts, base.clone(), y_per_slot=True)
    assert_matches(reference, expected, dtype)
    no_adapter = torch.tensor(token_slots, device=DEVICE) == -1
    assert torch.equal(out[no_adapter], base[no_adapter])


def test_small_tiles_loop_over_rank_and_rows():
    """Rank 40 in K tiles of 16 (3 steps), slices of 45 and 7 rows in tiles of 32, ~20 tokens a slot."""
    launch = ExpandLaunch(block_m=16, block_n=32, block_k=16)
    check(random_slots(60, 3, seed=5, empty_slot=1), 3, (0, 45, 52), 40, torch.float32, launch=launch)


def test_reference_is_a_per_token_product():
    token_slots, slice_starts = [2, -1, 0, 2, 1], (0, 5, 9)
    y, lora_b, mapping, out = expand_case(token_slots, 3, slice_starts, 4, torch.float32, seed=7)
    base = out.clone()
    lora_expand_ref(y, lora_b, mapping, slice_starts, out)
    for t, slot in enumerate(token_slots):
        expected = base[t].clone()
        if slot != -1:
            expected[:5] += lora_b[slot, :5] @ y[t, :4]
            expected[5:] += lora_b[slot, 5:] @ y[t, 4:]
        torch.testing.assert_close(out[t], expected)


def test_one_mapping_refilled_for_steps_of_different_sizes():
    """As graph replay does: one mapping, filled for 30 tokens, then 7, then 19; the kernels must
    read only the current step's entries."""
    num_slots, in_features, max_rank, slice_starts = 3, 40, 8, (0, 24, 32)
    mapping = LoRATokenMapping(30, num_slots, DEVICE)
    lora_a = randn(num_slots, 2 * max_rank, in_features, dtype=torch.float32, seed=1)
    lora_b = randn(num_slots, slice_starts[-1], max_rank, dtype=torch.float32, seed=2)
    for seed, num_tokens in enumerate((30, 7, 19)):
        token_slots = random_slots(num_tokens, num_slots, seed=seed)
        mapping.fill(torch.tensor(token_slots, dtype=torch.int32, device=DEVICE))
        x = randn(num_tokens, in_features, dtype=torch.float32, seed=seed + 3)
        base = randn(num_tokens, slice_starts[-1], dtype=torch.float32, seed=seed + 4)
        shrunk = lora_shrink(x, lora_a, mapping, torch.full((num_tokens, 2 * max_rank), float("nan"), device=DEVICE))
        out = lora_expand(shrunk, lora_b, mapping, slice_starts, base.clone())
        reference = filled_mapping(token_slots, num_slots)
        expected_shrunk = lora_shrink_ref(x, lora_a, reference, torch.empty_like(shrunk))
        assert_matches(shrunk, expected_shrunk, torch.float32)
        assert_matches(out, lora_expand_ref(expected_shrunk, lora_b, reference, slice_starts, base.clone()),
                       torch.float32)


@gpu_only
@pytest.mark.parametrize("num_tokens", [1, 16, 256, 1024])
def test_bfloat16_llama_sizes_on_gpu(num_tokens):
    check(random_slots(num_tokens, 8, seed=num_tokens), 8, (0, 4096, 5120, 6144), 16, torch.bfloat16)


@gpu_only
def test_cuda_graph_replays_fill_shrink_expand_for_new_slots():
    """The model runner captures the whole LoRA path once and replays it with other slots each step."""
    num_tokens, num_slots, in_features, max_rank, slice_starts = 64, 4, 256, 16, (0, 128, 192, 256)
    dtype = torch.bfloat16
    x = randn(num_tokens, in_features, dtype=dtype, seed=1)
    lora_a = randn(num_slots, 3 * max_rank, in_features, dtype=dtype, seed=2) / in_features ** 0.5
    lora_b = randn(num_slots, slice_starts[-1], max_rank, dtype=dtype, seed=3) / max_rank ** 0.5
    base = randn(num_tokens, slice_starts[-1], dtype=dtype, seed=4)
    slots_input = torch.full((num_tokens,), -1, dtype=torch.int32, device=DEVICE)
    mapping = LoRATokenMapping(num_tokens, num_slots, DEVICE)
    shrunk = torch.empty(num_tokens, 3 * max_rank, device=DEVICE)
    out = torch.empty_like(base)

    def step():
        mapping.fill(slots_input)
        lora_shrink(x, lora_a, mapping, shrunk)
        out.copy_(base)
        lora_expand(shrunk, lora_b, mapping, slice_starts, out)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for seed, token_slots in enumerate([random_slots(num_tokens, num_slots, seed=10),
                                        random_slots(num_tokens, num_slots, seed=11, empty_slot=2),
                                        [-1] * num_tokens]):
        slots_input.copy_(torch.tensor(token_slots, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        reference = filled_mapping(token_slots, num_slots)
        expected_shrunk = lora_shrink_ref(x, lora_a, reference, torch.empty_like(shrunk))
        expected = lora_expand_ref(expected_shrunk, lora_b, reference, slice_starts, base.clone())
        torch.testing.assert_close(out.float(), expected.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
