"""Per-request block tables on top of the BlockPool, with automatic prefix caching.

With a sliding window on every attention layer (Mistral), a query never reads a key older than its
window, so the blocks wholly behind the window of a request's next query are given back to the pool
(vLLM v1's sliding-window KV cache group): a long context holds about window / block_size + 1 blocks.
Such a block keeps its hash like any freed block, and the null block takes its place in the
request's list, so every block keeps its index (the runner's block tables keep the old id there;
the kernels never read it). Models with a full-attention layer (Gemma 2/3's global layers) pass no
window: those layers read every block, so only the kernels skip work.
"""

from __future__ import annotations

from engine.core.block_pool import BlockPool, KVCacheBlock, hash_block_tokens
from engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 sliding_window: int | None = None) -> None:
        """`sliding_window`: the window every attention layer shares (engine/layers/attention.py's
        uniform_sliding_window), or None."""
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.sliding_window = sliding_window
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self.num_cached_blocks: dict[str, int] = {}  # how many leading blocks are hashed already
        # Counters for tests and metrics: tokens asked for vs tokens served from the cache.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.get_num_free_blocks()

    def get_block_ids(self, request_id: str, start: int = 0) -> list[int]:
        """The ids of a request's blocks from `start` on (a running request's new ones)."""
        return [block.block_id for block in self.req_to_blocks.get(request_id, ())[start:]]

    def get_computed_blocks(self, request: Request, sibling: Request | None = None
                            ) -> tuple[list[KVCacheBlock], int]:
        """Longest run of leading full blocks already in the cache, and how many tokens they hold.

        At least one token is always left to compute, so the request gets logits to sample from.
        `sibling` (an earlier child of the same `n > 1` request that has computed the prompt)
        shares its prompt blocks even when prefix caching is off. With a sliding window, blocks
        behind the first computed token's window may be the null block.
        """
        max_blocks = (request.num_tokens - 1) // self.block_size
        if request.skip_prefix_cache:
            return [], 0
        if self.enable_caching:
            self._update_block_hashes(request)
            computed = self._longest_cache_hit(request.block_hashes[:max_blocks])
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += len(computed) * self.block_size
        elif sibling is not None and sibling.request_id in self.req_to_blocks:
            shareable = min(max_blocks, sibling.num_computed_tokens // self.block_size,
                            request.num_prompt_tokens // self.block_size)
            computed = self.req_to_blocks[sibling.request_id][:shareable]
            seen = computed[self._num_blocks_behind_window(shareable * self.block_size):]
            if self.block_pool.null_block in seen:  # the sibling gave back blocks this request's first query sees
                computed = []
        else:
            computed = []
        return computed, len(computed) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[KVCacheBlock] | None = None,
                       num_lookahead_tokens: int = 0) -> list[KVCacheBlock] | None:
        """Make room for `num_new_tokens` more tokens; None (and nothing allocated) if the pool is too small.
        `num_lookahead_tokens` more slots are reserved past them (a draft model writes its proposals'
        KV there) but never cached: their tokens are not known yet."""
        if not new_computed_blocks:
            blocks = self.req_to_blocks.get(request.request_id)
            needed = request.num_computed_tokens + num_new_tokens + num_lookahead_tokens
            if blocks and needed <= len(blocks) * self.block_size:
                # A decoding request inside its last block (15 steps in 16): no pool work. At 1,000
                # running sequences this path is most of the scheduler's time per step.
                if self.enable_caching and not request.skip_prefix_cache:
                    self._cache_full_blocks(request, request.num_computed_tokens + num_new_tokens)
                return []
        new_computed_blocks = new_computed_blocks or []
        blocks = self.req_to_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        if self.sliding_window is not None:  # this step's first query is at num_computed
            behind = self._num_blocks_behind_window(num_computed)
            self._free_behind_window(blocks, behind)
            null = self.block_pool.null_block  # hits behind the window are not taken
            new_computed_blocks = [null if len(blocks) + i < behind else block
                                   for i, block in enumerate(new_computed_blocks)]
        num_required = cdiv(num_computed + num_new_tokens + num_lookahead_tokens, self.block_size)
        num_new_blocks = num_required - len(blocks) - len(new_computed_blocks)
        # Cache hits sitting in the free queue stop being allocatable once we touch them.
        num_evictable_hits = sum(1 for block in new_computed_blocks if block.ref_cnt == 0)
        if num_new_blocks > self.block_pool.get_num_free_blocks() - num_evictable_hits:
            if not blocks:
                del self.req_to_blocks[request.request_id]
            return None
        null = self.block_pool.null_block
        self.block_pool.touch(block for block in new_computed_blocks if block is not null)
        blocks.extend(new_computed_blocks)
        new_blocks = self.block_pool.get_new_blocks(max(num_new_blocks, 0))
        blocks.extend(new_blocks)
        if self.enable_caching and not request.skip_prefix_cache:
            self._cache_full_blocks(request, num_computed + num_new_tokens)
        return new_blocks

    def free(self, request: Request) -> None:
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        null = self.block_pool.null_block
        self.block_pool.free_blocks(block for block in reversed(blocks) if block is not null)

    def reset_prefix_cache(self) -> None:
        self.block_pool.reset_prefix_cache()

    def max_blocks_held(self, num_tokens: int, max_step_tokens: int) -> int:
        """The most blocks a request of `num_tokens` holds at once when a step adds at most
        `max_step_tokens`: all, or with a sliding window the window's before a step and the step's
        (the first of them may start mid-block)."""
        num_blocks = cdiv(num_tokens, self.block_size)
        if self.sliding_window is None:
            return num_blocks
        return min(num_blocks, cdiv(self.sliding_window - 1 + max_step_tokens, self.block_size) + 1)

    def _num_blocks_behind_window(self, position: int) -> int:
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

    def _longest_cache_hit(self, block_hashes: list[bytes]) -> list[KVCacheBlock]:
        """The cached blocks of the longest prefix that can be skipped. Full attention needs every
        block before the first computed token. With a sliding window only those its query sees
        matter (the hash of a block covers every token before it, so a cached block proves the whole
        prefix): the search runs from the end for enough cached blocks in a row, and the blocks
        before them are the null block."""
        pool = self.block_pool
        if self.sliding_window is None:
            computed = []
            for block_hash in block_hashes:
                block = pool.get_cached_block(block_hash)
                if block is None:
                    break
                computed.append(block)
            return computed
        needed = max(1, cdiv(self.sliding_window - 1, self.block_size))
        run: list[KVCacheBlock] = []  # cached blocks in a row, the last one first
        for index in range(len(block_hashes) - 1, -1, -1):
            block = pool.get_cached_block(block_hashes[index])
            if block is None:
                run = []
                continue
            run.append(block)
            if len(run) == needed or index == 0:
                return [pool.null_block] * index + run[::-1]
        return []

    def _update_block_hashes(self, request: Request) -> None:
        hashes, size, tokens = request.block_hashes, self.block_size, request.all_token_ids
        for start in range(len(hashes) * size, len(tokens) - size + 1, size):
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block_tokens(parent, tokens[start:start + size], request.cache_salt,
                                            request.lora_int_id))

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Register blocks that will be full once this step's tokens are written."""
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        start = self.num_cached_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        self._update_block_hashes(request)
        blocks = self.req_to_blocks[request.request_id]
        for i in range(start, num_full):
            if blocks[i] is not self.block_pool.null_block:  # given back before its token was known
                self.block_pool.cache_full_block(blocks[i], request.block_hashes[i])
        self.num_cached_blocks[request.request_id] = num_full
