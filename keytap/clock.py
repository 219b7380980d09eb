"""Kernel ktime (CLOCK_MONOTONIC, what bpf_ktime_get_ns() returns) to wall-clock nanoseconds."""

from __future__ import annotations

import time


def monotonic_to_realtime_offset_ns(samples: int = 5) -> int:
    """REALTIME - MONOTONIC, from the tightest of a few back-to-back readings."""
    best_width, best_offset = None, 0
    for _ in range(samples):
        before = time.monotonic_ns()
        realtime = time.time_ns()
        after = time.monotonic_ns()
        if best_width is None or after - before < best_width:
            best_width, best_offset = after - before, realtime - (before + after) // 2
    return best_offset
