"""KVCacheManager: allocation that fails cleanly, prefix-cache hits, salts and freeing."""

import pytest

from engine.core.kv_cache_manager import KVCacheManager

BLOCK = 4


def compute(manager, request, num_tokens, computed_blocks=(), num_cached=0):
    """Admit/extend a request as the scheduler does and pretend the model ran this step."""
    new_blocks = manager.allocate_slots(request, num_tokens, (list(computed_blocks),))
    assert new_blocks is not None
    request.num_computed_tokens += num_cached + num_tokens
    return new_blocks


def admit(manager, request):
    """Look up the prefix cache, then compute the rest of the prompt; returns tokens served by the cache."""
    (blocks,), num_cached = manager.get_computed_blocks(request)
    compute(manager, request, request.num_tokens - num_cached, blocks, num_cached)
    return num_cached


def test_allocate_slots_grows_a_request_block_by_block(make_request):
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK)
    request = make_request("r", range(6))
    assert len(compute(manager, request, 6)) == 2
    for _ in range(2):  # tokens 7 and 8 still fit in the second block
        assert compute(manager, request, 1) == []
    assert len(compute(manager, request, 1)) == 1  # token 9 needs a third block
    assert len(manager.get_block_ids("r")[0]) == 3
    assert 0 not in manager.get_block_ids("r")
    assert manager.num_free_blocks == 9 - 3


def test_allocate_slots_returns_none_and_changes_nothing_when_full(make_request):
    manager = KVCacheManager(num_blocks=5, block_size=BLOCK)  # 4 usable blocks
    first = make_request("first", range(12))
    compute(manager, first, 12)  # 3 blocks
    before = (manager.num_free_blocks, manager.get_block_ids("first"),
              [block.ref_cnt for block in manager.block_pool.blocks])

    second = make_request("second", range(100, 108))  # needs 2 blocks, 1 is free
    assert manager.allocate_slots(second, 8) is None
    assert not manager.holds("second")
    # A running request that cannot grow is left exactly as it was, too.
    first.num_computed_tokens = 12
    assert manager.allocate_slots(first, 5) is None
    after = (manager.num_free_blocks, manager.get_block_ids("first"),
             [block.ref_cnt for block in manager.block_pool.blocks])
    assert after == before


def test_allocation_may_not_count_its_own_evictable_cache_hits_as_free(make_request):
    """Cache hits sitting in the free queue stop being free once taken: a request whose hits plus
    new blocks exceed the pool is refused, and the hits stay cached and free."""
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK)  # 3 usable blocks
    owner = make_request("owner", range(9))
    admit(manager, owner)  # 3 blocks, 2 of them full and cached
    manager.free(owner)
    assert manager.num_free_blocks == 3

    reader = make_request("reader", list(range(8)) + list(range(50, 58)))  # 2 hits + 2 new blocks > 3
    hits, num_cached = manager.get_computed_blocks(reader)
    assert num_cached == 8
    assert manager.allocate_slots(reader, 8, hits) is None
    assert all(block.ref_cnt == 0 for block in hits[0])
    assert manager.num_free_blocks == 3
    assert [manager.block_pool.get_cached_block(h) for h in reader.block_hashes[:2]] == hits[0]


def test_get_computed_blocks_returns_the_longest_cached_prefix(make_request):
    manager = KVCacheManager(num_blocks=32, block_size=BLOCK)
    prompt = list(range(1, 17))  # 4 full blocks
    owner = make_request("owner", prompt)
    assert admit(manager, owner) == 0
    owner_blocks = manager.groups[0].req_to_blocks["owner"]

    partial = make_request("partial", prompt[:10] + [99, 98, 97, 96])  # shares 2 full blocks
    (blocks,), num_cached = manager.get_computed_blocks(partial)
    assert num_cached == 8
    assert blocks == owner_blocks[:2]

    diverges_in_first_block = make_request("other", [5] + prompt[1:])
    assert manager.get_computed_blocks(diverges_in_first_block) == (([],), 0)


