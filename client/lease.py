"""A leased upstream connection that works like a socket, its I/O going through the broker."""

from __future__ import annotations

import errno
import io
import os
import socket
from types import TracebackType
from typing import TYPE_CHECKING, Any

from poolbroker.client.channel import HOSTNAME, Channel
from poolbroker.client.errors import BrokerUnavailable, LeaseLost, error_from_code
from poolbroker.client.protocol import (
    OP_IO,
    OP_LEASE,
    OP_RELEASE,
    RELEASE_DISCARD,
    RELEASE_KEEP,
    RELEASE_WHEN_DONE,
    ErrorCode,
    Template,
    add_exchange,
    lease_request,
)

if TYPE_CHECKING:
    from poolbroker.client.client import Client

DEFAULT_RECV = 65536
# A lease holds writes until its next read (so that a write and its answer are one round trip), or
# until this many bytes are held: then they go at once, in a round trip of their own.
HOLD_WRITES_UP_TO = 256 * 1024


def first_exchange(
    channel: Channel,
    pool: str,
    timeout: float,
    tag: str | None,
    exchange: tuple[float, bytes | None, int | None, int | None, str | None, bool],
    sending: bool,
) -> Template:
    """The template of a lease request that carries its first exchange (a lazy lease's first I/O,
    a one-shot cycle): `exchange` is (io_timeout, until, exactly, max_bytes, release, poll)."""
    key = (OP_LEASE, pool, timeout, tag, exchange, sending)
    template = channel.templates.get(key)
    if template is None:
        message = add_exchange(lease_request(pool, timeout, channel.pid, HOSTNAME, tag), None, *exchange)
        template = channel.remember(key, Template(message, ("send",) if sending else ()))
    return template


def _next_exchange(
    channel: Channel, exchange: tuple[float, bytes | None, int | None, int | None, str | None, bool], sending: bool
) -> Template:
    """The template of an exchange on a lease already held."""
    key = (OP_IO, exchange, sending)
    template = channel.templates.get(key)
    if template is None:
        message = add_exchange({"op": OP_IO}, None, *exchange)
        template = channel.remember(key, Template(message, ("lease", "send") if sending else ("lease",)))
    return template


def _release(channel: Channel, mode: str) -> Template:
    key = (OP_RELEASE, mode)
    template = channel.templates.get(key)
    if template is None:
        template = channel.remember(key, Template({"op": OP_RELEASE, "release": mode, "noreply": True}, ("lease",)))
    return template


class _LeaseIO(io.RawIOBase):
    """The raw stream under Lease.makefile(): reads and writes go through the lease."""

    def __init__(self, lease: Lease, reading: bool) -> None:
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


