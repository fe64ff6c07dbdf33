"""BlockPool: the free queue, ref counts, the null block, prefix-cache hits and LRU eviction."""

import pytest

from engine.core.block_pool import BlockPool, FreeKVCacheBlockQueue, KVCacheBlock, hash_block_tokens


def ids(blocks):
    return [block.block_id for block in blocks]


def cache(pool, block, tokens, parent=None):
    block_hash = hash_block_tokens(parent, tokens, None)
    pool.cache_full_block(block, block_hash)
    return block_hash


# -- FreeKVCacheBlockQueue ----------------------------------------------------------------------


def test_free_queue_keeps_insertion_order_and_pops_from_the_head():
    blocks = [KVCacheBlock(i) for i in range(5)]
    queue = FreeKVCacheBlockQueue(blocks)
    assert queue.num_free_blocks == 5
    assert ids(queue) == [0, 1, 2, 3, 4]
    assert queue.popleft() is blocks[0]
    assert queue.popleft() is blocks[1]
    assert ids(queue) == [2, 3, 4]
    assert queue.num_free_blocks == 3


def test_free_queue_removes_from_the_middle_and_appends_to_the_tail():
    blocks = [KVCacheBlock(i) for i in range(6)]
    queue = FreeKVCacheBlockQueue(blocks)
    queue.remove(blocks[3])
    queue.remove(blocks[0])  # the head
    queue.remove(blocks[5])  # the tail
    assert ids(queue) == [1, 2, 4]
    assert queue.num_free_blocks == 3
    assert blocks[3].prev_free is None and blocks[3].next_free is None
    queue.append(blocks[3])
    queue.append(blocks[0])
    assert ids(queue) == [1, 2, 4, 3, 0]
    assert [queue.popleft().block_id for _ in range(5)] == [1, 2, 4, 3, 0]
    assert queue.num_free_blocks == 0
    with pytest.raises(ValueError):
        queue.popleft()
    queue.append(blocks[2])  # usable again once emptied
    assert ids(queue) == [2]


def test_free_queue_removal_is_constant_time():
    """Removing a block touches only its neighbours' links, whatever the queue's length."""
    blocks = [KVCacheBlock(i) for i in range(10_000)]
    queue = FreeKVCacheBlockQueue(blocks)
    middle = blocks[5_000]
    before, after = middle.prev_free, middle.next_free
    queue.remove(middle)
    assert before.next_free is after and after.prev_free is before
    assert queue.num_free_blocks == 9_999


# -- BlockPool ----------------------------------------------------------------------------------


def test_null_block_is_never_handed_out():
    pool = BlockPool(num_blocks=5, enable_caching=True)
    assert pool.get_num_free_blocks() == 4
    assert pool.null_block.block_id == 0
    blocks = pool.get_new_blocks(4)
    assert sorted(ids(blocks)) == [1, 2, 3, 4]
    assert pool.get_num_free_blocks() == 0
    with pytest.raises(ValueError):
        pool.get_new_blocks(1)
    pool.free_blocks(blocks)
    assert 0 not in ids(pool.free_block_queue)
    assert pool.null_block.ref_cnt == 1


def test_pool_needs_two_blocks():
    with pytest.raises(ValueError):
        BlockPool(num_blocks=1, enable_caching=True)


def test_asking_for_more_blocks_than_free_changes_nothing():
    pool = BlockPool(num_blocks=4, enable_caching=True)
    with pytest.raises(ValueError):
        pool.get_new_blocks(4)
    assert pool.get_num_free_blocks() == 3
    assert all(block.ref_cnt == 0 for block in pool.blocks[1:])


def test_ref_counts_through_get_touch_and_free():
    pool = BlockPool(num_blocks=6, enable_caching=True)
    a, b = pool.get_new_blocks(2)
    assert (a.ref_cnt, b.ref_cnt) == (1, 1)
    assert pool.get_num_free_blocks() == 3
    pool.touch([a, b])  # a second request shares them
    assert (a.ref_cnt, b.ref_cnt) == (2, 2)
    pool.free_blocks([a, b])
    assert (a.ref_cnt, b.ref_cnt) == (1, 1)
    assert pool.get_num_free_blocks() == 3, "blocks still referenced must not be free"
    pool.free_blocks([b, a])
    assert (a.ref_cnt, b.ref_cnt) == (0, 0)
    assert pool.get_num_free_blocks() == 5
    assert pool.get_usage() == 0.0


def test_usage_counts_blocks_in_use():
    pool = BlockPool(num_blocks=5, enable_caching=True)
    pool.get_new_blocks(2)
    assert pool.get_usage() == pytest.approx(0.5)


