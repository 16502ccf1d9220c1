"""Percentiles and summaries of latency samples (milliseconds)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """Return the q-th percentile (0-100) with linear interpolation between ranks."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(values: Sequence[float]) -> dict[str, float | int | None]:
    """Return count, mean, p50, p90, p99, p99.9 and max of the samples."""
    if not values:
        return {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "mean": round(sum(ordered) / len(ordered), 4),
        "p50": round(percentile(ordered, 50), 4),
        "p90": round(percentile(ordered, 90), 4),
        "p99": round(percentile(ordered, 99), 4),
        "p99_9": round(percentile(ordered, 99.9), 4),
        "max": round(ordered[-1], 4),
    }


def difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 4)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 4)