class Lease:
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
        self.client = client
        self.pool = pool
        self.io_timeout = io_timeout
        self.tag = tag
        self._channel = channel
        self._generation = generation
        self._token = token  # None: a lazy lease, requested with its first exchange
        self._acquire_timeout = timeout  # (a lazy lease's: how long its first exchange may wait for a grant)
        self._when_done = when_done  # each read may end the lease, once the broker sees the conversation over
        self._done = False
        self._held = bytearray()  # writes not yet sent: they go with the next read
        self._default_io_timeout = io_timeout
        self._timeout: float | None = io_timeout  # as settimeout() set it: None blocks, 0 polls
        self._shut = False  # shutdown() was called: close() discards
        self._used = False  # an I/O operation went to the broker
        self.eof = False  # the upstream closed its side

    def __repr__(self) -> str:
        state = "released" if self._done else "active" if self._token is not None else "not yet granted"
        token = f" {self._token[:4].hex()}.." if self._token is not None else ""
        return f"<Lease {self.pool}{token} {state}>"

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
        self._check_usable()
        if data:
            self._held += data
            if len(self._held) > HOLD_WRITES_UP_TO:
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
        if mode not in ("rb", "wb"):
            raise ValueError(f"invalid mode {mode!r}: a lease's file is binary, 'rb' or 'wb'")
        raw = _LeaseIO(self, reading=mode == "rb")
        size = buffering if buffering and buffering > 0 else DEFAULT_RECV
        return io.BufferedReader(raw, size) if mode == "rb" else io.BufferedWriter(raw, size)

    def settimeout(self, timeout: float | None) -> None:
        """As a socket's: seconds each I/O operation may take; 0: `recv` does not wait; None: `recv`
        waits as long as it takes. The other operations take the lease's default io_timeout then."""
        if timeout is not None and not 0 <= timeout <= 86400:
            raise ValueError("a lease's timeout is in [0, 86400] seconds, or None")
        self._timeout = None if timeout is None else float(timeout)
        self.io_timeout = self._timeout if self._timeout else self._default_io_timeout

    def gettimeout(self) -> float | None:
        return self._timeout

    @property
    def fresh(self) -> bool:
        """Nothing was sent or read yet: the connection is as the broker handed it out (clean, with
        nothing to read), which a caller may know without asking."""
        return not self._used and not self._held

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
        held = bytes(self._held)
        self._held.clear()
        end = len(held) - len(held) % HOLD_WRITES_UP_TO if keep_tail else len(held)
        for start in range(0, end, HOLD_WRITES_UP_TO):
            self._io(held[start : start + HOLD_WRITES_UP_TO])  # an error drops the rest: it can't follow
        self._held += held[end:]  # less than a chunk: it goes with the next read

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
    ) -> bytes:
        self._check_usable()
        if self._held:  # the held writes go first, in the same exchange
            if send:
                self._held += send
            send = bytes(self._held)
            self._held.clear()
        self._used = True
        io_timeout = self.io_timeout if io_timeout is None else io_timeout
        if release is None and self._when_done and (until is not None or exactly is not None or max_bytes):
            release = RELEASE_WHEN_DONE
        exchange = (io_timeout, until, exactly, max_bytes, release, poll)
        channel = self._channel
        token = self._token
        wait = io_timeout + self.client.broker_timeout
        if token is None:  # a lazy lease: the lease request goes with its first exchange
            template = first_exchange(channel, self.pool, self._acquire_timeout, self.tag, exchange, bool(send))
            values: tuple[bytes, ...] = (send,) if send else ()
            wait += self._acquire_timeout
        else:
            template = _next_exchange(channel, exchange, bool(send))
            values = (token, send) if send else (token,)
        try:
            reply = channel.call_packed(template, values, wait)
        except BrokerUnavailable:
            self._done = True  # the channel was reset: the broker will reclaim this lease
            raise
        if reply.get("ok") is True:
            if token is None:
                self._token = reply["lease"]
            if reply.get("released"):
                self._done = True
            if reply.get("eof"):
                self.eof = True
            return reply.get("data", b"")  # type: ignore[no-any-return]
        # A lazy lease whose first exchange fails is over (never granted, or ended with it).
        if token is None or reply.get("released") or reply.get("error") == ErrorCode.LEASE_LOST:
            self._done = True
        raise error_from_code(str(reply.get("error")), str(reply.get("message", "")))

    def _check_usable(self) -> None:
        if self._done:
            raise LeaseLost("this lease has been released")
        if self._channel.pid != os.getpid():
            raise LeaseLost("this lease belongs to the parent process; lease again after fork")
        if self._channel.generation != self._generation:
            self._done = True
            raise LeaseLost("the connection to the broker was reset since this lease was taken")

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
        # One-way: nothing to wait for. A lease already lost, or a parent's, or a lazy one never
        # granted, is left alone.
        self._held.clear()
        channel = self._channel
        token = self._token
        if self._done or token is None or channel.pid != os.getpid() or channel.generation != self._generation:
            self._done = True
            return
        self._done = True
        channel.send_oneway(_release(channel, mode), (token,))

    @property
    def released(self) -> bool:
        return self._done
