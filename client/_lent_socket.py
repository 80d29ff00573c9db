"""A socket for client libraries that keep their connections open between requests (redis-py), over
socket leases: each conversation takes the upstream socket itself on its first bytes, and gives it
back when the library is done with the connection (give_back), saying what the session left as
the relay would have judged it: the same tracker (poolbroker.sessions) follows every byte sent and
read here. LeasedSocket's twin for same-host workers, whose bytes never pass the broker."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from poolbroker.client._exchanges import DEFAULT_RECV
from poolbroker.sessions import Session, report

if TYPE_CHECKING:
    from poolbroker.client._client import Client
    from poolbroker.client._lending import SocketLease


class LentSocket:
    """Socket-like; each conversation runs on a socket lease, taken when the library first writes
    and given back by give_back() (the adapters call it when their library takes the connection
    back), with the verdict of `new_session()`'s tracker over the conversation's bytes. A library
    connection holding it stays "connected" between conversations and holds nothing then."""

    def __init__(
        self,
        broker: Client,
        pool: str,
        new_session: Callable[[], Session],
        tag: str | None = None,
        timeout: float | None = None,
    ) -> None:
        self._broker = broker
        self._pool = pool
        self._new_session = new_session
        self._tag = tag
        self._timeout = timeout
        self.lease: SocketLease | None = None
        self._session: Session | None = None

    def _current(self) -> socket.socket:
        if self.lease is None:
            self.lease = self._broker.lease(self._pool, tag=self._tag, socket=True)
            self.lease.socket.settimeout(self._timeout)
            self._session = self._new_session()
        return self.lease.socket

    @property
    def holding(self) -> bool:
        """A conversation is under way (its lease held)."""
        return self.lease is not None

    def give_back(self) -> None:
        """The conversation is over: the socket goes back, with its session's verdict."""
        lease, session, self.lease, self._session = self.lease, self._session, None, None
        if lease is not None:
            lease.release(report(session) if session is not None else None)

    def discard(self) -> None:
        """The conversation was cut short: the broker closes the connection (its state is unknown)."""
        lease, self.lease, self._session = self.lease, None, None
        if lease is not None:
            lease.discard()

    def sendall(self, data: bytes) -> None:
        self._current().sendall(data)
        assert self._session is not None
        self._session.sent(data)

    def send(self, data: bytes) -> int:
        self.sendall(data)
        return len(data)

    def recv(self, bufsize: int = DEFAULT_RECV) -> bytes:
        data = self._current().recv(bufsize)
        assert self._session is not None
        self._session.received(data)
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0) -> int:
        count = self._current().recv_into(buffer, nbytes)
        assert self._session is not None
        self._session.received(bytes(memoryview(buffer)[:count]))
        return count

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout
        if self.lease is not None:
            self.lease.socket.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self._timeout

    def setsockopt(self, *args: Any) -> None:
        pass  # (the broker's upstream sockets have their options)

    def getsockname(self) -> Any:
        return self._current().getsockname()

    def shutdown(self, how: int = socket.SHUT_RDWR) -> None:
        self.discard()

    def close(self) -> None:
        """As a socket's: a conversation still under way is cut short (its state is unknown)."""
        self.discard()
