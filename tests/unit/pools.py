"""A pool core for the unit tests: every timed feature off unless a test turns it on."""

from __future__ import annotations

from typing import Any

from poolbroker.broker.decide.pool import PoolCore
from poolbroker.broker.settings import PoolConfig

QUIET = {"idle_timeout": 0, "max_lifetime": 0, "check_interval": 0, "check_idle_after": 1e9}


def make(*, rng: float = 1.0, **settings: Any) -> PoolCore[str, str]:
    """A pool named "test" (max_size 2, max_waiting 10 unless given); `rng` is its only randomness."""
    config = PoolConfig("test", "h", 1, **{"max_size": 2, "max_waiting": 10, **QUIET, **settings})
    return PoolCore(config, rng=lambda: rng)
