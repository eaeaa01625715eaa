"""The CPU kernels written in C, compiled on first use and loaded with ctypes: decode attention over the paged
cache (cpu_decode.c), the decoder layer's elementwise steps (cpu_layer.c), the adapters' deltas of short segments
(cpu_lora.c) and greedy picks over the logits (cpu_sample.c), all float32.

Built with the system's C compiler (`$CC`, else `cc`) for this machine's CPU (-march=native) into
$QUIVER_CACHE_DIR/kernels (else $XDG_CACHE_HOME/quiver/kernels, else ~/.cache/quiver/kernels), named by a hash of
the source, the flags and the CPU, so a rebuild happens only when one of those changes (and removes the earlier
builds); the build writes a temporary file and renames it, so processes building at once never load a
half-written library. The engine loads it when it starts on the CPU in float32. No compiler,
a failed build or QUIVER_NATIVE_KERNELS=0: `available()` is False, `decode_attention()` declines, and the
torch backend and the forward keep their pure-torch paths (logged once).
"""

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
import weakref
from pathlib import Path
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)

_DIR = Path(__file__).parent
_SOURCES = ["cpu_decode.c", "cpu_layer.c", "cpu_lora.c", "cpu_sample.c"]
_HEADERS = ["cpu_simd.h"]  # their shared helpers
# -ffp-contract=off: no product and sum fused into one rounding unless the code asks for it (see cpu_layer.c).
# -fopenmp: the library needs libgomp.so.1, which torch has loaded already (its own copy, under that soname), so
# the kernels' parallel loops run on the calling thread's OpenMP team, the one torch's ops use: no second pool.
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fPIC", "-shared"]
_lock = threading.Lock()
_loaded: dict[str, "_Library | None"] = {}


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