def test_a_full_hit_still_leaves_a_token_to_compute(make_request):
    manager = KVCacheManager(num_blocks=32, block_size=BLOCK)
    prompt = list(range(1, 17))
    admit(manager, make_request("owner", prompt))

    same = make_request("same", prompt)  # 16 tokens, all 4 blocks cached
    (blocks,), num_cached = manager.get_computed_blocks(same)
    assert num_cached == 12 and len(blocks) == 3
    assert same.num_tokens - num_cached >= 1

    block_aligned = make_request("aligned", prompt[:12])
    assert manager.get_computed_blocks(block_aligned)[1] == 8

    one_token = make_request("one", prompt[:1])
    assert manager.get_computed_blocks(one_token) == (([],), 0)


def test_hits_share_blocks_and_count_in_the_statistics(make_request):
    manager = KVCacheManager(num_blocks=32, block_size=BLOCK)
    prompt = list(range(1, 14))
    admit(manager, make_request("a", prompt))
    queries, hits = manager.prefix_cache_queries, manager.prefix_cache_hits

    second = make_request("b", prompt)
    assert admit(manager, second) == 12
    shared = manager.groups[0].req_to_blocks["a"][:3]
    assert manager.groups[0].req_to_blocks["b"][:3] == shared
    assert all(block.ref_cnt == 2 for block in shared)
    assert manager.groups[0].req_to_blocks["b"][3] is not manager.groups[0].req_to_blocks["a"][3]
    assert manager.prefix_cache_queries == queries + 13
    assert manager.prefix_cache_hits == hits + 12


def test_hits_after_the_owner_finished(make_request):
    manager = KVCacheManager(num_blocks=32, block_size=BLOCK)
    prompt = list(range(1, 14))
    owner = make_request("owner", prompt)
    admit(manager, owner)
    cached = manager.groups[0].req_to_blocks["owner"][:3]
    manager.free(owner)
    assert all(block.ref_cnt == 0 for block in cached)

    later = make_request("later", prompt)
    assert admit(manager, later) == 12
    assert manager.groups[0].req_to_blocks["later"][:3] == cached
    assert all(block.ref_cnt == 1 for block in cached)


def test_generated_tokens_are_cached_too(make_request):
    manager = KVCacheManager(num_blocks=32, block_size=BLOCK)
    request = make_request("r", range(1, 7))
    admit(manager, request)
    for token in (50, 51, 52):  # decode: the second block fills with two generated tokens
        request.append_output_token(token)
        compute(manager, request, 1)
    follow_up = make_request("f", list(range(1, 7)) + [50, 51, 52, 60])
    assert manager.get_computed_blocks(follow_up)[1] == 8


def test_different_cache_salt_never_hits(make_request):
    manager = KVCacheManager(num_blocks=32, block_size=BLOCK)
    prompt = list(range(1, 14))
    admit(manager, make_request("a", prompt, cache_salt="tenant-a"))
    assert manager.get_computed_blocks(make_request("b", prompt, cache_salt="tenant-b")) == (([],), 0)
    assert manager.get_computed_blocks(make_request("none", prompt)) == (([],), 0)
    assert manager.get_computed_blocks(make_request("a2", prompt, cache_salt="tenant-a"))[1] == 12


def test_prompt_logprobs_requests_skip_the_cache(make_request):
    manager = KVCacheManager(num_blocks=32, block_size=BLOCK)
    prompt = list(range(1, 14))
    admit(manager, make_request("a", prompt))
    assert manager.get_computed_blocks(make_request("b", prompt, prompt_logprobs=1)) == (([],), 0)


def test_caching_disabled_never_hits(make_request):
    manager = KVCacheManager(num_blocks=32, block_size=BLOCK, enable_caching=False)
    prompt = list(range(1, 14))
    admit(manager, make_request("a", prompt))
    assert manager.block_pool.cached_block_hash_to_block == {}
    assert manager.get_computed_blocks(make_request("b", prompt)) == (([],), 0)


