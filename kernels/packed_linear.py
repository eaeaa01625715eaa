"""Linear layers with their weights packed once in oneDNN's blocked layout, for the CPU's float32 forward.

torch's `F.linear` on the CPU calls MKL, whose kernels run this project's AMD CPU at ~190 GFLOP/s on 2 threads;
oneDNN's (torch.ops.mkldnn, the ops inductor's CPU backend uses for frozen linears) run the same products at
~330-490 GFLOP/s once the weight is reordered into its layout: `python -m benchmarks.linear` compares
them. The packed copy is made when a layer is built and kept beside the original weight (which transformers'
forward and the adapters' writes still use): a second copy of every packed weight in memory.

`pack` returns None where it does not apply, and the caller keeps `F.linear`: not float32 on the CPU, this torch
without those ops, a packed product that does not match `F.linear` on a first check, or QUIVER_NATIVE_KERNELS=0
(the CPU's fast paths off: these and the C kernels of native.py).
"""

import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_BATCH_HINT = 64  # the rows oneDNN's layout is chosen for; measured the same from 1 to 512 rows here
_checked: dict[str, bool] = {}


class PackedLinear:
    """y = x · Wᵀ + b for x [T, in] float32 on the CPU, W packed once."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _BATCH_HINT)
        self.bias = None if bias is None else bias.detach()
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")


def pack(weight: torch.Tensor, bias: torch.Tensor | None = None) -> PackedLinear | None:
    """`weight` [out, in] (and `bias` [out]) packed, or None where packing does not apply (see the module)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not available():
        return None
    return PackedLinear(weight, bias)


def available() -> bool:
    """Whether packed linears serve here: on, present in this torch, and matching F.linear (checked once)."""
    if "ok" not in _checked:
        _checked["ok"] = _check()
    return _checked["ok"]


def _check() -> bool:
    if os.environ.get("QUIVER_NATIVE_KERNELS", "1") == "0":
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(7, 40, generator=gen), torch.randn(24, 40, generator=gen), torch.randn(24, generator=gen)
        got = PackedLinear(w, b)(x)
    except (AttributeError, RuntimeError) as exc:  # no mkldnn ops in this build, or they refuse
        log.info("oneDNN packed linears unavailable, F.linear serves: %s", exc)
        return False
    want = F.linear(x.double(), w.double(), b.double())
    if not torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5):
        log.warning("oneDNN packed linears disagree with F.linear here; F.linear serves")
        return False
    return True
