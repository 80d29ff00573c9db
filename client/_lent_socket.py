"""A socket for client libraries that keep their connections open between requests (redis-py), over
socket leases: each conversation takes the upstream socket itself on its first bytes, and gives it
back when the library is done with the connection (give_back), saying what the session left as
the relay would have judged it: the same tracker (poolbroker.sessions) follows every byte sent and
read here. LeasedSocket's twin for same-host workers, whose bytes never pass the broker."""

from __future__ import annotations

import asyncio
import io
import select
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from poolbroker.client._errors import UpstreamError
from poolbroker.client._exchanges import DEFAULT_RECV
from poolbroker.client._lease import socket_file
from poolbroker.client._scope import kept_by_scope
from poolbroker.sessions import Session, report
from poolbroker.sessions.over import conversation_over

if TYPE_CHECKING:
    from poolbroker.client._aio import AsyncClient
    from poolbroker.client._client import Client
    from poolbroker.client._lending import SocketLease


class _LentConversation:
    """What the sync and asyncio lent conversations share: the lease held for the conversation
    (None between conversations), its session's tracker, and its end (given back with the verdict,
    or discarded)."""

    def __init__(self, pool: str, new_session: Callable[[], Session], tag: str | None, when_done: bool) -> None:
        self._pool = pool
        self._new_session = new_session
        self._tag = tag
        self._when_done = when_done
        self.lease: SocketLease | None = None
        self._session: Session | None = None

    @property
    def session(self) -> Session | None:
        """The tracker following this conversation's bytes (None between conversations)."""
        return self._session

    @property
    def holding(self) -> bool:
        """A conversation is under way (its lease held)."""
        return self.lease is not None

    def _end(self) -> tuple[SocketLease | None, Session | None]:
        lease, session, self.lease, self._session = self.lease, self._session, None, None
        return lease, session

    def _over(self, data: bytes) -> bool:
        """With `when_done`: the bytes just read ended the conversation (its tracker says so)."""
        return self._when_done and bool(data) and conversation_over(self._session)

    def end_hold(self) -> None:
        """Give the socket back now, with its session's verdict."""
        lease, session = self._end()
        if lease is not None:
            lease.release(report(session) if session is not None else None)

    def discard(self) -> None:
        """The conversation was cut short: the broker closes the connection (its state is unknown)."""
        lease, _ = self._end()
        if lease is not None:
            lease.discard()


class LentSocket(_LentConversation):
    """Socket-like; each conversation runs on a socket lease, taken when the library first writes
    and given back by give_back() (the adapters call it when their library takes the connection
    back), with the verdict of `new_session()`'s tracker over the conversation's bytes; with
    `when_done`, also as soon as the tracker sees the conversation over (an HTTP response read to
    its end: a library that keeps its connection open never says). A library connection holding
    it stays "connected" between conversations and holds nothing then."""

    def __init__(
        self,
        broker: Client,
        pool: str,
        new_session: Callable[[], Session],
        tag: str | None = None,
        timeout: float | None = None,
        when_done: bool = False,
    ) -> None:
        super().__init__(pool, new_session, tag, when_done)
        self._broker = broker
        self._timeout = timeout

    def current(self) -> SocketLease:
        """The conversation's socket lease, taken now if none is held."""
        if self.lease is None:
            self.lease = self._broker._lend(self._pool, self._tag, self._timeout)
            self._session = self._new_session()
        return self.lease

    def _current(self) -> socket.socket:
        return self.current().socket

    def readable(self) -> bool:
        """Bytes wait to be read now (or the upstream closed): one poll, the socket left as it is."""
        if self.lease is None:
            return False
        poller = select.poll()  # (not select.select: a descriptor may be above 1023)
        poller.register(self.lease.socket, select.POLLIN)
        return bool(poller.poll(0))

    def give_back(self) -> None:
        """The conversation is over: the socket goes back, with its session's verdict (when a
        LeaseScope is open, at its end)."""
        if self.lease is not None and not kept_by_scope(self):
            self.end_hold()

    def sendall(self, data: bytes) -> None:
        self._current().sendall(data)
        assert self._session is not None
        self._session.sent(data)

    def send(self, data: bytes) -> int:
        self.sendall(data)
        return len(data)

    def recv(self, bufsize: int = DEFAULT_RECV) -> bytes:
        data = self._current().recv(bufsize)
        self._received(data)
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0) -> int:
        count = self._current().recv_into(buffer, nbytes)
        self._received(bytes(memoryview(buffer)[:count]))
        return count

    def _received(self, data: bytes) -> None:
        session = self._session
        assert session is not None
        session.received(data)
        if self._over(data):
            self.give_back()

    def makefile(self, mode: str = "rb", buffering: int | None = None, **_: Any) -> io.BufferedIOBase:
        """A binary file over this socket (over whichever lease each read or write runs on)."""
        return socket_file(self, mode, buffering)

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


