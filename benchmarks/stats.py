"""Percentiles of latency samples, as the benchmarks report them."""

import numpy as np


def summary(values: list[float], *, scale: float = 1000.0) -> dict:
    """{"n", "mean", "p50", "p90", "p99", "max"} of `values` times `scale` (seconds -> ms by default);
    the statistics are None when there are no values."""
    if not values:
        return {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    v = np.asarray(values, dtype=float) * scale
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return {"n": len(v), "mean": float(v.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(v.max())}
