"""What a holder left on a connection, as judged when its lease ends.

A protocol's session tracker (`Session`) is fed every byte a lease sends and every byte it reads
back, and gives its verdict when the lease ends: CLEAN (back to the idle queue as it is), RESET (the
holder changed the session: run the pool's reset first) or OUT_OF_SYNC (the stream stopped in the
middle of a message, or answers are still owed: close it, since nothing can be trusted on it).
"""

from __future__ import annotations

from enum import Enum
from typing import Protocol


class Outcome(Enum):
    CLEAN = "clean"
    RESET = "reset"
    OUT_OF_SYNC = "out_of_sync"


CLEAN = Outcome.CLEAN
RESET = Outcome.RESET
OUT_OF_SYNC = Outcome.OUT_OF_SYNC

Verdict = tuple[Outcome, str]  # and why, for the log line


def out_of_sync(why: str) -> Verdict:
    return OUT_OF_SYNC, why


class Session(Protocol):
    def sent(self, data: bytes | memoryview) -> None: ...

    def received(self, data: bytes) -> None: ...

    def verdict(self) -> Verdict: ...


def report(session: Session) -> str:
    """The verdict as a lent socket's release says it (the wire's `session`: clean, reset or
    out_of_sync, the outcomes' own names)."""
    return session.verdict()[0].value


class Stateless:
    """A protocol that keeps no session (memcached's): a client that read every reply it asked for
    gives the connection back as it is (one that failed mid-command discards it instead)."""

    def sent(self, data: bytes | memoryview) -> None:
        pass

    def received(self, data: bytes) -> None:
        pass

    def verdict(self) -> Verdict:
        return CLEAN, ""
