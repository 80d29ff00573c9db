"""A fixed-size histogram of durations with log-spaced buckets: cheap to record, quantiles on demand."""

from __future__ import annotations

import bisect
import math

# Bucket upper bounds in seconds: 8 per doubling from 10 us to about 160 s (~9% wide each), so a
# quantile read from a bucket is within 9% of the truth and recording costs one bisect.
_BOUNDS: tuple[float, ...] = tuple(10e-6 * 2 ** (i / 8) for i in range(8 * 24))


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
        """{prefix_p50_ms, prefix_p99_ms, prefix_max_ms} rounded to microseconds."""
        return {
            f"{prefix}_p50_ms": round(self.quantile(0.50) * 1000, 3),
            f"{prefix}_p99_ms": round(self.quantile(0.99) * 1000, 3),
            f"{prefix}_max_ms": round(self.max * 1000, 3),
        }
