"""Timing: the median latency of several functions, measured interleaved so that drifts hit them all alike.

Explained in: book/lora_in_practice.ipynb
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["median_latency"]


def median_latency(fns: Mapping[str, Callable[[], Any]], repeats: int = 30, inner: int = 10,
                   warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, timed interleaved (round-robin) so drifts hit all alike.

    Explained in: book/lora_in_practice.ipynb
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[k].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in times.items()}
