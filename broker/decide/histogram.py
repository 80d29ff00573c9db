"""A fixed-size histogram of durations with log-spaced buckets: cheap to record, quantiles on demand,
and exact cumulative counts at the bounds Prometheus is shown."""

from __future__ import annotations

import bisect
import math

# What /metrics shows as `le` buckets (seconds): from a tenth of a millisecond to a minute.
EXPORT_BOUNDS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# Bucket upper bounds in seconds: 8 per doubling from 10 us to about 160 s (~9% wide each), so a
# quantile read from a bucket is within 9% of the truth and recording costs one bisect; the
# export bounds are among them, so Prometheus's counts are exact.
_BOUNDS: tuple[float, ...] = tuple(sorted({*(10e-6 * 2 ** (i / 8) for i in range(8 * 24)), *EXPORT_BOUNDS}))
_EXPORT_INDEX = tuple(_BOUNDS.index(bound) for bound in EXPORT_BOUNDS)


class Histogram:
    """Counts of observed durations (seconds); reports count, max and quantiles in milliseconds."""

    __slots__ = ("counts", "count", "total", "max")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BOUNDS) + 1)
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def record(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(_BOUNDS, seconds)] += 1
        self.count += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds

    def quantile(self, q: float) -> float:
        """The q-quantile in seconds (the upper bound of its bucket, capped at the max seen)."""
        if self.count == 0:
            return 0.0
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for index, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                bound = _BOUNDS[index] if index < len(_BOUNDS) else self.max
                return min(bound, self.max)
        return self.max

    def summary_ms(self, prefix: str) -> dict[str, float]:
        """{prefix_p50_ms, prefix_p90_ms, prefix_p99_ms, prefix_max_ms}, rounded to microseconds."""
        summary = {f"{prefix}_p{round(q * 100)}_ms": round(self.quantile(q) * 1000, 3) for q in (0.5, 0.9, 0.99)}
        summary[f"{prefix}_max_ms"] = round(self.max * 1000, 3)
        return summary

    def cumulative(self) -> list[tuple[float, int]]:
        """[(bound, observations <= bound)] at EXPORT_BOUNDS, then (inf, count): Prometheus's buckets."""
        buckets = []
        seen = 0
        start = 0
        for bound, index in zip(EXPORT_BOUNDS, _EXPORT_INDEX, strict=True):
            seen += sum(self.counts[start : index + 1])
            start = index + 1
            buckets.append((bound, seen))
        buckets.append((math.inf, self.count))
        return buckets