def test_free_returns_every_block_tail_first(make_request):
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK)
    request = make_request("r", range(1, 15))  # 4 blocks
    admit(manager, request)
    blocks = list(manager.groups[0].req_to_blocks["r"])
    manager.free(request)
    assert manager.num_free_blocks == 15
    assert not manager.holds("r")
    assert all(block.ref_cnt == 0 for block in blocks)
    # Freed tail first: the prompt's later blocks are evicted before its first ones.
    queue = [block.block_id for block in manager.block_pool.free_block_queue]
    assert queue[-4:] == [block.block_id for block in reversed(blocks)]


@pytest.mark.parametrize("enable_caching", [True, False])
def test_everything_is_free_after_all_requests_finish(make_request, enable_caching):
    manager = KVCacheManager(num_blocks=40, block_size=BLOCK, enable_caching=enable_caching)
    shared = list(range(1, 11))
    requests = [make_request(f"r{i}", shared + [100 + i] * (i + 1)) for i in range(6)]
    for request in requests:
        admit(manager, request)
        for token in range(5):
            request.append_output_token(200 + token)
            compute(manager, request, 1)
    for request in requests:
        manager.free(request)
    assert manager.num_free_blocks == 40 - 1
    assert not manager.request_ids()
    assert all(block.ref_cnt == 0 for block in manager.block_pool.blocks[1:])


# -- a sliding window on every layer (Mistral) ------------------------------------------------------

WINDOW = 7  # a query sees itself and the 6 tokens before it; with blocks of 4 its window starts mid-block


def held(manager, request_id):
    null = manager.block_pool.null_block
    return [block for block in manager.groups[0].req_to_blocks[request_id] if block is not null]


def assert_sees_its_window(manager, request):
    """Every block the request's next query (at num_computed_tokens) sees is still held."""
    first_seen = max(0, request.num_computed_tokens - WINDOW + 1) // BLOCK
    seen = manager.groups[0].req_to_blocks[request.request_id][first_seen:]
    assert manager.block_pool.null_block not in seen


def assert_all_free(manager):
    manager_blocks = manager.block_pool.blocks
    assert manager.num_free_blocks == len(manager_blocks) - 1
    assert manager.block_pool.null_block.ref_cnt == 1 and all(block.ref_cnt == 0 for block in manager_blocks[1:])