class _Library:
    """The built library's functions, their C signatures declared."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
        self.decode_attention = lib.quiver_decode_attention
        self.decode_attention.argtypes = [ptr, i64, ptr, ptr, ptr, i64, ptr, ptr, i64, ptr, i64, i64, i64, i64, f32, i64]
        self.decode_attention.restype = ctypes.c_int
        self.add_rms_norm = lib.quiver_add_rms_norm
        self.add_rms_norm.argtypes = [ptr, i64, ptr, ptr, ptr, f32, ptr, i64, i64]
        self.add_rms_norm.restype = None
        self.rope_store = lib.quiver_rope_store
        self.rope_store.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64]
        self.rope_store.restype = None
        self.silu_mul = lib.quiver_silu_mul
        self.silu_mul.argtypes = [ptr, i64, ptr, i64, i64]
        self.silu_mul.restype = None
        self.adapter_apply = lib.quiver_adapter_apply
        self.adapter_apply.argtypes = [ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, ptr, ptr, ptr, ctypes.c_int, ptr,
                                       ptr, ptr, i64, i64, i64]
        self.adapter_apply.restype = None
        self.greedy_rows = lib.quiver_greedy_rows
        self.greedy_rows.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64]
        self.greedy_rows.restype = None


def _build() -> _Library:
    compiler = os.environ.get("CC", "cc")
    sources = [_DIR / name for name in _SOURCES]
    parts = [p.read_bytes() for p in [*sources, *(_DIR / name for name in _HEADERS)]]
    key = hashlib.sha256(b"\0".join([*parts, " ".join(_FLAGS).encode(), compiler.encode(),
                                     _cpu_identity().encode(), platform.machine().encode()])).hexdigest()[:16]
    target = _cache_dir() / f"quiver_cpu-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            subprocess.run([compiler, *_FLAGS, *map(str, sources), "-o", str(built), "-lm"],
                           check=True, capture_output=True, text=True, timeout=120)
            os.replace(built, target)
        log.info("built the CPU kernels: %s", target)
        for stale in target.parent.glob("quiver_cpu-*.so"):  # earlier sources' builds (a process using one keeps it)
            if stale != target:
                stale.unlink(missing_ok=True)
    return _Library(target)


def _library() -> "_Library | None":
    """The loaded library, or None (disabled or not buildable here; the reason logged once)."""
    if "lib" in _loaded:
        return _loaded["lib"]
    with _lock:
        if "lib" not in _loaded:
            lib = None
            if os.environ.get("QUIVER_NATIVE_KERNELS", "1") == "0":
                log.info("native CPU kernels off (QUIVER_NATIVE_KERNELS=0): the pure-torch path")
            else:
                try:
                    lib = _build()
                except (OSError, subprocess.SubprocessError) as exc:
                    detail = getattr(exc, "stderr", "") or exc
                    log.warning("could not build the CPU kernels, the pure-torch path serves: %s", detail)
            _loaded["lib"] = lib
    return _loaded["lib"]


def available() -> bool:
    return _library() is not None


def decode_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, query_starts: torch.Tensor, scale: float, out: torch.Tensor, entries: int,
) -> bool:
    """`out[row]` for every sequence with one query row (ops.PagedAttention's semantics), reading the blocks in
    place; other rows of `out` are left alone. `entries`: the KV entries those sequences hold in all (it decides
    whether the call is shared with the OpenMP team). False (nothing written) when the kernel does not apply: not
    built here, not float32 on the CPU, or a layout it does not take. Raises if it ran out of memory."""
    lib = _library()
    if lib is None or not _takes(query, k_cache, v_cache, out, block_tables, seq_lens, query_starts):
        return False
    heads, dim = query.shape[1:]
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    failed = lib.decode_attention(
        query.data_ptr(), query.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
        block_tables.shape[1], seq_lens.data_ptr(), query_starts.data_ptr(), seq_lens.shape[0], out.data_ptr(),
        heads, kv_heads, dim, block_size, scale, _threads(entries * kv_heads * dim),
    )
    if failed:
        raise MemoryError("the CPU decode kernel could not get scratch memory")
    return True


def _takes(query, k_cache, v_cache, out, block_tables, seq_lens, query_starts) -> bool:
    f32, i32 = torch.float32, torch.int32
    return (
        query.device.type == "cpu" and query.dtype == k_cache.dtype == v_cache.dtype == out.dtype == f32
        and query.dim() == 3 and k_cache.dim() == 4 and out.shape == query.shape and v_cache.shape == k_cache.shape
        and query.shape[2] == k_cache.shape[3] and query.shape[1] % k_cache.shape[2] == 0
        and query.stride(2) == 1 and query.stride(1) == query.shape[2]
        and k_cache.is_contiguous() and v_cache.is_contiguous() and out.is_contiguous()
        and block_tables.dtype == seq_lens.dtype == query_starts.dtype == i32
        and block_tables.is_contiguous() and seq_lens.is_contiguous() and query_starts.is_contiguous()
        and block_tables.dim() == 2 and block_tables.shape[0] == seq_lens.numel() == query_starts.numel() - 1
    )


# Below this many numbers read a call, the calling thread alone: waking the OpenMP team costs about what it saves.
# Measured on this project's CPU (2 threads against 1): decode attention 11.6K values 8 against 9 us, 94K values
# 26 against 38 us; a LoRA call of 16K values 9 against 9 us, 131K values 18 against 26 us.
_THREADS_MIN_VALUES = 1 << 14


def _threads(values: int) -> int:
    return torch.get_num_threads() if values >= _THREADS_MIN_VALUES else 1


def takes_layer(h: torch.Tensor) -> bool:
    """Whether the layer functions below serve a forward over hidden states `h` (float32 on the CPU, built)."""
    return h.device.type == "cpu" and h.dtype == torch.float32 and _library() is not None


def add_rms_norm(
    delta: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(r) · weight, r) with r = residual + delta (delta alone when residual is None); [T, n] each."""
    rows, n = delta.shape
    _require(delta.stride(1) == 1 and weight.is_contiguous() and weight.numel() == n
             and (residual is None or (residual.is_contiguous() and residual.shape == delta.shape)))
    out, r = delta.new_empty(rows, n), delta.new_empty(rows, n)
    _library().add_rms_norm(delta.data_ptr(), delta.stride(0), None if residual is None else residual.data_ptr(),
                            r.data_ptr(), weight.data_ptr(), eps, out.data_ptr(), rows, n)
    return out, r


def rope_store(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor, k_cache: torch.Tensor,
    v_cache: torch.Tensor, *, heads: int, kv_heads: int, dim: int,
) -> torch.Tensor:
    """The queries [T, H, D] of qkv's rows ([T, (H + 2 KVH) D]: queries, keys, values), rotated; the rotated keys
    and the values stored at their slots (ops.StoreKV). cos, sin: [T, D] each, sin's first half negated."""
    rows = qkv.shape[0]
    _require(qkv.stride(1) == 1 and qkv.shape[1] == (heads + 2 * kv_heads) * dim
             and cos.is_contiguous() and sin.is_contiguous() and cos.numel() == sin.numel() == rows * dim
             and slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous() and slot_mapping.numel() == rows
             and k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[-2:] == (kv_heads, dim))
    q = qkv.new_empty(rows, heads, dim)
    _library().rope_store(qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), slot_mapping.data_ptr(),
                          q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), rows, heads, kv_heads, dim)
    return q


