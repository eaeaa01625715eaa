"""The paged KV cache's bookkeeping: a free list of fixed-size blocks with reference counts, and a prefix
cache of full blocks addressed by their content.

Pure Python (no torch): it hands out block ids; the runner turns them into slots. A block shared by
several holders (an adapter's prefix, linked into many requests) is freed when its last holder lets go.

Prefix cache: a full block of a request's tokens can be registered under a key that stands for every token
up to its end (`block_key` chains the keys) and for what else its KV depends on (`root_key`). A later
request whose tokens begin the same way shares it instead of recomputing it. A registered block without
holders keeps its KV and its key, and is evicted (least recently used first) only when a block is needed
and the free list is empty; so it counts as free.
"""

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence


def root_key(adapter: tuple[str, int] | None, salt: str | None = None) -> bytes:
    """The key before a request's first block: its adapter (id, version), whose weights its KV depends on
    (None for the base model), and its cache salt, the scope its blocks may be shared in (None: global).
    Requests with different salts never share a block."""
    return hashlib.sha256(repr((adapter, salt)).encode()).digest()


def block_key(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The key of a full block holding `token_ids`, after the block whose key is `parent` (or the root).

    A cryptographic hash: two different token sequences never meet under one key, so one request can
    never be handed another's KV by a crafted prompt.
    """
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


class BlockManager:
    def __init__(self, *, num_blocks: int, block_size: int) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self._block_of: dict[bytes, int] = {}  # key -> the registered block holding it
        self._key_of: dict[int, bytes] = {}  # the reverse map
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered blocks without holders, oldest first
        self.num_evictions = 0  # registered blocks taken for other tokens

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now: free ones and evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks with at least one holder."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Registered blocks without holders: their KV is kept until the block is needed."""
        return len(self._evictable)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` KV entries."""
        return -(-num_tokens // self.block_size)

    def grow(self, block_table: list[int], num_tokens: int) -> bool:
        """Append blocks to `block_table` until it holds `num_tokens` entries; all or nothing."""
        need = self.blocks_for(num_tokens) - len(block_table)
        if need > self.num_free:
            return False
        for _ in range(need):
            block_table.append(self._take())
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
        if not self.num_free:
            return False
        self.share(list(prefix_blocks[:full]))
        block_table.extend(prefix_blocks[:full])
        copy = self._take()
        block_table.append(copy)
        return (prefix_blocks[full], copy)

    def share(self, blocks: list[int]) -> None:
        """Add a holder to blocks that are already allocated (e.g. a shared prefix)."""
        for block in blocks:
            assert self._refs[block] > 0, f"block {block} is not allocated"
            self._refs[block] += 1

    def share_cached(self, block_table: list[int], key: bytes) -> bool:
        """If a block is registered under `key`, add a holder to it and append it to `block_table`."""
        block = self._block_of.get(key)
        if block is None:
            return False
        self._evictable.pop(block, None)
        self._refs[block] += 1
        block_table.append(block)
        return True

    def register(self, block: int, key: bytes) -> None:
        """Offer a held, full block whose KV is computed under `key`; a key already registered keeps its block."""
        assert self._refs[block] > 0 and block not in self._key_of, f"block {block} cannot be registered"
        if key not in self._block_of:
            self._block_of[key] = block
            self._key_of[block] = key

    def release(self, block_table: list[int]) -> None:
        """Drop one holder from each block in `block_table` and empty it; blocks without holders become free
        (registered ones evictable). The table's tail goes first, so it is evicted before its head, which
        more requests are likely to share."""
        for block in reversed(block_table):
            assert self._refs[block] > 0, f"block {block} released twice"
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            if block in self._key_of:
                self._evictable[block] = None
            else:
                self._free.append(block)
        block_table.clear()

    def forget_sole(self, block_table: list[int]) -> list[int]:
        """The blocks of `block_table` that no other holder shares, unregistered from the prefix cache: their
        KV is untrusted (e.g. not finite) and about to be cleared, and no later request may find it."""
        sole = [block for block in block_table if self._refs[block] == 1]
        for block in sole:
            if block in self._key_of:
                self._forget(block)
        return sole

    def drop_cached(self) -> int:
        """Forget every cached block without holders (they become plain free blocks); returns how many.
        Blocks held by running requests keep their keys."""
        dropped = len(self._evictable)
        for block in self._evictable:
            self._forget(block)
            self._free.append(block)
        self._evictable.clear()
        return dropped

    def _take(self) -> int:
        """One block for a new holder: a free one, else the least recently used cached one, forgetting its key."""
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            self._forget(block)
            self.num_evictions += 1
        self._refs[block] = 1
        return block

    def _forget(self, block: int) -> None:
        """Unregister a cached block: no request can find it any more."""
        del self._block_of[self._key_of.pop(block)]
