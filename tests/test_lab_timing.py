"""peftlab.lab.timing: interleaved median latency."""

from __future__ import annotations

from peftlab.lab import timing


def test_median_latency():
    lat = timing.median_latency({"a": lambda: None, "b": lambda: sum(range(100))}, repeats=3, inner=2, warmup=1)
    assert set(lat) == {"a", "b"} and all(v >= 0 for v in lat.values())
