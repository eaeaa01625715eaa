"""Bounds on what an adapter read from files may hold, so that no accepted adapter can overflow the model.

- every tensor entry: finite, |x| <= MAX_ENTRY (also below float16's largest value, 65504);
- a LoRA's scale (alpha/r, or alpha/sqrt(r)) and a bottleneck's `scaling`: |s| <= MAX_SCALE;
- the gain of each adapted module, the most it can multiply the largest entry of its input (max-row-sum
  norms, ‖M‖∞ = maxᵢ Σⱼ |Mᵢⱼ|): a LoRA's |s|·‖B‖∞·‖A‖∞ and a bottleneck's |scaling|·‖up‖∞·‖down‖∞
  are at most MAX_GAIN.

docs/adapters.md ("Bounds") works out why these keep every activation finite in float32 and bfloat16, and
what float16 cannot promise. Weights registered in memory (`EngineService.register_adapter`) are trusted
and not bounded.
"""

import torch

MAX_ENTRY = 1e4
MAX_SCALE = 1e3
MAX_GAIN = 1e3


def entries_problem(tensor: torch.Tensor) -> str | None:
    """What is wrong with `tensor`'s entries, or None. One reduction: NaN propagates through min and max."""
    if tensor.numel() == 0:
        return None
    low, high = (float(x) for x in torch.aminmax(tensor))
    if not (abs(low) < float("inf") and abs(high) < float("inf")):  # false for NaN too
        return "holds non-finite values (NaN or inf)"
    if max(-low, high) > MAX_ENTRY:
        return f"has an entry of magnitude {max(-low, high):.3g}, above the bound of {MAX_ENTRY:g} (docs/adapters.md)"
    return None


def norm(matrix: torch.Tensor) -> float:
    """‖matrix‖∞: the largest sum of absolute values along a row ([rows, columns])."""
    return float(matrix.abs().sum(dim=1, dtype=torch.float32).max())


def gain(scale: float, outer: torch.Tensor, inner: torch.Tensor) -> float:
    """|scale|·‖outer‖∞·‖inner‖∞: a bound on |scale · outer · inner · x|∞ / |x|∞ (outer [out, r], inner [r, in])."""
    return abs(scale) * norm(outer) * norm(inner)
