"""A leased upstream connection that works like a socket, its I/O going through the broker."""

from __future__ import annotations

import errno
import io
import socket
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from poolbroker.client._channel import Channel
from poolbroker.client._errors import BrokerUnavailable
from poolbroker.client._exchanges import DEFAULT_RECV, HOLD_WRITES_UP_TO, LeaseCore
from poolbroker.wire.protocol import RELEASE_DISCARD, RELEASE_KEEP

if TYPE_CHECKING:
    from poolbroker.client._client import Client

__all__ = ["DEFAULT_RECV", "HOLD_WRITES_UP_TO", "Lease", "LeaseIO"]

# A blocking PostgreSQL read's first round on a lazy lease: its reply brings the lease's token.
FIRST_POLL = 0.05  # (a query longer than this costs one round trip more: a small price beside its own time)


class _Stream(Protocol):
    def recv_into(self, buffer: Any, nbytes: int = 0) -> int: ...

    def send(self, data: bytes) -> int: ...


class LeaseIO(io.RawIOBase):
    """The raw stream under makefile(): reads and writes go through a lease (or a leased socket)."""

    def __init__(self, lease: _Stream, reading: bool) -> None:
        super().__init__()
        self._lease = lease
        self._reading = reading

    def readable(self) -> bool:
        return self._reading

    def writable(self) -> bool:
        return not self._reading

    def readinto(self, buffer: Any) -> int:
        return self._lease.recv_into(buffer)

    def write(self, data: Any) -> int:
        return self._lease.send(bytes(data))


def socket_file(stream: _Stream, mode: str, buffering: int | None) -> io.BufferedIOBase:
    """socket.makefile's binary files ("rb" or "wb") over a socket-like `stream` (a lease, a leased
    or lent socket). Closing one leaves the stream open."""
    if mode not in ("rb", "wb"):
        raise ValueError(f"invalid mode {mode!r}: a lease's file is binary, 'rb' or 'wb'")
    raw = LeaseIO(stream, reading=mode == "rb")
    size = buffering if buffering and buffering > 0 else DEFAULT_RECV
    return io.BufferedReader(raw, size) if mode == "rb" else io.BufferedWriter(raw, size)


