"""select_ops: Triton launchers when asked for, torch on CPU by default."""

import dataclasses
import inspect
import typing

import pytest
import torch

from quiver.kernels import TORCH_OPS, attention, kv_cache, lora, select_ops
from quiver.kernels.ops import KernelOps, no_attention_plan, no_lora_plan


def test_triton_backend_is_all_triton_launchers():
    ops = select_ops("triton", torch.device("cpu"))
    expected = {
        "store_kv": kv_cache.store_kv, "paged_attention": attention.paged_attention,
        "write_prefix": kv_cache.write_prefix, "copy_blocks": kv_cache.copy_blocks,
        "lora_shrink": lora.lora_shrink, "lora_expand": lora.lora_expand, "lora_apply": lora.lora_apply,
        "bottleneck_apply": lora.bottleneck_apply,
        "plan_attention": no_attention_plan, "plan_lora": no_lora_plan,
    }
    fields = {f.name: getattr(ops, f.name) for f in dataclasses.fields(ops) if f.name != "name"}
    assert ops.name == "triton" and fields == expected


def test_auto_is_torch_on_cpu():
    assert select_ops("auto", torch.device("cpu")) is TORCH_OPS
    assert select_ops("torch", torch.device("cpu")) is TORCH_OPS


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_every_op_has_its_protocols_signature(backend):
    """Each backend's ops take the parameters their `KernelOps` Protocol names, of the same kinds and defaults."""
    ops = select_ops(backend, torch.device("cpu"))
    hints = typing.get_type_hints(KernelOps)
    for field in dataclasses.fields(ops):
        if field.name == "name":
            continue
        expected = list(inspect.signature(hints[field.name].__call__).parameters.values())[1:]  # less self
        got = inspect.signature(getattr(ops, field.name)).parameters.values()
        assert _shape(got) == _shape(expected), f"{backend} {field.name}"


def _shape(params) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in params]
