"""Histograms of durations: the loop's mutable accumulator and the immutable view snapshots carry.

Apart from vcpud.snapshot so that `vcpud apply`, whose Stats count pin latencies too, does not
import the daemon's snapshot types.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

# Pin latency is microseconds to milliseconds; a reconcile is milliseconds to seconds.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


@dataclass(frozen=True, slots=True)
class HistogramView:
    buckets: tuple[float, ...]   # upper bounds, ascending, without +Inf
    counts: tuple[int, ...]      # observations per bucket (not cumulative); one more for +Inf
    sum: float = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)


class Histogram:
    """Mutable accumulator owned by the event loop; view() is what snapshots carry."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def view(self) -> HistogramView:
        return HistogramView(self.buckets, tuple(self.counts), self.sum)