class Lease(LeaseCore):
    """A leased upstream connection that works like a socket: `sendall`, `send`, `recv`,
    `recv_into`, `makefile`, `settimeout`, `gettimeout`, `shutdown`, `close`, so code written for a
    socket (http.client, redis-py) runs over it.

    Writes are held and go with the next read, so that a request and its answer are one round trip
    however they are written; `flush()` sends them at once. Reads and flushes are one round trip each.
    `close()` gives the connection back, as `release()` does; after `shutdown()` it is discarded.

    A lazy lease (`Client.lease(..., lazy=True)`) is asked for with its first exchange, so a lease
    with one exchange costs one round trip and a one-way release. Until then it holds nothing, and
    what the pool would have said at once (PoolTimeout, PoolFull, an unknown pool...) is raised by
    that first read or flush; a lazy lease whose first exchange fails is over. Releasing one that
    never sent anything sends nothing.

    A `when_done` lease ends by itself after a read that leaves the conversation over, as the
    broker sees it in a redis or http pool: every command answered, the session as it was handed
    out (no MULTI, WATCH, SELECT or subscription pending). Its reply says so and `released` turns
    true; the release that follows costs nothing. A tcp or memcached pool never ends one early.

    Timeouts are a socket's: `settimeout(t)` bounds each operation to t seconds (UpstreamTimeout, a
    TimeoutError, when it runs out), `settimeout(0)` makes `recv` non-blocking (BlockingIOError when
    nothing has arrived), `settimeout(None)` makes `recv` wait as long as it takes (in round trips of
    the lease's default io_timeout, so the broker still sees a live holder).
    """

    def __init__(
        self,
        client: Client,
        channel: Channel,
        generation: int,
        pool: str,
        token: bytes | None,
        io_timeout: float,
        *,
        timeout: float = 0.0,
        tag: str | None = None,
        when_done: bool = False,
    ) -> None:
        super().__init__(
            channel,
            generation,
            pool,
            token,
            io_timeout,
            client.broker_timeout,
            timeout=timeout,
            tag=tag,
            when_done=when_done,
        )
        self.client = client
        self.backend_pid: int | None = None  # a postgres pool's backend, as its grant said (not lazy)

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.release()
        else:
            self.discard()

    # -- I/O ---------------------------------------------------------------------------------

    def sendall(self, data: bytes) -> None:
        """Send all of `data` to the upstream: held, and sent with the next read (or flush, or
        release). An error sending it is raised by that call. Past HOLD_WRITES_UP_TO held bytes,
        whole chunks of that size go at once, one round trip each, so any size can be sent."""
        if self._hold(data):
            self._send_held(keep_tail=True)

    def flush(self) -> None:
        """Send the held writes now (a round trip per HOLD_WRITES_UP_TO bytes); nothing to do if
        none are held."""
        if self._held:
            self._send_held(keep_tail=False)

    def send(self, data: bytes) -> int:
        """As sendall (a lease takes every byte): returns len(data)."""
        self.sendall(data)
        return len(data)

    def recv_into(self, buffer: Any, nbytes: int = 0) -> int:
        """Read at least 1 and at most `nbytes` (or len(buffer)) bytes into `buffer`; 0 at end of stream."""
        view = memoryview(buffer).cast("B")
        data = self.recv(nbytes or len(view))
        view[: len(data)] = data
        return len(data)

    def makefile(self, mode: str = "rb", buffering: int | None = None, **_: Any) -> io.BufferedIOBase:
        """A binary file over the lease, as socket.makefile: "rb" or "wb". Closing it leaves the lease open."""
        return socket_file(self, mode, buffering)

    def shutdown(self, how: int = socket.SHUT_RDWR) -> None:
        """Send what is held; the connection is discarded on close (its state is unusual now)."""
        if not self._done:
            self.flush()
        self._shut = True

    def close(self) -> None:
        """As a socket's close: give the connection back (discarded after shutdown()). Idempotent."""
        if self._shut:
            self.discard()
        elif not self._done:
            self.release()

    def _send_held(self, keep_tail: bool) -> None:
        chunks, tail = self._take_held(keep_tail)
        for chunk in chunks:
            self._io(chunk)  # an error drops the rest: it can't follow
        self._held += tail  # less than a chunk: it goes with the next read

    def recv(self, bufsize: int = DEFAULT_RECV) -> bytes:
        """At least 1 byte and at most `bufsize`; b"" once the upstream has closed. How long it
        waits is settimeout()'s: non-blocking, it raises BlockingIOError when nothing is there."""
        if self._timeout == 0:
            if self._held:  # writes go out whole first: a poll has no time to wait for a full buffer
                self.flush()
            data = self._io(max_bytes=bufsize, poll=True, io_timeout=0)
            if not data and not self.eof:
                raise BlockingIOError(errno.EAGAIN, "nothing to read from the lease yet")
            return data
        if self._timeout is None:  # blocking: poll in io_timeout steps until something comes
            while True:
                data = self._io(max_bytes=bufsize, poll=True)
                if data or self.eof:
                    return data
        return self._io(max_bytes=bufsize)

    def recv_ready(self, count: int) -> bytes:
        """PostgreSQL: the server's messages up to and including the `count`-th ReadyForQuery, in
        one round trip; less when a COPY starts (the server then waits for the driver) or once
        256 KiB have come (a large result arrives in pieces). Blocking as recv() is under
        settimeout(None): in io_timeout rounds, so the broker still sees a live holder; a lazy
        lease's first round is short, so that its token (which Client.cancel needs) comes soon even
        when the answer takes long."""
        if self._timeout is None:
            while True:
                first_wait = FIRST_POLL if self._token is None else None
                data = self._io(poll=True, ready=count, io_timeout=first_wait)
                if data or self.eof:
                    return data
        return self._io(ready=count)

    def recv_exactly(self, n: int) -> bytes:
        """Exactly `n` bytes (UpstreamError if the upstream closes first)."""
        return self._io(exactly=n)

    def recv_until(self, delimiter: bytes) -> bytes:
        """Bytes up to and including `delimiter`."""
        return self._io(until=delimiter)

    def request(
        self, data: bytes, *, until: bytes | None = None, exactly: int | None = None, max_bytes: int = DEFAULT_RECV
    ) -> bytes:
        """Send `data` and read the answer in one round trip (see Client.request for how it reads)."""
        return self._io(data, until=until, exactly=exactly, max_bytes=max_bytes)

    def _io(
        self,
        send: bytes | None = None,
        *,
        until: bytes | None = None,
        exactly: int | None = None,
        max_bytes: int | None = None,
        release: str | None = None,
        poll: bool = False,
        io_timeout: float | None = None,
        ready: int | None = None,
    ) -> bytes:
        template, values, wait, token = self._prepare(send, until, exactly, max_bytes, release, poll, io_timeout, ready)
        try:
            reply = self._channel.call_packed(template, values, wait)
        except BrokerUnavailable:
            self._done = True  # the channel was reset: the broker will reclaim this lease
            raise
        return self._conclude(reply, token)

    # -- the end -----------------------------------------------------------------------------

    def release(self) -> None:
        """Give the connection back to the pool (it is closed instead if it is not clean). Held
        writes go with it, in one round trip that raises if sending them fails; else it is one-way."""
        if self._held and not self._done:
            self._io(release=RELEASE_KEEP)
            return
        self._end(RELEASE_KEEP)

    def discard(self) -> None:
        """End the lease and close the connection: for when its state is unknown. Held writes are
        dropped, never sent."""
        self._end(RELEASE_DISCARD)

    def _end(self, mode: str) -> None:
        ending = self._ending(mode)  # (one-way: nothing to wait for)
        if ending is not None:
            self._channel.send_oneway(*ending)
