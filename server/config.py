"""Configuration: frozen dataclasses built once (from the CLI or a test) and passed down.

Nothing here reads the environment at import; `default_cache_dir()` runs when a ModelConfig is made without
a cache_dir (and when the CLI builds one).
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_ADAPTER_SERIES = 50  # adapter ids with Prometheus series of their own; the rest are summed into adapter="other"


def default_cache_dir() -> Path:
    """Where converted models live: $QUIVER_CACHE_DIR, else $XDG_CACHE_HOME/quiver, else ~/.cache/quiver."""
    if "QUIVER_CACHE_DIR" in os.environ:
        return Path(os.environ["QUIVER_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quiver"


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None  # a local Hugging Face directory; None: the default SmolLM2-135M-Instruct
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA; or float32, bfloat16, float16
    device: str = "auto"  # auto: cuda if available, else cpu
    cache_dir: Path = field(default_factory=default_cache_dir)  # the rule, applied when the config is made


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16  # KV entries per block
    kv_cache_bytes: int | None = None  # KV pool budget; None: 90% of free CUDA memory, or 1 GiB on CPU
    num_kv_blocks: int | None = None  # exact pool size; overrides kv_cache_bytes (tests)
    max_num_seqs: int = 128  # requests running at once
    max_num_batched_tokens: int = 512  # tokens per step (decode tokens + prefill chunks)
    max_model_len: int | None = None  # prompt + generation; None: the model's max_position_embeddings
    max_queue_len: int = 4096  # waiting requests before new ones are refused
    kernel_backend: str = "auto"  # auto: triton on CUDA, torch on CPU; or torch, triton
    adapter_slots: int = 8  # LoRA/bottleneck adapters on the device at once (prefix kinds use KV blocks)
    max_lora_rank: int = 64
    max_bottleneck_size: int = 64
    host_cache_bytes: int = 2 << 30  # parsed adapter weights kept in host memory
    # where adapter versions keep snapshots of the files they were loaded from (read again from there after the
    # host cache dropped them); None: the system's temporary directory. Each engine makes its own directory
    # under it, deleted at exit; one left by a crash is deleted by the next engine started with the same one
    adapter_snapshot_dir: Path | None = None
    enable_prefix_caching: bool = True  # requests share the KV blocks of the tokens they begin with
    # torch's intra-op threads for the engine's steps (process-wide); None: torch's default (every core). The
    # CLI's default is `default_threads()`: see there
    num_threads: int | None = None
    # decode steps run eagerly: no CUDA graphs (which are used on CUDA with the triton backend, server/model/graphs.py)
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")


def default_threads() -> int:
    """The engine's default thread count: every core this process may run on but one (at least one).

    A step's parallel regions end at a barrier where the team's threads wait for each other, so a team as
    wide as the machine runs only as fast as its most descheduled thread: with one core kept busy by another
    process, a decode step on 2 threads of this 2-core machine took 3.2x as long, on 1 thread 1.03x
    (`python -m benchmarks.neighbour`, benchmarks/RESULTS.md, "Sharing the machine"). A server is never
    alone on its cores (its own gRPC and HTTP threads are such a neighbour), so it leaves one core free.
    """
    return max(1, len(os.sched_getaffinity(0)) - 1)
