import pytest

from server.engine.block_manager import BlockManager


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
