"""Quiver's ops, with one dispatch: Triton kernels on CUDA tensors, plain torch on CPU tensors.

The engine asks once for a `KernelOps` and calls ops only through it. `backend="triton"` on CPU tensors
runs the Triton kernels under Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported);
tests use it to prove the wiring. This package imports nothing from the rest of the project.
"""

from dataclasses import dataclass
from typing import Callable

import torch

from quiver.kernels import reference

BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class KernelOps:
    """One backend's implementation of every op (signatures and semantics: `quiver.kernels.reference`)."""

    name: str
    store_kv: Callable
    paged_attention: Callable
    write_prefix: Callable
    copy_blocks: Callable
    lora_shrink: Callable
    lora_expand: Callable
    lora_apply: Callable  # lora_shrink then lora_expand for one projection, fused where the backend can


TORCH_OPS = KernelOps(
    name="torch",
    store_kv=reference.store_kv,
    paged_attention=reference.paged_attention,
    write_prefix=reference.write_prefix,
    copy_blocks=reference.copy_blocks,
    lora_shrink=reference.lora_shrink,
    lora_expand=reference.lora_expand,
    lora_apply=reference.lora_apply,
)


def select_ops(backend: str, device: torch.device) -> KernelOps:
    """`auto` is Triton on CUDA and torch elsewhere; `torch` and `triton` force a backend."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return TORCH_OPS
    from quiver.kernels import triton_ops

    return triton_ops.TRITON_OPS
