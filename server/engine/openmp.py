"""Give back the calling thread's OpenMP workers, so that the engine thread's are the only ones spinning.

On CPU, torch runs its parallel regions on an OpenMP team owned by the thread that runs them. The model is
loaded on the main thread (one team) and stepped on the engine thread (a second team). GNU libgomp counts
the workers of every live team, and once they outnumber the CPUs it stops spin-waiting between parallel
regions and sleeps on a futex instead: every region of the engine thread then pays a wake-up. On a 2-core
machine that made decode steps 30-50% slower than the same steps on the main thread
(`benchmarks/engine_thread.py`). `omp_pause_resource_all` (OpenMP 5.0) frees the calling thread's team; the
main thread makes a new one only if it runs parallel torch work again (a benchmark's baseline, say), so call
this again before the engine thread's timed work.
"""

import ctypes
import logging
import os

import torch

log = logging.getLogger(__name__)

_OMP_PAUSE_HARD = 2  # omp_pause_resource_t: free the threads, not only idle them


def release_thread_pool() -> bool:
    """Free the calling thread's OpenMP team, if torch runs on an OpenMP runtime we can find. Returns whether
    it did; never raises (the cost of not doing it is speed, not correctness)."""
    runtime = _runtime()
    if runtime is None:
        return False
    try:
        return runtime.omp_pause_resource_all(_OMP_PAUSE_HARD) == 0
    except AttributeError:  # a runtime older than OpenMP 5.0
        return False


# Names under which torch links its OpenMP runtime (the soname, not a file): GNU libgomp on Linux, LLVM's and
# Intel's elsewhere. Another copy can be loaded under a vendored name (sentencepiece ships one); that is a
# separate runtime with its own threads, and not the one to pause.
_SONAMES = ("libgomp.so.1", "libomp.so", "libomp.dylib", "libiomp5.so")


def _runtime() -> ctypes.CDLL | None:
    """torch's OpenMP runtime, found among the libraries already loaded (never loads one); None if none. Looked
    up at each call (a few dlopen calls of loaded libraries: the callers are not hot), so nothing is cached."""
    runtime = _loaded(_SONAMES) if torch.backends.openmp.is_available() else None
    if runtime is None:
        log.debug("no OpenMP runtime of torch's found in this process; the caller's threads stay")
    return runtime


def _loaded(names: tuple[str, ...]) -> ctypes.CDLL | None:
    for name in names:
        try:
            return ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_LOCAL)
        except (OSError, AttributeError):  # not loaded; or no RTLD_NOLOAD on this platform
            continue
    return None
