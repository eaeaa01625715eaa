import pytest

from quiver.engine.block_manager import BlockManager, block_key, root_key


def test_grow_is_all_or_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    table: list[int] = []
    assert bm.grow(table, 9) and len(table) == 3 and bm.num_free == 1
    assert bm.grow(table, 12) and len(table) == 3  # 12 entries still fit in 3 blocks
    other: list[int] = []
    assert not bm.grow(other, 8) and other == [] and bm.num_free == 1


def test_shared_blocks_are_freed_by_their_last_holder():
    bm = BlockManager(num_blocks=4, block_size=2)
    prefix: list[int] = []
    bm.grow(prefix, 4)
    holder = list(prefix)
    bm.share(holder)
    bm.release(prefix)
    assert bm.num_free == 2  # still held by `holder`
    bm.release(holder)
    assert bm.num_free == 4 and holder == []


def test_release_twice_is_a_bug():
    bm = BlockManager(num_blocks=2, block_size=2)
    table: list[int] = []
    bm.grow(table, 2)
    copy = list(table)
    bm.release(table)
    with pytest.raises(AssertionError):
        bm.release(copy)


def _cached(bm: BlockManager, keys: list[bytes]) -> list[int]:
    """Allocate one full block per key, register it, release it: a list of evictable cached blocks."""
    table: list[int] = []
    assert bm.grow(table, len(keys) * bm.block_size)
    blocks = list(table)
    for block, key in zip(blocks, keys):
        bm.register(block, key)
    bm.release(table)
    return blocks


def test_keys_chain_the_root_and_every_token_before():
    base, adapter = root_key(None), root_key(("a", 1))
    assert len({base, adapter, root_key(("a", 2)), root_key(("b", 1))}) == 4
    assert block_key(base, [1, 2]) == block_key(root_key(None), [1, 2])
    assert block_key(base, [1, 2]) != block_key(adapter, [1, 2])
    assert block_key(block_key(base, [1, 2]), [3, 4]) != block_key(block_key(base, [9, 2]), [3, 4])


def test_released_registered_blocks_stay_cached_and_count_as_free():
    bm = BlockManager(num_blocks=4, block_size=2)
    k1, k2 = block_key(root_key(None), [1, 2]), block_key(root_key(None), [3, 4])
    b1, b2 = _cached(bm, [k1, k2])
    assert bm.num_cached == 2 and bm.num_free == 4 and bm.num_used == 0
    table: list[int] = []
    assert bm.share_cached(table, k1) and table == [b1]
    assert bm.num_cached == 1 and bm.num_free == 3 and bm.num_used == 1
    other: list[int] = []
    assert bm.share_cached(other, k1) and other == [b1]  # a second holder of the same block
    bm.release(table)
    assert bm.num_used == 1 and bm.num_cached == 1  # still held by `other`
    bm.release(other)
    assert bm.num_used == 0 and bm.num_cached == 2
    assert not bm.share_cached(table, block_key(root_key(("a", 1)), [1, 2])) and table == []


def test_free_blocks_go_first_then_the_least_recently_used_cached_one_loses_its_key():
    bm = BlockManager(num_blocks=4, block_size=2)
    keys = [block_key(root_key(None), [t, t]) for t in range(3)]
    blocks = _cached(bm, keys)  # released tail first: keys[2] is the oldest, keys[0] the newest
    free = [b for b in range(4) if b not in blocks]
    held: list[int] = []
    assert bm.grow(held, 2) and held == free and bm.num_evictions == 0
    assert bm.grow(held, 4) and held[-1] == blocks[2] and bm.num_evictions == 1
    assert not bm.share_cached([], keys[2])  # its key went with it
    touched: list[int] = []
    assert bm.share_cached(touched, keys[1])
    bm.release(touched)  # keys[1] used again: keys[0] is now the least recently used
    assert bm.grow(held, 6) and held[-1] == blocks[0]
    assert bm.share_cached(touched, keys[1]) and bm.num_free == 0
    assert not bm.grow(held, 8)  # every block has a holder: nothing to evict


def test_a_key_keeps_its_first_block():
    bm = BlockManager(num_blocks=2, block_size=2)
    key = block_key(root_key(None), [1, 2])
    first, second = [], []
    bm.grow(first, 2)
    bm.grow(second, 2)
    bm.register(first[0], key)
    bm.register(second[0], key)  # the same tokens computed twice at once: the second copy stays private
    kept = first[0]
    bm.release(first)
    bm.release(second)
    assert bm.num_cached == 1
    table: list[int] = []
    assert bm.share_cached(table, key) and table == [kept]


def test_drop_cached_forgets_idle_cached_blocks_only():
    bm = BlockManager(num_blocks=4, block_size=2)
    k1, k2 = block_key(root_key(None), [1, 2]), block_key(root_key(None), [3, 4])
    _cached(bm, [k1, k2])
    held: list[int] = []
    assert bm.share_cached(held, k1)
    assert bm.drop_cached() == 1 and bm.num_cached == 0 and bm.num_free == 3
    assert not bm.share_cached([], k2)  # forgotten
    assert bm.share_cached([], k1)  # held by a request: kept


def test_a_cache_salt_is_part_of_the_root_key():
    keys = [root_key(None), root_key(None, "alice"), root_key(None, "bob"), root_key(("a", 1), "alice"), root_key(None, "None")]
    assert len(set(keys)) == len(keys)
    assert root_key(("a", 1), "alice") == root_key(("a", 1), "alice") and root_key(None) == root_key(None, None)


def test_forget_sole_unregisters_the_blocks_no_one_else_holds():
    bm = BlockManager(num_blocks=4, block_size=2)
    k1, k2 = block_key(root_key(None), [1, 2]), block_key(root_key(None), [3, 4])
    failed, other = [], []
    assert bm.grow(failed, 4)
    bm.register(failed[0], k1)
    bm.register(failed[1], k2)
    assert bm.share_cached(other, k1)  # another request shares the first block
    assert bm.forget_sole(failed) == [failed[1]]
    bm.release(failed)
    assert bm.num_cached == 0 and bm.num_used == 1  # the second block is plain free: its key is gone
    probe: list[int] = []
    assert not bm.share_cached(probe, k2) and bm.share_cached(probe, k1)
