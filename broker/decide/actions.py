"""What the pool core tells its caller to do: grant a connection to a request, open one, probe
one, close one, or reject a request. Plain data: the driver carries them out, in order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from poolbroker.wire.protocol import ErrorCode

C = TypeVar("C")  # a connection
R = TypeVar("R")  # a request


@dataclass(frozen=True, slots=True)
class Grant(Generic[C, R]):
    """Hand `conn` to `request`: it is now leased."""

    request: R
    conn: C


@dataclass(frozen=True, slots=True)
class Open:
    """Open one new upstream connection; report connected() or connect_failed()."""


@dataclass(frozen=True, slots=True)
class Probe(Generic[C]):
    """Check that `conn` still works; report probe_ok() or probe_failed()."""

    conn: C


@dataclass(frozen=True, slots=True)
class Close(Generic[C]):
    """Close `conn`: it has left the pool."""

    conn: C
    reason: str


@dataclass(frozen=True, slots=True)
class Reject(Generic[R]):
    """Answer `request` with an error: it will not be granted."""

    request: R
    code: ErrorCode
    message: str


Action = Grant[C, R] | Open | Probe[C] | Close[C] | Reject[R]
OPEN = Open()

# Why a connection left the pool; each is a connections_closed_<reason> counter.
# discarded: by its holder; broken: I/O or a probe failed, or the upstream closed it; unread: it
# came back with bytes nobody read; out_of_sync: its protocol's stream was left in the middle of a
# message, or with answers still owed (redis, http); idle / lifetime: the reaper; reclaimed: taken
# back from a holder that died or held it too long; resized: over a lowered max_size; drained: an
# operator drained the pool (or its upstream changed); budget: a shared budget's share moved to
# another broker ([cluster]); reset: the pool's reset rule is "discard"
# (its session state is unknown); shutdown.
CLOSE_REASONS = (
    "budget",
    "discarded",
    "broken",
    "unread",
    "out_of_sync",
    "idle",
    "lifetime",
    "reclaimed",
    "resized",
    "drained",
    "reset",
    "shutdown",
)
