"""An upstream connection's life: its states, and the one table of moves between them (pure).

    CONNECTING -> [HANDSHAKE ->] TLS -> HANDSHAKE -> IDLE <-> LEASED -> RESETTING -> IDLE
                                       IDLE <-> PROBING        (any) -> CLOSED

A state is a name, not a combination of flags: the driver asks a connection's state what to wait
for (`POLL`) and what an event on it means, and moves it only along this table. A move the table
does not have is a bug of ours, raised at once rather than acted on.
"""

from __future__ import annotations

from enum import Enum


class State(Enum):
    CONNECTING = "connecting"  # a non-blocking connect in flight (or the name lookup before it)
    TLS = "tls"  # the TLS handshake
    HANDSHAKE = "handshake"  # the pool's on_connect checks (AUTH, SELECT...)
    IDLE = "idle"  # in the pool's hands: idle, or on its way to a holder or to be closed
    PROBING = "probing"  # a health check's round trip
    LEASED = "leased"  # a holder's; I/O only during its exchanges
    RESETTING = "resetting"  # the pool's reset after a holder changed the session
    CLOSED = "closed"

    # Members are singletons compared by identity: hash them so too. (Enum's own hash is a Python
    # call on the name; every move and every poll looks a state up in a table, on the hot path.)
    __hash__ = object.__hash__


MOVES: dict[State, frozenset[State]] = {
    State.CONNECTING: frozenset({State.TLS, State.HANDSHAKE, State.IDLE, State.CLOSED}),
    State.TLS: frozenset({State.HANDSHAKE, State.IDLE, State.CLOSED}),
    State.HANDSHAKE: frozenset({State.TLS, State.IDLE, State.CLOSED}),  # (TLS: after PostgreSQL's SSLRequest)
    State.IDLE: frozenset({State.LEASED, State.PROBING, State.CLOSED}),
    State.PROBING: frozenset({State.IDLE, State.CLOSED}),
    State.LEASED: frozenset({State.IDLE, State.RESETTING, State.CLOSED}),
    State.RESETTING: frozenset({State.IDLE, State.CLOSED}),
    State.CLOSED: frozenset(),
}


class Wait(Enum):
    """What the driver waits for on a connection's socket."""

    NOTHING = "nothing"
    READ = "read"
    READ_ONCE = "read once"  # readable, reported once; then nothing until asked for again
    WRITE = "write"

    __hash__ = object.__hash__  # (as State's)


# What to wait for in each state; None: it depends on the work in progress (the TLS handshake's
# want, a check run's or an exchange's send or read).
POLL: dict[State, Wait | None] = {
    State.CONNECTING: Wait.WRITE,  # writable: the connect finished, one way or the other
    State.TLS: None,
    State.HANDSHAKE: None,
    State.IDLE: Wait.READ_ONCE,  # readable while idle: closed by the upstream, or bytes nobody asked for
    State.PROBING: None,
    State.LEASED: None,
    State.RESETTING: None,
    State.CLOSED: Wait.NOTHING,
}

CHECKING = frozenset({State.HANDSHAKE, State.PROBING, State.RESETTING})  # a run of checks drives these


class BadMove(Exception):
    """A move the table does not have: a bug in the broker, not something a client or upstream did."""


def check_move(old: State, new: State) -> State:
    if new not in MOVES[old]:
        raise BadMove(f"an upstream connection can't go from {old.value} to {new.value}")
    return new