def silu_mul(gate_up: torch.Tensor, n: int) -> torch.Tensor:
    """silu(gate_up[:, :n]) * gate_up[:, n:2n]: [T, n]."""
    rows = gate_up.shape[0]
    _require(gate_up.stride(1) == 1 and gate_up.shape[1] >= 2 * n)
    out = gate_up.new_empty(rows, n)
    _library().silu_mul(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), rows, n)
    return out


# cpu_lora.c's codes for the non-linearities of ops.ACTIVATIONS
ACTIVATION_CODES = {None: 0, "relu": 1, "gelu": 2, "silu": 3, "tanh": 4}


def adapter_apply(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, seg_starts: torch.Tensor,
    seg_slots: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor, max_rows: int,
    a_bias: torch.Tensor | None = None, activation: str | None = None, b_bias: torch.Tensor | None = None,
) -> bool:
    """y[t] += scales[w] · (act(x[t] · a[0, w, :r]ᵀ + a_bias[w, :r]) · b[w, :, :r]ᵀ) + b_bias[w] for the rows of
    the segments of at most `max_rows` rows (longer ones untouched: the caller's), one row at a time; x may be y
    itself (a row's input is read whole before its delta is added). LoRA (ops.LoraApply) without the biases and
    the non-linearity; a bottleneck adapter (lora_shrink then lora_expand) with them. False (nothing added) where
    it does not apply: not built here, not float32 on the CPU, a layout it does not take, or a rank above 1024."""
    lib = _library()
    weights = None if lib is None else _weights(a, b, ranks, scales, a_bias, b_bias)
    if (weights is None or y.dtype != torch.float32 or x.dtype != torch.float32 or not (y.is_cpu and x.is_cpu)
            or y.dim() != 2 or x.dim() != 2):
        return False
    (rows, outputs), (x_rows, inputs), y_stride, x_stride = y.shape, x.shape, y.stride(), x.stride()
    if (y_stride[1] != 1 or x_stride[1] != 1 or x_rows != rows or inputs != weights.inputs
            or outputs != weights.outputs or seg_starts.dtype != torch.int32 or seg_slots.dtype != torch.int32
            or not (seg_starts.is_contiguous() and seg_slots.is_contiguous())):
        return False
    lib.adapter_apply(
        y.data_ptr(), y_stride[0], x.data_ptr(), x_stride[0], *weights.args, ACTIVATION_CODES[activation],
        weights.b_bias, seg_starts.data_ptr(), seg_slots.data_ptr(), seg_slots.shape[0], max_rows,
        _threads(rows * weights.values_per_row),
    )
    return True


