"""LoRATokenMapping: each slot's tokens, in batch order, found through slot_starts; buffers reused."""

import pytest
import torch

from kernels.lora_mapping import LoRATokenMapping
from tests.kernels.kernel_testing import DEVICE

GARBAGE = 2**30  # where a kernel reads it, it reads far out of bounds


def filled_mapping(token_slots: list[int], num_slots: int, spare_tokens: int = 5) -> LoRATokenMapping:
    """A mapping with room for more tokens than filled, every entry past the filled ones garbage."""
    mapping = LoRATokenMapping(len(token_slots) + spare_tokens, num_slots, DEVICE)
    mapping.sorted_token_ids.fill_(GARBAGE)
    mapping.token_slots.fill_(GARBAGE)
    mapping.fill(torch.tensor(token_slots, dtype=torch.int32, device=DEVICE))
    return mapping


def random_slots(num_tokens: int, num_slots: int, seed: int, empty_slot: int | None = None) -> list[int]:
    """Slots in [-1, num_slots), `empty_slot` never used."""
    generator = torch.Generator().manual_seed(seed)
    choices = [s for s in range(-1, num_slots) if s != empty_slot]
    picks = torch.randint(len(choices), (num_tokens,), generator=generator).tolist()
    return [choices[p] for p in picks]


def expected_layout(token_slots: list[int], num_slots: int):
    """(sorted ids, starts, counts) computed the obvious way: slot by slot, then the no-adapter tokens."""
    groups = [[t for t, s in enumerate(token_slots) if s == slot] for slot in range(num_slots)]
    groups.append([t for t, s in enumerate(token_slots) if s == -1])
    starts = [0]
    for group in groups:
        starts.append(starts[-1] + len(group))
    return [t for group in groups for t in group], starts, [len(group) for group in groups]


def assert_layout(mapping: LoRATokenMapping, token_slots: list[int]) -> None:
    sorted_ids, starts, counts = expected_layout(token_slots, mapping.num_slots)
    num_tokens = len(token_slots)
    assert mapping.num_tokens == num_tokens
    assert mapping.token_slots[:num_tokens].tolist() == token_slots
    assert mapping.sorted_token_ids[:num_tokens].tolist() == sorted_ids
    assert mapping.slot_starts.tolist() == starts
    assert mapping.num_tokens_per_slot.tolist() == counts


@pytest.mark.parametrize("token_slots, num_slots", [
    ([0], 1),
    ([-1], 2),                                   # one token, no adapter
    ([2, -1, 0, 2, -1, 3, 2], 4),                # slot 1 has no tokens; order within a slot kept
    ([1] * 9, 3),                                # all tokens on one slot
    ([-1] * 6, 3),                               # nobody has an adapter
    ([], 2),                                     # an empty step
    (random_slots(300, 8, seed=1, empty_slot=5), 8),
])
def test_fill_sorts_tokens_by_slot(token_slots, num_slots):
    assert_layout(filled_mapping(token_slots, num_slots), token_slots)


def test_fill_again_with_fewer_then_more_tokens_reuses_the_buffers():
    """A CUDA graph replays fill on the same buffers: nothing may be reallocated, stale tails ignored."""
    mapping = LoRATokenMapping(32, 4, DEVICE)
    buffers = [mapping.token_slots, mapping.sorted_token_ids, mapping.slot_starts, mapping.num_tokens_per_slot]
    pointers = [b.data_ptr() for b in buffers]
    for token_slots in (random_slots(32, 4, seed=2), [3, -1, 3, 0], random_slots(20, 4, seed=3, empty_slot=0)):
        mapping.fill(torch.tensor(token_slots, dtype=torch.int32, device=DEVICE))
        assert_layout(mapping, token_slots)
    assert [b.data_ptr() for b in buffers] == pointers


def test_fill_rejects_more_tokens_than_the_buffers_hold():
    mapping = LoRATokenMapping(4, 2, DEVICE)
    with pytest.raises(AssertionError):
        mapping.fill(torch.zeros(5, dtype=torch.int32, device=DEVICE))


def test_slot_token_groups_lists_only_slots_with_tokens():
    mapping = filled_mapping([2, -1, 0, 2, -1, 3, 2], 4)
    groups = [(slot, tokens.tolist()) for slot, tokens in mapping.slot_token_groups()]
    assert groups == [(0, [2]), (2, [0, 3, 6]), (3, [5])]
