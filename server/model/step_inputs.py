"""Persistent buffers for a decode step's inputs, one set per batch-size bucket.

A decode step (every sequence runs one token) reads its inputs — token ids, positions, slot mapping, block
tables, sequence lengths, query starts, adapter segments and their slots — from tensors allocated once per
bucket of batch sizes and refilled in place each step, so that the forward sees the same storage from one
decode step to the next of its bucket: what a captured CUDA graph needs (it replays reading fixed addresses).
Steps with a prefill chunk build their inputs afresh (they run eagerly).

A bucket holds up to its size of sequences: B sequences use the first B rows (first B + 1 for the starts), the
rest of a buffer holding whatever an earlier step left, never read (the starts, lengths and tables given to the
ops are the first rows only). Block tables are [size, max_blocks] and a step writes its tables' own widths; the
columns beyond a sequence's blocks are never read (its length bounds every read).
"""

import torch

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # batch sizes; beyond the last, multiples of it

# name -> (dtype, extra rows): the per-step inputs, 1-D but for the block tables (int32)
_FIELDS = {
    "input_ids": (torch.int64, 0),
    "positions": (torch.int64, 0),
    "slot_mapping": (torch.int64, 0),
    "seq_lens": (torch.int32, 0),
    "query_starts": (torch.int32, 1),
    "seg_starts": (torch.int32, 1),
    "seg_slots": (torch.int32, 0),
}


def bucket_of(num_seqs: int) -> int:
    """The bucket holding a decode step of `num_seqs` sequences: the smallest size >= it."""
    for size in BUCKETS:
        if num_seqs <= size:
            return size
    return -(-num_seqs // BUCKETS[-1]) * BUCKETS[-1]


class InputBuffers:
    """One bucket's buffers; `fill` writes a step's values in place and returns the view the step reads."""

    def __init__(self, size: int, *, max_blocks: int, device: torch.device) -> None:
        self.size = size
        self.buffers = {name: torch.zeros(size + extra, dtype=dtype, device=device) for name, (dtype, extra) in _FIELDS.items()}
        self.block_tables = torch.zeros(size, max_blocks, dtype=torch.int32, device=device)

    def fill(self, name: str, values: list[int]) -> torch.Tensor:
        """buffers[name][:len(values)] = values; that view."""
        view = self.buffers[name][: len(values)]
        view.copy_(torch.tensor(values, dtype=view.dtype))
        return view

    def fill_tables(self, tables: list[list[int]]) -> torch.Tensor:
        """The first len(tables) rows get the tables (padded to a common width, as they come); those rows, whole."""
        width = len(tables[0])
        if width > self.block_tables.shape[1]:  # never within max_model_len; kept correct if it happens
            self.block_tables = self.block_tables.new_zeros(self.size, width)
        rows = self.block_tables[: len(tables)]
        rows[:, :width].copy_(torch.tensor(tables, dtype=torch.int32))
        return rows


class FreshInputs:
    """`InputBuffers`' interface for a step that runs eagerly (a prefill): new tensors each call."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def fill(self, name: str, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=_FIELDS[name][0], device=self.device)

    def fill_tables(self, tables: list[list[int]]) -> torch.Tensor:
        return torch.tensor(tables, dtype=torch.int32, device=self.device)


class StepInputs:
    """The runner's persistent decode inputs, by bucket (made on first use)."""

    def __init__(self, *, max_blocks: int, device: torch.device) -> None:
        self.max_blocks = max_blocks  # blocks per sequence at most: the context's length over the block size
        self.device = device
        self._buckets: dict[int, InputBuffers] = {}

    def for_step(self, num_tokens: list[int]) -> InputBuffers | FreshInputs:
        """Where a step with these tokens per sequence writes its inputs: its bucket's buffers when it is a
        decode step (one token a sequence), else fresh tensors."""
        if any(n != 1 for n in num_tokens):
            return FreshInputs(self.device)
        return self.for_decode(len(num_tokens))

    def for_decode(self, num_seqs: int) -> InputBuffers:
        size = bucket_of(num_seqs)
        buffers = self._buckets.get(size)
        if buffers is None:
            buffers = self._buckets[size] = InputBuffers(size, max_blocks=self.max_blocks, device=self.device)
        return buffers
