"""The CPU kernels written in C (cpu_decode.c), compiled on first use and loaded with ctypes.

Built with the system's C compiler (`$CC`, else `cc`) for this machine's CPU (-march=native) into
$QUIVER_CACHE_DIR/kernels (else $XDG_CACHE_HOME/quiver/kernels, else ~/.cache/quiver/kernels), named by a hash of
the source, the flags and the CPU, so a rebuild happens only when one of those changes; the build writes a
temporary file and renames it, so processes building at once never load a half-written library. No compiler,
a failed build or QUIVER_NATIVE_KERNELS=0: `decode_attention()` returns None and the torch backend keeps its
pure-torch path (logged once).
"""

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_decode.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fPIC", "-shared", "-pthread"]
_lock = threading.Lock()
_loaded: dict[str, object] = {}


def _cache_dir() -> Path:
    # the same root as quiver.config.cache_dir(); this package imports nothing from the rest of the project
    if "QUIVER_CACHE_DIR" in os.environ:
        return Path(os.environ["QUIVER_CACHE_DIR"]) / "kernels"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quiver" / "kernels"


def _cpu_identity() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC", "cc")
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS).encode(), compiler.encode(),
                                     _cpu_identity().encode(), platform.machine().encode()])).hexdigest()[:16]
    target = _cache_dir() / f"cpu_decode-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(built), "-lm"],
                           check=True, capture_output=True, text=True, timeout=120)
            os.replace(built, target)
        log.info("built the CPU decode kernel: %s", target)
    lib = ctypes.CDLL(str(target))
    fn = lib.quiver_decode_attention
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, ptr, ptr, ptr, i64, ptr, ptr, i64, ptr, i64, i64, i64, i64, ctypes.c_float, i64]
    fn.restype = ctypes.c_int
    return fn


def _library():
    """The loaded kernel, or None (disabled or not buildable here; the reason logged once)."""
    if "fn" in _loaded:
        return _loaded["fn"]
    with _lock:
        if "fn" not in _loaded:
            fn = None
            if os.environ.get("QUIVER_NATIVE_KERNELS", "1") == "0":
                log.info("native CPU kernels off (QUIVER_NATIVE_KERNELS=0): decode attention in torch")
            else:
                try:
                    fn = _build()
                except (OSError, subprocess.SubprocessError) as exc:
                    detail = getattr(exc, "stderr", "") or exc
                    log.warning("could not build the CPU decode kernel, decode attention stays in torch: %s", detail)
            _loaded["fn"] = fn
    return _loaded["fn"]


def available() -> bool:
    return _library() is not None


def decode_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, query_starts: torch.Tensor, scale: float, out: torch.Tensor, entries: int,
) -> bool:
    """`out[row]` for every sequence with one query row (ops.PagedAttention's semantics), reading the blocks in
    place; other rows of `out` are left alone. `entries`: the KV entries those sequences hold in all (it decides
    whether to start threads). False (nothing written) when the kernel does not apply: not built here, not
    float32 on the CPU, or a layout it does not take. Raises if it ran out of memory or threads."""
    fn = _library()
    if fn is None or not _takes(query, k_cache, v_cache, out, block_tables, seq_lens, query_starts):
        return False
    heads, dim = query.shape[1:]
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    failed = fn(
        query.data_ptr(), query.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
        block_tables.shape[1], seq_lens.data_ptr(), query_starts.data_ptr(), seq_lens.shape[0], out.data_ptr(),
        heads, kv_heads, dim, block_size, scale, _threads(entries * kv_heads * dim),
    )
    if failed:
        raise MemoryError("the CPU decode kernel could not get scratch memory or a thread")
    return True


def _takes(query, k_cache, v_cache, out, block_tables, seq_lens, query_starts) -> bool:
    f32, i32 = torch.float32, torch.int32
    return (
        query.device.type == "cpu" and query.dtype == k_cache.dtype == v_cache.dtype == out.dtype == f32
        and query.stride(2) == 1 and query.stride(1) == query.shape[2]
        and k_cache.is_contiguous() and v_cache.is_contiguous() and out.is_contiguous()
        and block_tables.dtype == seq_lens.dtype == query_starts.dtype == i32
        and block_tables.is_contiguous() and seq_lens.is_contiguous() and query_starts.is_contiguous()
    )


# Below this many key and value numbers read a call, one thread: starting a thread (~20 µs) costs more than it
# saves. Measured on this project's CPU: the skeleton model's 128 sequences of ~20 entries (~82K) take ~0.1 ms on one.
_THREADS_MIN_VALUES = 1 << 20


def _threads(values: int) -> int:
    return torch.get_num_threads() if values >= _THREADS_MIN_VALUES else 1
