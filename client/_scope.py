"""A lease scope: within it, a connection on socket leases keeps its lease from one command to the
next, and gives it back when the scope ends (one lease per web request: poolbroker.web's
middleware opens one per request). Outside any scope each command gives its lease back at once.

The scope is a context variable: a thread's own in WSGI, a task's (and the tasks it starts) in
asyncio. What it keeps is still followed by the session tracker, and goes back with its verdict."""

from __future__ import annotations

from contextvars import ContextVar, Token
from types import TracebackType
from typing import Protocol


class _Holder(Protocol):
    def end_hold(self) -> None: ...


_scope: ContextVar[list[_Holder] | None] = ContextVar("poolbroker_lease_scope", default=None)


def kept_by_scope(holder: _Holder) -> bool:
    """A holder giving its lease back: True when a scope keeps it instead (until the scope ends)."""
    held = _scope.get()
    if held is None:
        return False
    if holder not in held:
        held.append(holder)
    return True


class LeaseScope:
    """`with LeaseScope():` each connection on socket leases used in the block keeps its lease
    from one command to the next, and gives it back (with its verdict) when the block ends: one
    lease for the block's five commands, not five. It holds up to one upstream connection per
    library connection used, for the block's whole life: keep it short (a web request)."""

    def __init__(self) -> None:
        self._held: list[_Holder] = []
        self._token: Token[list[_Holder] | None] | None = None

    def __enter__(self) -> LeaseScope:
        self._token = _scope.set(self._held)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """End the scope: what it kept goes back."""
        if self._token is not None:
            _scope.reset(self._token)
            self._token = None
        held, self._held = self._held, []
        for holder in held:
            holder.end_hold()
