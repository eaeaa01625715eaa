"""Test-wide set-up.

Triton kernels are tested on this CPU-only machine through Triton's interpreter, which must be chosen
before `triton` is first imported; on a machine with CUDA the kernels run for real.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