def test_freed_cached_block_keeps_its_hash_and_can_be_touched_back():
    pool = BlockPool(num_blocks=5, enable_caching=True)
    block = pool.get_new_blocks(1)[0]
    block_hash = cache(pool, block, [1, 2, 3, 4])
    pool.free_blocks([block])
    assert block.ref_cnt == 0
    assert block.block_hash == block_hash
    assert pool.get_cached_block(block_hash) is block
    assert pool.get_num_free_blocks() == 4

    pool.touch([pool.get_cached_block(block_hash)])  # a prefix hit takes it out of the free queue
    assert block.ref_cnt == 1
    assert pool.get_num_free_blocks() == 3
    assert block.block_id not in ids(pool.free_block_queue)
    assert pool.get_cached_block(block_hash) is block


def test_reusing_a_freed_cached_block_evicts_its_hash():
    pool = BlockPool(num_blocks=3, enable_caching=True)
    first, second = pool.get_new_blocks(2)
    hash_first = cache(pool, first, [1, 2])
    hash_second = cache(pool, second, [3, 4], parent=hash_first)
    pool.free_blocks([second, first])  # eviction order: the tail block first

    reused = pool.get_new_blocks(1)[0]
    assert reused is second
    assert reused.block_hash is None
    assert hash_second not in pool.cached_block_hash_to_block
    assert pool.get_cached_block(hash_first) is first, "the block not reused stays cached"

    reused_again = pool.get_new_blocks(1)[0]
    assert reused_again is first
    assert pool.cached_block_hash_to_block == {}


def test_least_recently_freed_block_is_evicted_first():
    pool = BlockPool(num_blocks=5, enable_caching=True)
    blocks = pool.get_new_blocks(4)
    hashes = [cache(pool, block, [i, i]) for i, block in enumerate(blocks)]
    order = [blocks[2], blocks[0], blocks[3], blocks[1]]
    for block in order:  # freed one at a time: block 2 is the least recently used
        pool.free_blocks([block])
    assert ids(pool.free_block_queue) == ids(order)

    # A hit on a block in the middle of the queue moves it out; freeing it again makes it the newest.
    pool.touch([blocks[3]])
    pool.free_blocks([blocks[3]])
    expected = [blocks[2], blocks[0], blocks[1], blocks[3]]
    assert ids(pool.free_block_queue) == ids(expected)

    evicted = pool.get_new_blocks(2)
    assert ids(evicted) == ids(expected[:2])
    assert set(pool.cached_block_hash_to_block) == {hashes[1], hashes[3]}


def test_a_twin_block_with_the_same_hash_does_not_replace_the_cached_one():
    pool = BlockPool(num_blocks=4, enable_caching=True)
    original, twin = pool.get_new_blocks(2)
    block_hash = cache(pool, original, [7, 7])
    cache(pool, twin, [7, 7])
    assert pool.get_cached_block(block_hash) is original
    pool.free_blocks([twin, original])
    pool.get_new_blocks(1)  # reuses the twin (freed first): the cached original must survive
    assert pool.get_cached_block(block_hash) is original


def test_reset_prefix_cache_forgets_free_blocks():
    pool = BlockPool(num_blocks=4, enable_caching=True)
    kept, freed = pool.get_new_blocks(2)
    kept_hash = cache(pool, kept, [1])
    freed_hash = cache(pool, freed, [2])
    pool.free_blocks([freed])
    pool.reset_prefix_cache()
    assert pool.get_cached_block(freed_hash) is None
    assert freed.block_hash is None
    assert pool.get_cached_block(kept_hash) is kept


# -- block hashes -------------------------------------------------------------------------------


def test_hash_is_deterministic_and_depends_on_tokens():
    assert hash_block_tokens(None, [1, 2, 3, 4], None) == hash_block_tokens(None, [1, 2, 3, 4], None)
    assert hash_block_tokens(None, [1, 2, 3, 4], None) != hash_block_tokens(None, [1, 2, 3, 5], None)
    assert hash_block_tokens(None, [1, 2, 3, 4], None) != hash_block_tokens(None, [4, 3, 2, 1], None)


def test_hash_chains_over_every_earlier_token():
    first_a = hash_block_tokens(None, [1, 2, 3, 4], None)
    first_b = hash_block_tokens(None, [9, 2, 3, 4], None)
    second_a = hash_block_tokens(first_a, [5, 6, 7, 8], None)
    second_b = hash_block_tokens(first_b, [5, 6, 7, 8], None)
    assert second_a != second_b, "same block tokens after a different prefix must not share a hash"
    assert second_a == hash_block_tokens(first_a, [5, 6, 7, 8], None)
    assert second_a != hash_block_tokens(None, [5, 6, 7, 8], None)


def test_salt_isolates_tenants_along_the_whole_chain():
    tokens, more = [1, 2, 3, 4], [5, 6, 7, 8]
    unsalted = hash_block_tokens(None, tokens, None)
    salt_a = hash_block_tokens(None, tokens, "tenant-a")
    salt_b = hash_block_tokens(None, tokens, "tenant-b")
    assert len({unsalted, salt_a, salt_b}) == 3
    assert salt_a == hash_block_tokens(None, tokens, "tenant-a")
    second = {hash_block_tokens(parent, more, salt) for parent, salt in
              ((unsalted, None), (salt_a, "tenant-a"), (salt_b, "tenant-b"))}
    assert len(second) == 3
