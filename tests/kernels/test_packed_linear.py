"""oneDNN's packed linears (quiver.kernels.packed_linear) against float64 torch, and where they decline."""

import os
import subprocess
import sys

import pytest
import torch

from quiver.kernels import packed_linear

needs_pack = pytest.mark.skipif(not packed_linear.available(), reason="this torch has no oneDNN packed linears")


@needs_pack
@pytest.mark.parametrize("rows,inputs,outputs", [(1, 64, 128), (7, 576, 960), (128, 64, 352), (300, 176, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_is_the_product_to_float32_accuracy(rows, inputs, outputs, bias):
    gen = torch.Generator().manual_seed(rows + inputs)
    x = torch.randn(rows, inputs, generator=gen)
    w = torch.randn(outputs, inputs, generator=gen) * inputs ** -0.5
    b = torch.randn(outputs, generator=gen) if bias else None
    linear = packed_linear.pack(w, b)
    want = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    got = linear(x)
    assert got.dtype == torch.float32 and got.shape == (rows, outputs)
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 5e-6
    wide = torch.randn(rows, inputs + 5, generator=gen)[:, 2 : 2 + inputs]  # rows further apart than a row
    wide_want = torch.nn.functional.linear(wide.double(), w.double(), None if b is None else b.double())
    assert ((linear(wide).double() - wide_want).abs().max() / wide_want.abs().max()).item() < 5e-6


@needs_pack
def test_the_packed_copy_is_taken_once_and_the_weight_may_change_after():
    """The packed weight is a copy made at pack time: the layer keeps the product of the weight it was built with."""
    w, x = torch.randn(16, 8), torch.randn(3, 8)
    linear = packed_linear.pack(w)
    before = linear(x)
    w.mul_(2)
    assert torch.equal(linear(x), before)


def test_other_dtypes_and_devices_are_declined():
    assert packed_linear.pack(torch.randn(4, 4, dtype=torch.bfloat16)) is None
    assert packed_linear.pack(torch.randn(4, 4, dtype=torch.float64)) is None
    assert packed_linear.pack(torch.randn(4, 4, device="meta")) is None


def test_the_switch_turns_them_off():
    code = "from quiver.kernels import packed_linear; import torch; print(packed_linear.pack(torch.randn(4, 4)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "QUIVER_NATIVE_KERNELS": "0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None"
