"""Which LoRA adapter slot each token of a step uses, sorted for the batched LoRA kernels.

vLLM's LoRAKernelMeta: the shrink and expand kernels run one group of programs per slot, each
reading only its slot's tokens through `sorted_token_ids[slot_starts[s]:slot_starts[s + 1]]`, so
tokens without an adapter (slot -1, sorted last) cost nothing but this sort. The buffers are sized
once and `fill` only writes into them, on the device and without a host sync, so a CUDA graph that
captured `fill` and the kernels replays them for new slots.
"""

from __future__ import annotations

import torch

NO_ADAPTER = -1


class LoRATokenMapping:
    """Persistent per-step token-to-slot buffers (first `num_tokens` entries valid after `fill`).

    `slot_starts` has `num_slots + 2` entries: slot s's tokens are sorted_token_ids[slot_starts[s]:
    slot_starts[s + 1]]; index `num_slots` stands for "no adapter", so slot_starts[num_slots] is where
    those tokens begin and slot_starts[num_slots + 1] is num_tokens.
    """

    def __init__(self, max_num_tokens: int, num_slots: int, device: torch.device | str) -> None:
        self.max_num_tokens = max_num_tokens
        self.num_slots = num_slots
        self.num_tokens = 0
        self.token_slots = torch.full((max_num_tokens,), NO_ADAPTER, dtype=torch.int32, device=device)
        self.sorted_token_ids = torch.zeros(max_num_tokens, dtype=torch.int32, device=device)
        self.slot_starts = torch.zeros(num_slots + 2, dtype=torch.int32, device=device)
        self.num_tokens_per_slot = torch.zeros(num_slots + 1, dtype=torch.int32, device=device)
        self._slot_ids = torch.arange(num_slots + 2, dtype=torch.int32, device=device)

    def fill(self, token_slots: torch.Tensor) -> None:
        """token_slots: int32 [T], T <= max_num_tokens, each in [0, num_slots) or -1 (no adapter).
        A stable sort keeps each slot's tokens in their batch order."""
        num_tokens = token_slots.numel()
        assert num_tokens <= self.max_num_tokens, f"{num_tokens} tokens, buffers hold {self.max_num_tokens}"
        self.num_tokens = num_tokens
        self.token_slots[:num_tokens].copy_(token_slots)
        slots = self.token_slots[:num_tokens]
        sort_keys = torch.where(slots < 0, self.num_slots, slots)  # no adapter sorts after every slot
        sorted_keys, order = torch.sort(sort_keys, stable=True)
        self.sorted_token_ids[:num_tokens].copy_(order)
        torch.searchsorted(sorted_keys, self._slot_ids, out_int32=True, out=self.slot_starts)
        torch.sub(self.slot_starts[1:], self.slot_starts[:-1], out=self.num_tokens_per_slot)

    def slot_token_groups(self) -> list[tuple[int, torch.Tensor]]:
        """(slot, its token indices) for each slot that has tokens, read from `token_slots` alone.
        The plain-torch references (the CPU path) loop over these; it reads values back to the host."""
        slots = self.token_slots[:self.num_tokens]
        return [(slot, (slots == slot).nonzero().squeeze(1)) for slot in slots.unique().tolist() if slot >= 0]
