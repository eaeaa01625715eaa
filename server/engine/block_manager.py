"""The paged KV cache's bookkeeping: a free list of fixed-size blocks with reference counts.

Pure Python (no torch): it hands out block ids; the runner turns them into slots. A block shared by
several holders (an adapter's prefix, linked into many requests) is freed when its last holder lets go.
"""

from collections import deque


class BlockManager:
    def __init__(self, *, num_blocks: int, block_size: int) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` KV entries."""
        return -(-num_tokens // self.block_size)

    def grow(self, block_table: list[int], num_tokens: int) -> bool:
        """Append blocks to `block_table` until it holds `num_tokens` entries; all or nothing."""
        need = self.blocks_for(num_tokens) - len(block_table)
        if need > len(self._free):
            return False
        for _ in range(need):
            block = self._free.popleft()
            self._refs[block] = 1
            block_table.append(block)
        return True

    def link_prefix(self, block_table: list[int], prefix_blocks: tuple[int, ...], prefix_len: int) -> tuple[int, int] | None | bool:
        """Start an empty `block_table` with a shared prefix of `prefix_len` entries held in `prefix_blocks`.

        Full prefix blocks are shared; a partial last block is given a private copy (new tokens will be
        written after the prefix in it). Returns the (src, dst) block copy to perform, None if there is
        none, or False (and leaves `block_table` empty) when no block is free for the copy.
        """
        assert not block_table
        full = prefix_len // self.block_size
        if prefix_len % self.block_size == 0:
            self.share(list(prefix_blocks[:full]))
            block_table.extend(prefix_blocks[:full])
            return None
        if not self._free:
            return False
        self.share(list(prefix_blocks[:full]))
        block_table.extend(prefix_blocks[:full])
        copy = self._free.popleft()
        self._refs[copy] = 1
        block_table.append(copy)
        return (prefix_blocks[full], copy)

    def share(self, blocks: list[int]) -> None:
        """Add a holder to blocks that are already allocated (e.g. a shared prefix)."""
        for block in blocks:
            assert self._refs[block] > 0, f"block {block} is not allocated"
            self._refs[block] += 1

    def release(self, block_table: list[int]) -> None:
        """Drop one holder from each block in `block_table` and empty it; blocks without holders become free."""
        for block in block_table:
            assert self._refs[block] > 0, f"block {block} released twice"
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free.append(block)
        block_table.clear()
