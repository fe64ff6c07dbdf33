"""Per-request block tables on top of the BlockPool, with automatic prefix caching."""

from __future__ import annotations

from engine.core.block_pool import BlockPool, KVCacheBlock, hash_block_tokens
from engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
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
        shares its prompt blocks even when prefix caching is off.
        """
        max_blocks = (request.num_tokens - 1) // self.block_size
        if request.skip_prefix_cache:
            return [], 0
        if self.enable_caching:
            self._update_block_hashes(request)
            computed = []
            for block_hash in request.block_hashes[:max_blocks]:
                block = self.block_pool.get_cached_block(block_hash)
                if block is None:
                    break
                computed.append(block)
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += len(computed) * self.block_size
        elif sibling is not None and sibling.request_id in self.req_to_blocks:
            shareable = min(max_blocks, sibling.num_computed_tokens // self.block_size,
                            request.num_prompt_tokens // self.block_size)
            computed = self.req_to_blocks[sibling.request_id][:shareable]
        else:
            computed = []
        return computed, len(computed) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[KVCacheBlock] | None = None,
                       num_lookahead_tokens: int = 0) -> list[KVCacheBlock] | None:
        """Make room for `num_new_tokens` more tokens; None (and no change) if the pool is too small.
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
        num_required = cdiv(num_computed + num_new_tokens + num_lookahead_tokens, self.block_size)
        num_new_blocks = num_required - len(blocks) - len(new_computed_blocks)
        # Cache hits sitting in the free queue stop being allocatable once we touch them.
        num_evictable_hits = sum(1 for block in new_computed_blocks if block.ref_cnt == 0)
        if num_new_blocks > self.block_pool.get_num_free_blocks() - num_evictable_hits:
            if not blocks:
                del self.req_to_blocks[request.request_id]
            return None
        self.block_pool.touch(new_computed_blocks)
        blocks.extend(new_computed_blocks)
        new_blocks = self.block_pool.get_new_blocks(max(num_new_blocks, 0))
        blocks.extend(new_blocks)
        if self.enable_caching and not request.skip_prefix_cache:
            self._cache_full_blocks(request, num_computed + num_new_tokens)
        return new_blocks

    def free(self, request: Request) -> None:
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        self.block_pool.free_blocks(reversed(blocks))

    def reset_prefix_cache(self) -> None:
        self.block_pool.reset_prefix_cache()

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
            self.block_pool.cache_full_block(blocks[i], request.block_hashes[i])
        self.num_cached_blocks[request.request_id] = num_full
