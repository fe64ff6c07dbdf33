"""One KV cache group's block lists: the layers that share an attention type (vLLM v1's
single-type manager). engine/core/kv_cache_manager.py coordinates the groups over one BlockPool.

Full attention holds every block of a request. With a sliding window, a query never reads a key
older than its window, so the blocks wholly behind the window of a request's next query are given
back to the pool: a long context holds about window / block_size + 1 blocks. Such a block keeps its
hash like any freed block, and the null block takes its place in the request's list, so every block
keeps its index (the runner's block tables keep the old id there; the kernels never read it).

Every group of a request covers the same token positions with its own blocks; a block is cached
under the request's block hash tagged with its group, so one group's block never serves another.
"""

from __future__ import annotations

from engine.core.block_pool import BlockPool, KVCacheBlock


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class GroupKVCacheManager:
    def __init__(self, block_pool: BlockPool, block_size: int, sliding_window: int | None = None,
                 group_id: int = 0) -> None:
        self.block_pool = block_pool
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.tag = b"" if group_id == 0 else b"\x00group" + group_id.to_bytes(2, "little")
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self.num_cached_blocks: dict[str, int] = {}  # how many leading blocks are hashed already

    def find_longest_cache_hit(self, block_hashes: list[bytes]) -> list[KVCacheBlock]:
        """The cached blocks of the longest prefix of `block_hashes` that can be skipped. Full
        attention needs every block before the first computed token. With a sliding window only
        those its query sees matter (the hash of a block covers every token before it, so a cached
        block proves the whole prefix): the search runs from the end for enough cached blocks in a
        row, and the blocks before them are the null block."""
        pool = self.block_pool
        if self.sliding_window is None:
            computed = []
            for block_hash in block_hashes:
                block = pool.get_cached_block(block_hash + self.tag)
                if block is None:
                    break
                computed.append(block)
            return computed
        needed = max(1, cdiv(self.sliding_window - 1, self.block_size))
        run: list[KVCacheBlock] = []  # cached blocks in a row, the last one first
        for index in range(len(block_hashes) - 1, -1, -1):
            block = pool.get_cached_block(block_hashes[index] + self.tag)
            if block is None:
                run = []
                continue
            run.append(block)
            if len(run) == needed or index == 0:
                return [pool.null_block] * index + run[::-1]
        return []

    def sibling_blocks(self, sibling_id: str, num_blocks: int) -> list[KVCacheBlock] | None:
        """The first `num_blocks` of a sibling's blocks, or None when it has given back one that a
        query after them would see."""
        blocks = self.req_to_blocks.get(sibling_id, [])[:num_blocks]
        seen = blocks[self.num_blocks_behind_window(num_blocks * self.block_size):]
        return None if self.block_pool.null_block in seen else blocks

    def prepare(self, request_id: str, num_computed: int, new_computed_blocks: list[KVCacheBlock]
                ) -> list[KVCacheBlock]:
        """Before a step whose first query is at `num_computed`: give back the blocks behind its
        window; returns the cache hits to take, hits behind the window replaced by the null block."""
        if self.sliding_window is None:
            return new_computed_blocks
        blocks = self.req_to_blocks.get(request_id, [])
        behind = self.num_blocks_behind_window(num_computed)
        self._free_behind_window(blocks, behind)
        null = self.block_pool.null_block
        return [null if len(blocks) + i < behind else block for i, block in enumerate(new_computed_blocks)]

    def num_blocks_needed(self, request_id: str, num_tokens: int, new_computed_blocks: list[KVCacheBlock]) -> int:
        """Free blocks the pool must have to cover `num_tokens` slots: new ones, and the cache hits
        that sit in the free queue (they stop being allocatable once taken)."""
        held = len(self.req_to_blocks.get(request_id, ())) + len(new_computed_blocks)
        evictable_hits = sum(1 for block in new_computed_blocks if block.ref_cnt == 0)
        return max(cdiv(num_tokens, self.block_size) - held, 0) + evictable_hits

    def allocate(self, request_id: str, num_tokens: int, new_computed_blocks: list[KVCacheBlock]
                 ) -> list[KVCacheBlock]:
        """Take the hits and enough new blocks for `num_tokens` slots (checked to be free)."""
        null = self.block_pool.null_block
        self.block_pool.touch(block for block in new_computed_blocks if block is not null)
        blocks = self.req_to_blocks.setdefault(request_id, [])
        blocks.extend(new_computed_blocks)
        new_blocks = self.block_pool.get_new_blocks(max(cdiv(num_tokens, self.block_size) - len(blocks), 0))
        blocks.extend(new_blocks)
        return new_blocks

    def cache_full_blocks(self, request_id: str, block_hashes: list[bytes], num_full: int) -> None:
        """Register the request's first `num_full` blocks (hashed in `block_hashes`) in the prefix cache."""
        start = self.num_cached_blocks.get(request_id, 0)
        if num_full <= start:
            return
        blocks = self.req_to_blocks[request_id]
        for i in range(start, num_full):
            if blocks[i] is not self.block_pool.null_block:  # given back before its token was known
                self.block_pool.cache_full_block(blocks[i], block_hashes[i] + self.tag)
        self.num_cached_blocks[request_id] = num_full

    def free(self, request_id: str) -> None:
        blocks = self.req_to_blocks.pop(request_id, [])
        self.num_cached_blocks.pop(request_id, None)
        null = self.block_pool.null_block
        self.block_pool.free_blocks(block for block in reversed(blocks) if block is not null)

    def max_blocks_held(self, num_tokens: int, max_step_tokens: int) -> int:
        """The most blocks a request of `num_tokens` holds at once when a step adds at most
        `max_step_tokens`: all, or with a sliding window the window's before a step and the step's
        (the first of them may start mid-block)."""
        num_blocks = cdiv(num_tokens, self.block_size)
        if self.sliding_window is None:
            return num_blocks
        return min(num_blocks, cdiv(self.sliding_window - 1 + max_step_tokens, self.block_size) + 1)

    def num_blocks_behind_window(self, position: int) -> int:
        """How many leading blocks lie wholly before the window of a query at `position`."""
        if self.sliding_window is None:
            return 0
        return max(0, position - self.sliding_window + 1) // self.block_size

    def _free_behind_window(self, blocks: list[KVCacheBlock], behind: int) -> None:
        """Give the first `behind` blocks back (the ones not given back yet: those after the last null)."""
        null, freed = self.block_pool.null_block, []
        index = min(behind, len(blocks)) - 1
        while index >= 0 and blocks[index] is not null:
            freed.append(blocks[index])
            blocks[index] = null
            index -= 1
        self.block_pool.free_blocks(freed)
