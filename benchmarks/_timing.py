"""Side-by-side timing: interleaved rounds, medians, ratios (never absolute assertions)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def per_call(fn: Callable[[], object], calls: int) -> float:
    """Seconds per call of ``fn`` over ``calls`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def compare(candidates: dict[str, Callable[[], object]], calls: int = 200, rounds: int = 15) -> dict[str, float]:
    """Median seconds per call of each candidate, rounds interleaved so noise hits all alike."""
    for fn in candidates.values():  # warm up: trace, compile, fill caches
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            samples[name].append(per_call(fn, calls))
    return {name: statistics.median(values) for name, values in samples.items()}
