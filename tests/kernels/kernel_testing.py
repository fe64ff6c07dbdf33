"""What the Triton kernel tests share: where and in which dtypes they run, tolerances, seeded random
tensors, and a paged KV cache whose every unowned slot holds poison (NaN), so a read by the wrong
block or offset shows up."""

from __future__ import annotations

import pytest
import torch

from kernels.paged_attention_ref import reshape_and_cache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter is wrong for bfloat16; the GPU runs cover it.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def gpu_only(test):
    """For larger (and bfloat16) cases that only a real GPU runs in reasonable time."""
    return pytest.mark.gpu(pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")(test))


def randn(*shape: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(DEVICE, dtype)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Within the dtype's tolerance, NaN nowhere."""
    assert not actual.isnan().any()
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tolerance, rtol=tolerance)


class PagedKV:
    """Several sequences' K/V in a paged cache: blocks handed out in scrambled order, block tables
    padded with block 0 (which no sequence owns), NaN in every slot no sequence owns."""

    def __init__(self, seq_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                 seed: int = 0) -> None:
        self.block_size = block_size
        needed = [-(-n // block_size) for n in seq_lens]
        num_blocks = sum(needed) + 2
        free = (torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1).tolist()
        self.tables = []
        for count in needed:
            self.tables.append(free[:count])
            free = free[count:]
        width = max(needed) + 1  # wider than any sequence needs, like a shared batch table
        # int32, as the model runner's input buffers hold them.
        self.block_tables = torch.tensor([t + [0] * (width - len(t)) for t in self.tables], dtype=torch.int32,
                                         device=DEVICE)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.key_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
        self.value_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
        total = sum(seq_lens)
        slots = torch.cat([self.slots(seq, 0, n) for seq, n in enumerate(seq_lens)])
        reshape_and_cache(randn(total, num_kv_heads, head_dim, dtype=dtype, seed=seed + 1),
                          randn(total, num_kv_heads, head_dim, dtype=dtype, seed=seed + 2),
                          self.key_cache, self.value_cache, slots)

    def poison_behind_window(self, seq: int, first_query_pos: int, sliding_window: int) -> None:
        """NaN in sequence `seq`'s blocks wholly behind the window of its query at `first_query_pos`: the KV
        cache manager gives such blocks back to the pool, so another request's KV may be there."""
        first_visible = max(0, first_query_pos - sliding_window + 1)
        for block in self.tables[seq][:first_visible // self.block_size]:
            self.key_cache[block] = float("nan")
            self.value_cache[block] = float("nan")

    def slots(self, seq: int, start: int, end: int) -> torch.Tensor:
        """Cache slots of positions start..end-1 of sequence `seq`."""
        table, size = self.tables[seq], self.block_size
        return torch.tensor([table[p // size] * size + p % size for p in range(start, end)], dtype=torch.long,
                            device=DEVICE)
