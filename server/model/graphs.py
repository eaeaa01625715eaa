"""CUDA graphs of decode forwards: captured once per key (batch-size bucket and adapter layout), then replayed.

A decode step's forward reads every per-step input from its bucket's persistent buffers (step_inputs.py), pads
the batch to the bucket's size (padding rows write their K/V into a scratch block no request holds), and runs
the same ops whatever the step's mix of adapters: the adapter metadata (segments, slots) are tensors the graph
reads, and the layers run the ops of every adapter loaded on them rather than of the step's own (a slot of rank
0 costs its kernels nothing). So one graph per bucket serves any mix of adapters and kinds; the key also holds
the adapter layout (which layers hold LoRA or bottleneck weights, which non-linearities), which changes only
when an adapter touching new layers is loaded or the last one on some layers leaves.

Capture: the forward first runs once eagerly on a side stream (Triton compiles its kernels, the allocator
settles); that run writes the step's K/V, which replaying writes again, the same values into the same slots.
Every graph allocates from one shared memory pool, so a graph's output may share memory with another graph's
intermediates: the runner reads a replay's output before the next replay, within the same step.
A capture that fails (an op that reads back to the host, a rope variant that checks its length) turns graphs
off for the rest of the process, logged once: the engine serves on, eagerly.
"""

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

log = logging.getLogger(__name__)

# Graphs kept at most, least recently replayed dropped first: buckets times the adapter layouts in use are few,
# but layouts come and go as adapters touching other layers are loaded, and each graph holds device memory.
MAX_GRAPHS = 32


class DecodeGraphs:
    def __init__(self, max_graphs: int = MAX_GRAPHS) -> None:
        self.enabled = True
        self.max_graphs = max_graphs
        self.captures = 0  # graphs captured so far, dropped ones included
        self._graphs: OrderedDict[Hashable, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = OrderedDict()
        self._pool = None

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, key: Hashable, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """forward()'s output, replayed from the graph captured for `key` (captured now if there is none)."""
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(forward)
            except Exception as error:  # noqa: BLE001 -- any failure to capture means: serve eagerly
                self.enabled = False
                self._graphs.clear()
                log.warning("CUDA graph capture failed (%s); decode steps run eagerly from now on", error)
                return forward()
            self.captures += 1
            self._graphs[key] = entry
            if len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        graph, output = entry
        graph.replay()
        return output

    def _capture(self, forward: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            forward()  # warm-up: kernels compiled, workspaces allocated, outside the capture
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # shared by every bucket's graph: one replays at a time
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of the server's other threads (an adapter parsed onto the device, metrics) do
        # not invalidate the engine thread's capture
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            output = forward()
        return graph, output
