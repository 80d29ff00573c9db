"""A socket for client libraries that keep their connections open between requests (redis-py,
urllib3, and for asyncio redis.asyncio and httpcore): each conversation on it runs on a lease of
its own, so an idle library connection holds no upstream connection and the broker's pool stays
shared."""

from __future__ import annotations

import io
import socket
from typing import TYPE_CHECKING, Any

from poolbroker.client._exchanges import DEFAULT_RECV
from poolbroker.client._lease import Lease, socket_file

if TYPE_CHECKING:
    from poolbroker.client._aio import AsyncClient, AsyncLease
    from poolbroker.client._channel import Channel
    from poolbroker.client._client import Client


class LeasedSocket:
    """Socket-like; each conversation runs on a lazy lease, asked for with its first bytes and
    ended by the answer that finishes it where the broker follows the pool's protocol (`redis`,
    `http`: when_done), or by give_back() (which the adapters call when their library is done
    with the connection: the only end in a `tcp` or `memcached` pool). A library connection
    holding it stays "connected" (no connect or handshake per request) and holds no upstream
    connection between conversations. What keeps a session (a MULTI, a WATCH, a subscription)
    keeps its lease until give_back()."""

    def __init__(
        self,
        broker: Client,
        pool: str,
        tag: str | None = None,
        timeout: float | None = None,
        channel: Channel | None = None,
    ) -> None:
        self._broker = broker
        self._pool = pool
        self._tag = tag
        self._timeout = timeout
        self._channel = channel  # None: each lease on the broker socket of the thread that makes it
        self.lease = self._next_lease()

    def _next_lease(self) -> Lease:
        lease = self._broker.lease(self._pool, tag=self._tag, lazy=True, when_done=True, channel=self._channel)
        lease.settimeout(self._timeout)
        return lease

    def current(self) -> Lease:
        """The lease for what comes next: a new one once the last has ended by itself, or when it
        has not started yet and this is another thread than the one that made it."""
        lease = self.lease
        if lease.released or (lease.fresh and self._channel is None and lease.channel is not self._broker.own_thread()):
            # (A library's connection passes from thread to thread. A fresh lease made by the last
            # thread would queue this one behind that thread's broker socket, whose lock a long
            # blocking read there holds: a pub/sub wait would stop the publish it waits for.)
            lease = self.lease = self._next_lease()
        return lease

    def give_back(self) -> None:
        """The conversation is over: release its lease (nothing is sent if it ended by itself, or
        never asked for one)."""
        if not self.lease.fresh or self.lease.released:
            self.lease.release()
            self.lease = self._next_lease()

    def sendall(self, data: bytes) -> None:
        self.current().sendall(data)

    def send(self, data: bytes) -> int:
        self.current().sendall(data)
        return len(data)

    def flush(self) -> None:
        """Send held writes now (they go with the next read otherwise)."""
        self.lease.flush()

    def recv(self, bufsize: int = DEFAULT_RECV) -> bytes:
        return self.current().recv(bufsize)

    def recv_into(self, buffer: Any, nbytes: int = 0) -> int:
        return self.current().recv_into(buffer, nbytes)

    def recv_ready(self, count: int) -> bytes:
        return self.current().recv_ready(count)

    def makefile(self, mode: str = "rb", buffering: int | None = None, **_: Any) -> io.BufferedIOBase:
        """A binary file over this socket (over whichever lease each read or write runs on)."""
        return socket_file(self, mode, buffering)

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout
        self.lease.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self._timeout

    def setsockopt(self, *args: Any) -> None:
        pass  # (the broker's own upstream sockets have their options)

    def shutdown(self, how: int = socket.SHUT_RDWR) -> None:
        self.lease.shutdown(how)

    def close(self) -> None:
        """As a socket's: the lease in use goes back (discarded after shutdown())."""
        self.lease.close()


class AsyncConversations:
    """LeasedSocket's twin for asyncio: an AsyncLease per conversation (lazy, ended when done, or
    by give_back()), made when the conversation's first bytes need one."""

    def __init__(self, broker: AsyncClient, pool: str, tag: str | None = None, timeout: float | None = None) -> None:
        self.broker, self.pool, self.tag, self.timeout = broker, pool, tag, timeout
        self.lease: AsyncLease | None = None

    def current(self) -> AsyncLease:
        """The lease for what comes next: a new one once the last has ended (or was given back)."""
        if self.lease is None or self.lease.released:
            crossed = self.lease.crossed if self.lease is not None else b""
            self.lease = self.broker.lease(self.pool, tag=self.tag, lazy=True, when_done=True)
            self.lease.settimeout(self.timeout)
            self.lease.sendall(crossed)  # (what was written as the last one ended comes first)
        return self.lease

    async def give_back(self) -> None:
        """The conversation is over: its lease goes back (nothing is sent if it ended by itself)."""
        lease, self.lease = self.lease, None
        if lease is not None and not lease.released:
            await lease.release()

    def discard(self) -> None:
        """The conversation was cut short: its connection's state is unknown."""
        lease, self.lease = self.lease, None
        if lease is not None:
            lease.discard()