@pytest.mark.parametrize("chunk", [1, 8])
def test_a_context_many_windows_long_holds_about_a_window_of_blocks(make_request, chunk):
    """A 210-token request through a pool of 7 blocks (28 slots), decoding or in chunks of 8: the blocks
    behind its window go back to the pool as it moves, so it holds the window's blocks and the step's."""
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK, sliding_windows=(WINDOW,))
    request = make_request("r", range(10))
    compute(manager, request, 10)
    while request.num_computed_tokens < 210:
        compute(manager, request, chunk)
        blocks = held(manager, "r")
        assert len(blocks) <= manager.max_blocks_held(210, chunk) == -(-(WINDOW - 1 + chunk) // BLOCK) + 1
        assert manager.num_free_blocks == 7 - len(blocks)
        assert len(manager.groups[0].req_to_blocks["r"]) == -(-request.num_computed_tokens // BLOCK)  # indices kept
        assert_sees_its_window(manager, request)
    manager.free(request)
    assert_all_free(manager)


def test_a_full_attention_manager_holds_every_block(make_request):
    manager = KVCacheManager(num_blocks=20, block_size=BLOCK)
    request = make_request("r", range(10))
    compute(manager, request, 10)
    for _ in range(30):
        compute(manager, request, 1)
    assert len(held(manager, "r")) == 10 == manager.max_blocks_held(40, 1)


def test_a_prefix_hit_under_a_sliding_window_needs_only_the_blocks_its_window_sees(make_request):
    """The first request's early blocks went back to the pool long ago and were reused, so no leading
    run of them is cached; the blocks before the second request's first computed token are, and its
    window sees only those: the search from the end finds them, the blocks before are the null block."""
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK, sliding_windows=(WINDOW,))
    prompt = list(range(100, 150))  # 50 tokens: 12 full blocks
    first = make_request("first", prompt)
    while first.num_computed_tokens < len(prompt):  # chunked prefill: its first blocks are given back early
        compute(manager, first, min(8, len(prompt) - first.num_computed_tokens))
    last_blocks = manager.groups[0].req_to_blocks["first"][9:12]
    manager.free(first)
    filler = make_request("filler", range(300, 340))  # 10 blocks, from the head of the free queue
    compute(manager, filler, 40)
    assert manager.block_pool.get_cached_block(first.block_hashes[0]) is None  # evicted

    second = make_request("second", prompt + [7, 8, 9, 10, 11])
    (blocks,), num_cached = manager.get_computed_blocks(second)
    assert num_cached == 48  # 12 blocks: all but the last token's, as a full-attention hit would be
    null = manager.block_pool.null_block
    assert blocks[:10] == [null] * 10 and blocks[10:] == last_blocks[1:]
    compute(manager, second, len(second.prompt_token_ids) - 48, blocks, 48)
    assert [block.ref_cnt for block in last_blocks[1:]] == [1, 1]  # taken; the null places are not
    assert_sees_its_window(manager, second)
    for request in (filler, second):
        manager.free(request)
    assert_all_free(manager)


def test_hits_behind_the_window_are_not_taken(make_request):
    """A leading run of cached blocks is found from the end too; the hits behind the window of the
    first computed token stay in the pool."""
    manager = KVCacheManager(num_blocks=30, block_size=BLOCK, sliding_windows=(WINDOW,))
    owner = make_request("owner", range(40))
    compute(manager, owner, 40)  # one chunk: nothing is behind its window when it is allocated
    reader = make_request("reader", range(41))
    (blocks,), num_cached = manager.get_computed_blocks(reader)
    assert num_cached == 40
    free_before = manager.num_free_blocks
    compute(manager, reader, 1, blocks, num_cached)  # first query at 40: sees 34..40, blocks 8 and 9
    assert [block.ref_cnt for block in manager.groups[0].req_to_blocks["owner"]] == [1] * 8 + [2, 2]
    assert len(held(manager, "reader")) == 3 and manager.num_free_blocks == free_before - 1


def test_a_sibling_shares_no_prompt_block_it_has_given_back(make_request):
    """`n > 1` without prefix caching: a later child shares the first child's prompt blocks, unless the
    first has moved on far enough to give back blocks the later child's first query would see."""
    manager = KVCacheManager(num_blocks=30, block_size=BLOCK, enable_caching=False, sliding_windows=(WINDOW,))
    first = make_request("p-0", range(30), parent_id="p", index=0)
    compute(manager, first, 30)
    second = make_request("p-1", range(30), parent_id="p", index=1)
    (blocks,), num_cached = manager.get_computed_blocks(second, first)
    assert num_cached == 28  # its first query (at 28) sees 22..28: blocks 5 to 7, all still held
    for _ in range(4):  # the first child decodes past 33: block 5 goes back to the pool
        compute(manager, first, 1)
    assert manager.get_computed_blocks(second, first) == (([],), 0)


# -- hybrid models: a full-attention group and a sliding one on one pool (Gemma 2) --------------------

HYBRID = (None, WINDOW)


def test_a_hybrid_request_keeps_its_global_blocks_and_gives_back_the_sliding_ones(make_request):
    manager = KVCacheManager(num_blocks=40, block_size=BLOCK, sliding_windows=HYBRID)
    full, sliding = manager.groups
    request = make_request("r", range(10))
    compute(manager, request, 10)
    while request.num_computed_tokens < 100:
        compute(manager, request, 1)
    null = manager.block_pool.null_block
    assert len(full.req_to_blocks["r"]) == 25 and null not in full.req_to_blocks["r"]
    sliding_held = [block for block in sliding.req_to_blocks["r"] if block is not null]
    assert len(sliding.req_to_blocks["r"]) == 25 and len(sliding_held) <= sliding.max_blocks_held(100, 1)
    assert manager.num_free_blocks == 39 - 25 - len(sliding_held)
    assert not set(full.req_to_blocks["r"]) & set(sliding_held)  # a block belongs to one group
    assert manager.max_blocks_held(100, 1) == 25 + sliding.max_blocks_held(100, 1)
    manager.free(request)
    assert_all_free(manager)


def test_a_hybrid_request_is_refused_whole_when_one_group_does_not_fit(make_request):
    manager = KVCacheManager(num_blocks=6, block_size=BLOCK, sliding_windows=HYBRID)  # 5 usable
    assert manager.allocate_slots(make_request("r", range(12)), 12) is None  # 3 blocks in each group
    assert manager.num_free_blocks == 5 and not manager.request_ids()


def test_a_hybrid_prefix_hit_is_one_that_every_group_has(make_request):
    """A 50-token prompt through 20 usable blocks in chunks of 8: its sliding blocks go back to the
    pool as the window moves and the later chunks reuse them, while the global group keeps every
    block cached. A prompt that extends it hits in both groups (the sliding group still has the
    last window's blocks); one that diverges after 6 blocks hits nothing, though the global group
    alone has all 6: the sliding group has none of the blocks a query there would see."""
    manager = KVCacheManager(num_blocks=21, block_size=BLOCK, sliding_windows=HYBRID)
    prompt = list(range(100, 150))  # 12 full blocks
    first = make_request("first", prompt)
    while first.num_computed_tokens < len(prompt):
        compute(manager, first, min(8, len(prompt) - first.num_computed_tokens))
    manager.free(first)

    extends = make_request("extends", prompt + [1, 2, 3])
    (full_hits, sliding_hits), num_cached = manager.get_computed_blocks(extends)
    assert num_cached == 48 and len(full_hits) == len(sliding_hits) == 12
    null = manager.block_pool.null_block
    assert null not in full_hits and null not in sliding_hits[-2:] and sliding_hits[0] is null
    assert manager.allocate_slots(extends, 5, (full_hits, sliding_hits)) is not None
    manager.free(extends)

    diverges = make_request("diverges", prompt[:24] + [7] * 20)
    (full_hits, sliding_hits), num_cached = manager.get_computed_blocks(diverges)
    assert num_cached == 0 and full_hits == sliding_hits == []
    # The global group alone would hit all 6: its hashes are tagged apart from the sliding group's.
    assert len(manager.groups[0].find_longest_cache_hit(diverges.block_hashes[:6])) == 6
    assert manager.groups[1].find_longest_cache_hit(diverges.block_hashes[:6]) == []


def test_a_hybrid_sibling_shares_its_prompt_blocks_in_every_group_until_its_window_moves_on(make_request):
    """`n > 1` without prefix caching: the later child takes the first child's prompt blocks in both
    groups, until the first child's sliding group has given back a block the later child would see."""
    manager = KVCacheManager(num_blocks=40, block_size=BLOCK, enable_caching=False, sliding_windows=HYBRID)
    first = make_request("p-0", range(30), parent_id="p", index=0)
    compute(manager, first, 30)
    second = make_request("p-1", range(30), parent_id="p", index=1)
    (full, sliding), num_cached = manager.get_computed_blocks(second, first)
    assert num_cached == 28
    assert full == manager.groups[0].req_to_blocks["p-0"][:7] and sliding == manager.groups[1].req_to_blocks["p-0"][:7]
    for _ in range(4):  # past 33: the first child's sliding group gives back block 5
        compute(manager, first, 1)
    assert manager.get_computed_blocks(second, first) == (([], []), 0)