class AsyncLentConversations(_LentConversation):
    """AsyncConversations' twin over socket leases, for asyncio libraries read through streams
    (redis.asyncio): `current()` is what the stream writes to and reads from. The first read takes
    the socket lease and sends what was written before it; later writes go out at once, beside a
    read that waits (a pub/sub's UNSUBSCRIBE while its poll is under way). give_back() returns the
    socket with its session's verdict, and `when_done` as soon as its tracker sees the conversation
    over (LentSocket's)."""

    def __init__(
        self,
        broker: AsyncClient,
        pool: str,
        new_session: Callable[[], Session],
        tag: str | None = None,
        when_done: bool = False,
    ) -> None:
        super().__init__(pool, new_session, tag, when_done)
        self._broker = broker
        self._held = bytearray()  # written, not yet sent
        self._sending: asyncio.Future[None] | None = None
        self._ended = 0  # conversations ended (a read taking a lease sees whether one ended meanwhile)
        self.eof = False

    def current(self) -> AsyncLentConversations:
        return self

    def sendall(self, data: bytes) -> None:
        self._held += data
        if self.lease is not None and self._sending is None:
            self._sending = asyncio.ensure_future(self._send())
            self._sending.add_done_callback(_retrieve)

    async def _send(self) -> None:
        assert self.lease is not None and self._session is not None
        sock, session = self.lease.socket, self._session
        try:
            while self._held:
                data, self._held = bytes(self._held), bytearray()
                session.sent(data)  # (first: bytes cut off mid-way leave the stream out of sync)
                await asyncio.get_running_loop().sock_sendall(sock, data)
        except OSError as exc:
            raise UpstreamError(f"the lent socket failed: {exc}") from exc
        finally:
            if self._sending is asyncio.current_task():
                self._sending = None

    async def recv(self, bufsize: int = DEFAULT_RECV) -> bytes:
        """The socket's next bytes (b"" at its end), once what was written has gone. UpstreamError
        if the socket fails (the broker cut it, the upstream closed it)."""
        if self.lease is None:
            ended = self._ended
            lease = await self._broker.lease(self._pool, tag=self._tag, socket=True)
            if ended != self._ended:  # (given back or discarded while its lease was on its way)
                lease.release("clean")  # (nothing went over it)
                raise UpstreamError("the conversation ended while its socket lease was on its way")
            self.lease, self._session = lease, self._new_session()
        sock, session = self.lease.socket, self._session
        assert session is not None
        if self._sending is not None:
            await asyncio.shield(self._sending)
        elif self._held:
            await self._send()
        try:
            data = await asyncio.get_running_loop().sock_recv(sock, bufsize)
        except OSError as exc:
            raise UpstreamError(f"the lent socket failed: {exc}") from exc
        session.received(data)
        self.eof = not data
        if self._over(data):
            await self.give_back()
        return data

    def _end(self) -> tuple[SocketLease | None, Session | None]:
        self._ended += 1
        self._held.clear()
        if self._sending is not None:
            self._sending.cancel()
            self._sending = None
        return super()._end()

    async def give_back(self) -> None:
        """The conversation is over: the socket goes back, with its session's verdict (when a
        LeaseScope is open, at its end)."""
        if self.lease is not None and not kept_by_scope(self):
            self.end_hold()


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # (a read that follows reports it; none may)
