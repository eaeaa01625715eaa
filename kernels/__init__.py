"""Quiver's ops, with one dispatch: Triton kernels on CUDA tensors, plain torch on CPU tensors.

The engine asks once for a `KernelOps` and calls ops only through it. `backend="triton"` on CPU tensors
runs the Triton kernels under Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported);
tests use it to prove the wiring. This package imports nothing from the rest of the project.

    ops.py              the contract: `KernelOps` (each op's typed signature and semantics), the KV cache
                        layout, the LoRA running example, FLOAT_DTYPES and the ACTIVATIONS table
    reference.py        the float64 oracles every backend is tested against: small and obviously right
    torch_attention.py  the torch backend's KV cache and attention ops (the CPU serving path)
    native.py           the CPU's C kernels (cpu_*.c), built on first use, for float32: decode attention
                        reading the paged KV in place, the layer's elementwise steps, short segments' adapter
                        deltas, greedy picks; the torch backend and the forward call them, with a torch fallback
    packed_linear.py    the CPU's float32 linear layers on oneDNN's packed weights (the forward's GEMMs)
    torch_lora.py       the torch backend's LoRA ops: slot grids, bands by rank, tuned for CPU
    triton_ops.py       the Triton backend, from the launchers in kv_cache.py, attention.py and lora.py
"""

import torch

from quiver.kernels import torch_attention, torch_lora
from quiver.kernels.ops import KernelOps

BACKENDS = ("auto", "torch", "triton")

TORCH_OPS = KernelOps(
    name="torch",
    store_kv=torch_attention.store_kv,
    paged_attention=torch_attention.paged_attention,
    write_prefix=torch_attention.write_prefix,
    copy_blocks=torch_attention.copy_blocks,
    lora_shrink=torch_lora.lora_shrink,
    lora_expand=torch_lora.lora_expand,
    lora_apply=torch_lora.lora_apply,
    bottleneck_apply=torch_lora.bottleneck_apply,
    plan_attention=torch_attention.plan_attention,
    plan_lora=torch_lora.plan_lora,
)


def select_ops(backend: str, device: torch.device) -> KernelOps:
    """`auto` is Triton on CUDA and torch elsewhere; `torch` and `triton` force a backend."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return TORCH_OPS
    from quiver.kernels import triton_ops

    return triton_ops.TRITON_OPS
