"""openmp.release_thread_pool frees the calling thread's OpenMP workers, in torch's runtime (not another copy)."""

import os
import sys
import threading

import pytest
import torch

from quiver.engine import openmp


def _threads() -> set[str]:
    return set(os.listdir("/proc/self/task"))


pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc"),
    pytest.mark.skipif(not torch.backends.openmp.is_available() or torch.get_num_threads() < 2,
                       reason="torch runs no OpenMP team here"),
]


def test_the_calling_threads_team_is_freed_and_no_other():
    try:  # where installed, it loads a second, vendored libgomp: the one not to pause
        import sentencepiece  # noqa: F401
    except ImportError:
        pass

    x = torch.randn(256, 1024)
    seen = {}

    def in_a_thread() -> None:  # a fresh thread: its team is made here, whatever the main thread did before
        before = _threads()
        torch.mul(x, 2)  # big enough for a parallel region
        seen["team"] = _threads() - before
        seen["released"] = openmp.release_thread_pool()
        seen["after"] = _threads()

    other = threading.Thread(target=in_a_thread)
    torch.mul(x, 2)  # the main thread's own team, which must stay
    other.start()
    other.join()
    assert seen["released"]
    assert seen["team"], "the parallel region made no worker threads"
    assert not seen["team"] & seen["after"], "the thread's workers are still there"
    # the main thread's team is still there: its next parallel region starts no new worker (comparing whole thread
    # lists instead would also see unrelated threads of earlier tests ending meanwhile)
    before = _threads()
    torch.mul(x, 2)
    assert not _threads() - before, "another thread's workers were freed"


def test_release_without_a_team_is_harmless():
    out = []
    thread = threading.Thread(target=lambda: out.append(openmp.release_thread_pool()))
    thread.start()
    thread.join()
    assert out == [True]  # no team to free: the runtime says done, nothing raises
