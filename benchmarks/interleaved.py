"""Times several callables in one process, interleaved, so that load from other processes hits
them alike (shared by the side-by-side benchmarks)."""

from __future__ import annotations

import time
from collections.abc import Callable


def interleaved_seconds(calls: dict[str, Callable[[], object]], repeats: int,
                        warmup: int = 0) -> dict[str, list[float]]:
    """Seconds per call of each entry: ``warmup`` untimed calls each, then ``repeats`` rounds of
    one call each, alternating which goes first."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for round_ in range(repeats):
        for key in (list(calls) if round_ % 2 == 0 else list(calls)[::-1]):
            t0 = time.perf_counter()
            calls[key]()
            times[key].append(time.perf_counter() - t0)
    return times