class _Weights(NamedTuple):
    """An adapter stack's part of adapter_apply's arguments, its tensors checked."""

    a: "weakref.ref[torch.Tensor]"
    tensors: tuple  # (b, ranks, scales, a_bias, b_bias): the stack's other tensors, the same objects at every call
    pointers: tuple[int, int]  # a's and b's data: a stack is written in place, never moved
    args: tuple  # a, b, R, in, out, ranks, scales, a_bias (pointers and sizes, in the C signature's order)
    b_bias: int | None
    inputs: int
    outputs: int
    values_per_row: int  # the weights a row reads at most: R · (in + out)


# Adapter stacks (the adapter layers' persistent tensors) already checked, by id of their `a` (an entry leaves
# with its tensor): a decode step calls the kernel ~100 times with the same few stacks, and checking ten tensors
# at every call cost about a third of a call's Python.
_checked_weights: dict[int, _Weights] = {}


def _weights(a, b, ranks, scales, a_bias, b_bias) -> _Weights | None:
    """The stack's arguments, or None where the kernel does not take it (see adapter_apply)."""
    known = _checked_weights.get(id(a))
    if known is not None and known.a() is a:
        kb, kr, ks, kab, kbb = known.tensors
        if (kb is b and kr is ranks and ks is scales and kab is a_bias and kbb is b_bias
                and known.pointers == (a.data_ptr(), b.data_ptr())):
            return known
    f32 = torch.float32
    if (not a.is_cpu or a.dim() != 4 or a.shape[0] != 1 or a.shape[2] > 1024 or b.dim() != 3
            or not a.dtype == b.dtype == scales.dtype == f32 or ranks.dtype != torch.int32
            or b.shape[0] != a.shape[1] or b.shape[2] != a.shape[2] or ranks.numel() < a.shape[1]
            or scales.numel() < a.shape[1]
            or not (a.is_contiguous() and b.is_contiguous() and ranks.is_contiguous() and scales.is_contiguous())
            or not (a_bias is None or (a_bias.dtype == f32 and a_bias.is_contiguous()
                                       and a_bias.shape == (a.shape[1], a.shape[2])))
            or not (b_bias is None or (b_bias.dtype == f32 and b_bias.is_contiguous()
                                       and b_bias.shape == (a.shape[1], b.shape[1])))):
        return None
    rank, inputs, outputs = a.shape[2], a.shape[3], b.shape[1]
    key = id(a)
    checked = _Weights(
        a=weakref.ref(a, lambda _: _checked_weights.pop(key, None)), tensors=(b, ranks, scales, a_bias, b_bias),
        pointers=(a.data_ptr(), b.data_ptr()),
        args=(a.data_ptr(), b.data_ptr(), rank, inputs, outputs, ranks.data_ptr(), scales.data_ptr(),
              None if a_bias is None else a_bias.data_ptr()),
        b_bias=None if b_bias is None else b_bias.data_ptr(), inputs=inputs, outputs=outputs,
        values_per_row=rank * (inputs + outputs),
    )
    _checked_weights[key] = checked
    return checked


def greedy_rows(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(each row's argmax [B] int64 (its first largest value), whether the row is all finite [B] bool) of logits
    [B, V] in one pass; None where it does not apply (not built, not float32 on the CPU, columns not contiguous)."""
    lib = _library()
    if lib is None or logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.stride(1) != 1:
        return None
    rows, n = logits.shape
    best = torch.empty(rows, dtype=torch.int64)
    finite = torch.empty(rows, dtype=torch.bool)
    lib.greedy_rows(logits.data_ptr(), rows, n, logits.stride(0), best.data_ptr(), finite.data_ptr(), _threads(rows * n))
    return best, finite


def _require(layout_ok: bool) -> None:
    # the C code reads and writes through raw pointers: a layout it does not expect must never reach it
    if not layout_ok:
        raise ValueError("a tensor layout the CPU kernel does not take")
