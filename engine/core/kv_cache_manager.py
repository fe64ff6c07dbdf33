"""Per-request blocks for every KV cache group on one BlockPool, with automatic prefix caching.

A model whose layers all attend alike (Llama: full attention; Mistral: one sliding window) has one
group. Gemma 2/3 mix global layers with sliding-window ones: the layers form groups of equal size
(engine/core/kv_cache_groups.py), each group with its own block table per request, all drawn from
one pool (vLLM v1's hybrid KV cache manager). A block then holds its tokens for one group's layers,
so a sliding group gives its blocks back behind the window while the global group keeps them: a
long context costs window-sized KV on the local layers.

Block ids travel as one list per group (a tuple), in group order. Every group of a request lists
the same number of blocks (each covers the same token positions; a sliding group's given-back ones
are the null block), so one count says where a request's new blocks start in all of them.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.core.block_pool import BlockPool, KVCacheBlock, hash_block_tokens
from engine.core.group_kv_cache_manager import GroupKVCacheManager
from engine.request import Request

GroupBlocks = tuple[list[KVCacheBlock], ...]


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 sliding_windows: Sequence[int | None] = (None,)) -> None:
        """`sliding_windows`: each group's window (None: full attention), from the model runner's
        `kv_cache_groups`."""
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.sliding_windows = tuple(sliding_windows)
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self.groups = [GroupKVCacheManager(self.block_pool, block_size, window, group_id)
                       for group_id, window in enumerate(self.sliding_windows)]
        # Counters for tests and metrics: tokens asked for vs tokens served from the cache.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.get_num_free_blocks()

    def holds(self, request_id: str) -> bool:
        return request_id in self.groups[0].req_to_blocks

    def request_ids(self) -> list[str]:
        """The requests that hold blocks."""
        return list(self.groups[0].req_to_blocks)

    def num_blocks(self, request_id: str) -> int:
        """How many blocks each group lists for the request (given-back ones included)."""
        return len(self.groups[0].req_to_blocks.get(request_id, ()))

    def get_block_ids(self, request_id: str, start: int = 0) -> tuple[list[int], ...]:
        """The ids of a request's blocks in each group, from `start` on (a running request's new ones)."""
        return tuple([block.block_id for block in group.req_to_blocks.get(request_id, ())[start:]]
                     for group in self.groups)

    def get_computed_blocks(self, request: Request, sibling: Request | None = None) -> tuple[GroupBlocks, int]:
        """The longest run of leading full blocks already in the cache in every group, and how many
        tokens they hold.

        At least one token is always left to compute, so the request gets logits to sample from.
        `sibling` (an earlier child of the same `n > 1` request that has computed the prompt)
        shares its prompt blocks even when prefix caching is off. With a sliding window, blocks
        behind the first computed token's window may be the null block.
        """
        none: GroupBlocks = tuple([] for _ in self.groups)
        max_blocks = (request.num_tokens - 1) // self.block_size
        if request.skip_prefix_cache:
            return none, 0
        if self.enable_caching:
            self._update_block_hashes(request)
            computed = self._longest_common_hit(request.block_hashes[:max_blocks])
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += len(computed[0]) * self.block_size
        elif sibling is not None and self.holds(sibling.request_id):
            shareable = min(max_blocks, sibling.num_computed_tokens // self.block_size,
                            request.num_prompt_tokens // self.block_size)
            shared = [group.sibling_blocks(sibling.request_id, shareable) for group in self.groups]
            computed = none if None in shared else tuple(shared)
        else:
            computed = none
        return computed, len(computed[0]) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int, new_computed_blocks: GroupBlocks | None = None,
                       num_lookahead_tokens: int = 0) -> list[KVCacheBlock] | None:
        """Make room for `num_new_tokens` more tokens in every group; None (and nothing allocated) if
        the pool is too small; else the new blocks. `num_lookahead_tokens` more slots are reserved
        past them (a draft model writes its proposals' KV there) but never cached: their tokens are
        not known yet."""
        request_id = request.request_id
        hits = new_computed_blocks if new_computed_blocks and new_computed_blocks[0] else None
        num_computed = request.num_computed_tokens + (len(hits[0]) * self.block_size if hits else 0)
        num_slots = num_computed + num_new_tokens + num_lookahead_tokens
        listed = self.groups[0].req_to_blocks.get(request_id)
        if hits is None and listed and num_slots <= len(listed) * self.block_size:
            # A decoding request inside its last block (15 steps in 16): no pool work. At 1,000
            # running sequences this path is most of the scheduler's time per step.
            self._cache_full_blocks(request, num_computed + num_new_tokens)
            return []
        hits = [group.prepare(request_id, num_computed, list(hits[i]) if hits else [])
                for i, group in enumerate(self.groups)]
        needed = sum(group.num_blocks_needed(request_id, num_slots, hits[i]) for i, group in enumerate(self.groups))
        if needed > self.block_pool.get_num_free_blocks():
            return None
        new_blocks = [block for i, group in enumerate(self.groups)
                      for block in group.allocate(request_id, num_slots, hits[i])]
        self._cache_full_blocks(request, num_computed + num_new_tokens)
        return new_blocks

    def free(self, request: Request) -> None:
        for group in self.groups:
            group.free(request.request_id)

    def reset_prefix_cache(self) -> None:
        self.block_pool.reset_prefix_cache()

    def max_blocks_held(self, num_tokens: int, max_step_tokens: int) -> int:
        """The most blocks a request of `num_tokens` holds at once, over all groups, when a step adds
        at most `max_step_tokens`."""
        return sum(group.max_blocks_held(num_tokens, max_step_tokens) for group in self.groups)

    def num_listed_blocks(self, requests: Sequence[Request]) -> int:
        """The length of the requests' block lists over all groups (cheap enough for every step;
        a sliding group's given-back blocks count as the slots they stand for)."""
        blocks = self.groups[0].req_to_blocks
        return len(self.groups) * sum(len(blocks.get(request.request_id, ())) for request in requests)

    def forget_uncomputed_blocks(self, request: Request, num_computed: int) -> None:
        """Drop from the prefix cache the request's blocks past its first `num_computed` tokens: they
        were registered when allocated, before their KV was written (a step that then failed)."""
        first_uncomputed = num_computed // self.block_size
        for group in self.groups:
            for block in group.req_to_blocks.get(request.request_id, [])[first_uncomputed:]:
                self.block_pool.evict(block)
            cached = group.num_cached_blocks
            if cached.get(request.request_id, 0) > first_uncomputed:
                cached[request.request_id] = first_uncomputed

    def _longest_common_hit(self, block_hashes: list[bytes]) -> GroupBlocks:
        """The longest hit that every group has. A full-attention hit may be cut short, but a
        sliding group's must end with its window's blocks, so each group searches again within the
        shortest hit so far, until all agree."""
        length = len(block_hashes)
        while True:
            hits = [group.find_longest_cache_hit(block_hashes[:length]) for group in self.groups]
            shortest = min(len(hit) for hit in hits)
            if shortest == length or len(self.groups) == 1:
                return tuple(hit[:shortest] for hit in hits)
            length = shortest

    def _update_block_hashes(self, request: Request) -> None:
        hashes, size, tokens = request.block_hashes, self.block_size, request.all_token_ids
        for start in range(len(hashes) * size, len(tokens) - size + 1, size):
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block_tokens(parent, tokens[start:start + size], request.cache_salt,
                                            request.lora_int_id))

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Register blocks that will be full once this step's tokens are written."""
        if not self.enable_caching or request.skip_prefix_cache:
            return
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        if num_full <= self.groups[0].num_cached_blocks.get(request.request_id, 0):
            return
        self._update_block_hashes(request)
        for group in self.groups:
            group.cache_full_blocks(request.request_id, request.block_hashes, num_full)
