"""The worker side: Client leases connections from the broker; Lease does I/O through one.

Sockets are made lazily, one DEALER per thread per process, so a Client may be created before
fork (gunicorn --preload) and shared by threads. Every call has a deadline: a broker that does not
answer gives BrokerUnavailable, never a hang.
"""

from __future__ import annotations

import errno
import io
import os
import socket
import threading
import time
import weakref
from types import TracebackType
from typing import Any

import msgpack
import zmq

from client.endpoint import default_endpoint
from client.errors import BrokerUnavailable, LeaseLost, LimitExceeded, ProtocolError, error_from_code
from client.keys import CLIENT_KEY_ENV, SERVER_KEY_ENV, load_key_pair, load_public_key
from client.protocol import (
    ADMIN_DRAIN,
    ADMIN_PAUSE,
    ADMIN_RELOAD,
    ADMIN_RESIZE,
    ADMIN_RESUME,
    ADMIN_SHUTDOWN,
    RELEASE_DISCARD,
    RELEASE_KEEP,
    VERSION,
    ErrorCode,
    add_exchange,
    admin_request,
    io_request,
    lease_request,
    leases_request,
    ping_request,
    release_request,
    stats_request,
)

HOSTNAME = socket.gethostname()
DEFAULT_RECV = 65536
CLOSE_LINGER_MS = 500
# A lease holds writes until its next read (so that a write and its answer are one round trip), or
# until this many bytes are held: then they go at once, in a round trip of their own.
HOLD_WRITES_UP_TO = 256 * 1024
# The broker's default max_message_size: it drops the connection of a client that sends more,
# without a word, so the client refuses to send such a request and says why.
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024


class _Curve:
    """The keys of a CURVE connection: the broker's public key and this client's key pair."""

    def __init__(self, server_key: bytes, public: bytes, secret: bytes) -> None:
        self.server_key = server_key
        self.public = public
        self.secret = secret

    @classmethod
    def from_arguments(cls, server_key: str | None, client_key: str | None) -> _Curve | None:
        server_key = server_key or os.environ.get(SERVER_KEY_ENV)
        client_key = client_key or os.environ.get(CLIENT_KEY_ENV)
        if server_key is None and client_key is None:
            return None
        if server_key is None or client_key is None:
            raise ValueError(
                f"CURVE needs both the broker's public key (server_key or ${SERVER_KEY_ENV}) and"
                f" this client's key pair (client_key or ${CLIENT_KEY_ENV})"
            )
        public, secret = load_key_pair(client_key, "client_key")
        return cls(load_public_key(server_key, "server_key"), public, secret)


class _Channel:
    """One DEALER socket, used by one thread at a time (its lock lets a Lease cross threads)."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, curve: _Curve | None, max_message_size: int) -> None:
        self.pid = os.getpid()
        self.endpoint = endpoint
        self.curve = curve
        self.max_message_size = max_message_size
        self.lock = threading.Lock()
        self.packer = msgpack.Packer(use_bin_type=True)
        self.next_id = 1
        self._ctx = ctx
        self.sock = self._connect()
        self._recv_timeout_ms = -1  # RCVTIMEO as last set
        self.generation = 0  # bumped on reset: leases taken on an older socket are lost

    def _connect(self) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)  # never let close() or term() wait on unsent messages
        if self.curve is not None:
            sock.curve_serverkey = self.curve.server_key
            sock.curve_publickey = self.curve.public
            sock.curve_secretkey = self.curve.secret
        sock.connect(self.endpoint)
        return sock

    def _reset(self) -> None:
        # After a timeout the old socket may still deliver our request, and its reply, later: a
        # new socket drops both, so no stale grant can arrive where nobody expects it.
        self.sock.close(linger=0)
        self.sock = self._connect()
        self._recv_timeout_ms = -1
        self.generation += 1

    def call(self, message: dict[str, Any], wait: float) -> dict[str, Any]:
        """Send a request and return its reply (ok or error) within `wait` seconds."""
        with self.lock:
            rid = self.next_id
            self.next_id = rid + 1
            message["v"] = VERSION
            message["id"] = rid
            body = self.packer.pack(message)
            if len(body) > self.max_message_size:
                limit = self.max_message_size
                raise LimitExceeded(f"a request of {len(body)} bytes is over the limit of {limit} (max_message_size)")
            try:
                self.sock.send(body, zmq.NOBLOCK)
            except zmq.Again:
                self._reset()
                raise BrokerUnavailable(f"the broker at {self.endpoint} is not taking requests") from None
            deadline = time.monotonic() + wait
            remaining = wait
            while True:
                # A blocking recv with RCVTIMEO: a poll before each recv would cost a wake-up more.
                timeout_ms = int(remaining * 1000) or 1
                if timeout_ms != self._recv_timeout_ms:
                    self.sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
                    self._recv_timeout_ms = timeout_ms
                try:
                    data = self.sock.recv()
                except zmq.Again:
                    raise self._no_answer(wait) from None
                try:
                    reply = msgpack.unpackb(data)
                except Exception as exc:  # msgpack raises several types for bad input
                    raise ProtocolError(f"undecodable reply from the broker: {exc}") from None
                if type(reply) is dict and reply.get("id") == rid:
                    return reply
                self._drop_stray(reply)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._no_answer(wait)

    def _no_answer(self, wait: float) -> BrokerUnavailable:
        self._reset()
        hint = ""
        if self.curve is not None:
            hint = " (with CURVE, also check the broker's public key and that the broker lets this client's key in)"
        return BrokerUnavailable(f"no answer from the broker at {self.endpoint} within {wait:.1f}s{hint}")

    def _drop_stray(self, reply: Any) -> None:
        """A reply nobody waits for: an earlier call here was interrupted (KeyboardInterrupt, say).
        If it granted a lease, give the lease back now rather than hold a connection unused."""
        if not (isinstance(reply, dict) and reply.get("ok") is True and not reply.get("released")):
            return
        token = reply.get("lease")
        if isinstance(token, bytes):
            message = {**release_request(token), "v": VERSION, "id": self.next_id, "noreply": True}
            self.next_id += 1
            try:
                self.sock.send(self.packer.pack(message), zmq.NOBLOCK)
            except zmq.Again:
                pass  # the broker reclaims it when its time limits say so

    def send_oneway(self, message: dict[str, Any]) -> None:
        with self.lock:
            message["v"] = VERSION
            message["id"] = self.next_id
            message["noreply"] = True
            self.next_id += 1
            try:
                self.sock.send(self.packer.pack(message), zmq.NOBLOCK)
            except zmq.Again:
                pass  # the broker is unreachable; it will reclaim the lease itself

    def close(self) -> None:
        # A one-way release sent just before may still be queued: give it a moment to leave (else
        # the broker reclaims that lease when the connection closes, closing a good connection).
        self.sock.close(linger=CLOSE_LINGER_MS)


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


def _close_sockets(ctx: zmq.Context[Any], channels: list[_Channel]) -> None:
    for channel in channels:
        channel.close()
    ctx.term()


def _check(reply: dict[str, Any]) -> dict[str, Any]:
    if reply.get("ok") is True:
        return reply
    raise error_from_code(str(reply.get("error")), str(reply.get("message", "")))


# Sockets and contexts a forked child inherited: never used, never closed, never collected there
# (closing them in the child could disturb the parent's connections).
_inherited: list[Any] = []
_clients: weakref.WeakSet[Client] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for client in list(_clients):
        client._forget_parent()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Client:
    """A handle on the broker, shared by the threads and surviving forks of a worker process.

    `timeout` is the default acquire timeout of lease(), `io_timeout` the default of each I/O
    operation; `broker_timeout` is how much longer than those a call waits for the broker before
    raising BrokerUnavailable.

    For a broker that uses CURVE (tcp beyond loopback), `server_key` is its public key (a key file
    or the z85 text) and `client_key` this client's key pair (a `poolbroker keygen` .key_secret
    file); they default to $POOLBROKER_SERVER_KEY and $POOLBROKER_CLIENT_KEY. `max_message_size`
    must not exceed the broker's: a larger request is refused here with LimitExceeded.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout: float = 5.0,
        io_timeout: float = 30.0,
        broker_timeout: float = 2.0,
        server_key: str | None = None,
        client_key: str | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self.endpoint = endpoint or default_endpoint()
        self._curve = _Curve.from_arguments(server_key, client_key)
        self.max_message_size = max_message_size
        self.timeout = timeout
        self.io_timeout = io_timeout
        self.broker_timeout = broker_timeout
        self._lock = threading.Lock()
        self._ctx: zmq.Context[Any] | None = None
        self._channels: list[_Channel] = []
        self._local = threading.local()
        self._closed = False
        self._finalizer: weakref.finalize[Any, Any] | None = None  # closes the sockets and context
        _clients.add(self)

    def __repr__(self) -> str:
        return f"<Client {self.endpoint}>"

    def _forget_parent(self) -> None:
        _inherited.extend([self._ctx, self._channels, self._local])
        if self._finalizer is not None:
            self._finalizer.detach()  # the parent's sockets are the parent's to close
            self._finalizer = None
        self._lock = threading.Lock()
        self._ctx = None
        self._channels = []
        self._local = threading.local()

    def _channel(self) -> _Channel:
        channel: _Channel | None = getattr(self._local, "channel", None)
        if channel is not None:
            return channel
        with self._lock:
            if self._closed:
                raise BrokerUnavailable("this Client is closed")
            if self._ctx is None:
                self._ctx = zmq.Context()
                # Sockets before their context, even when the Client is collected in a cycle
                # (pyzmq's own collection could term the context first, and term waits forever).
                self._finalizer = weakref.finalize(self, _close_sockets, self._ctx, self._channels)
                self._finalizer.atexit = False  # at exit another thread may still be in a call
            channel = _Channel(self._ctx, self.endpoint, self._curve, self.max_message_size)
            self._channels.append(channel)
        self._local.channel = channel
        return channel

    def lease(
        self,
        pool: str,
        timeout: float | None = None,
        *,
        tag: str | None = None,
        io_timeout: float | None = None,
    ) -> Lease:
        """Lease a connection from `pool`, waiting up to `timeout` seconds for one.

        Use it in a `with` block: leaving normally releases it, leaving by an exception discards
        it (its state is unknown).
        """
        timeout = self.timeout if timeout is None else timeout
        channel = self._channel()
        message = lease_request(pool, timeout, channel.pid, HOSTNAME, tag)
        generation = channel.generation
        reply = _check(channel.call(message, timeout + self.broker_timeout))
        io_timeout = self.io_timeout if io_timeout is None else io_timeout
        return Lease(self, channel, generation, pool, reply["lease"], io_timeout)

    def request(
        self,
        pool: str,
        data: bytes,
        *,
        until: bytes | None = None,
        exactly: int | None = None,
        max_bytes: int = DEFAULT_RECV,
        timeout: float | None = None,
        io_timeout: float | None = None,
    ) -> bytes:
        """A whole lease cycle in one round trip: lease, send `data`, read the answer, release.

        The answer is read up to and including `until`, or `exactly` bytes, or else whatever
        arrives first (at most `max_bytes`).
        """
        timeout = self.timeout if timeout is None else timeout
        io_timeout = self.io_timeout if io_timeout is None else io_timeout
        channel = self._channel()
        message = add_exchange(
            lease_request(pool, timeout, channel.pid, HOSTNAME),
            data,
            io_timeout,
            until,
            exactly,
            max_bytes,
            RELEASE_KEEP,
        )
        reply = _check(channel.call(message, timeout + io_timeout + self.broker_timeout))
        return reply.get("data", b"")  # type: ignore[no-any-return]

    def stats(self, pool: str | None = None) -> dict[str, dict[str, Any]]:
        """{pool_name: {stat_name: value}} for every pool, or just `pool`."""
        return self._stats_reply(pool)["pools"]  # type: ignore[no-any-return]

    def broker_stats(self) -> dict[str, Any]:
        """The broker's own counters: requests_received (every message), bad_requests, leases_active."""
        return self._stats_reply(None)["broker"]  # type: ignore[no-any-return]

    def _stats_reply(self, pool: str | None) -> dict[str, Any]:
        return _check(self._channel().call(stats_request(pool), self.broker_timeout))

    def ping(self) -> dict[str, Any]:
        """The broker's version, pool names, and per pool what it speaks: {"protocol": "redis",
        "reset": "auto", "protects": True} ("protects": what a holder leaves on a connection's
        session never reaches the next holder). Raises BrokerUnavailable if it does not answer."""
        reply = _check(self._channel().call(ping_request(), self.broker_timeout))
        return {
            "version": reply.get("version"),
            "pools": reply.get("pools", []),
            "protocols": reply.get("protocols", {}),
        }

    def leases(self, pool: str | None = None) -> list[dict[str, Any]]:
        """Who holds what: per active lease its pool, holder (pid, host, tag), seconds held, idle
        and busy with I/O, operations and bytes each way."""
        return _check(self._channel().call(leases_request(pool), self.broker_timeout))["leases"]  # type: ignore[no-any-return]

    # -- administration: NotAuthorized unless this client may administer the broker (on ipc, the
    # broker's own user; with CURVE, a key in its admin_keys) -----------------------------------

    def pause_pool(self, pool: str) -> None:
        """The pool hands nothing out until resumed: lease requests wait (with their timeouts)."""
        self._admin(ADMIN_PAUSE, pool=pool)

    def resume_pool(self, pool: str) -> None:
        self._admin(ADMIN_RESUME, pool=pool)

    def resize_pool(self, pool: str, max_size: int) -> None:
        """A new max_size, live: lowered, the excess connections close as they come back."""
        self._admin(ADMIN_RESIZE, pool=pool, max_size=max_size)

    def drain_pool(self, pool: str) -> None:
        """Close the pool's idle connections now and the others as they come back."""
        self._admin(ADMIN_DRAIN, pool=pool)

    def reload_broker(self) -> dict[str, list[str]]:
        """Reread the broker's config file, as SIGHUP does: {"added": [...], "removed": [...],
        "changed": [...]} pool names. A config that does not load changes nothing (PoolBrokerError)."""
        reply = self._admin(ADMIN_RELOAD)
        return {key: reply.get(key, []) for key in ("added", "removed", "changed")}

    def shutdown_broker(self) -> None:
        """Ask the broker to shut down as SIGTERM does."""
        self._admin(ADMIN_SHUTDOWN)

    def _admin(self, action: str, **fields: Any) -> dict[str, Any]:
        return _check(self._channel().call(admin_request(action, **fields), self.broker_timeout))

    def close(self) -> None:
        """Close this process's sockets. Call it when no thread uses the Client any more."""
        with self._lock:
            self._closed = True
            if self._finalizer is not None:
                self._finalizer()  # (once: a finalizer runs at most once)
                self._finalizer = None
            self._ctx = None
            self._channels = []
        self._local = threading.local()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Lease:
    """A leased upstream connection that works like a socket: `sendall`, `send`, `recv`,
    `recv_into`, `makefile`, `settimeout`, `gettimeout`, `shutdown`, `close`, so code written for a
    socket (http.client, redis-py) runs over it.

    Writes are held and go with the next read, so that a request and its answer are one round trip
    however they are written; `flush()` sends them at once. Reads and flushes are one round trip each.
    `close()` gives the connection back, as `release()` does; after `shutdown()` it is discarded.

    Timeouts are a socket's: `settimeout(t)` bounds each operation to t seconds (UpstreamTimeout, a
    TimeoutError, when it runs out), `settimeout(0)` makes `recv` non-blocking (BlockingIOError when
    nothing has arrived), `settimeout(None)` makes `recv` wait as long as it takes (in round trips of
    the lease's default io_timeout, so the broker still sees a live holder).
    """

    def __init__(
        self, client: Client, channel: _Channel, generation: int, pool: str, token: bytes, io_timeout: float
    ) -> None:
        self.client = client
        self.pool = pool
        self.io_timeout = io_timeout
        self._channel = channel
        self._generation = generation
        self._token = token
        self._done = False
        self._held = bytearray()  # writes not yet sent: they go with the next read
        self._default_io_timeout = io_timeout
        self._timeout: float | None = io_timeout  # as settimeout() set it: None blocks, 0 polls
        self._shut = False  # shutdown() was called: close() discards
        self._used = False  # an I/O operation went to the broker
        self.eof = False  # the upstream closed its side

    def __repr__(self) -> str:
        state = "released" if self._done else "active"
        return f"<Lease {self.pool} {self._token[:4].hex()}.. {state}>"

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
        message = add_exchange(io_request(self._token), send, io_timeout, until, exactly, max_bytes, release, poll)
        try:
            reply = self._channel.call(message, io_timeout + self.client.broker_timeout)
        except BrokerUnavailable:
            self._done = True  # the channel was reset: the broker will reclaim this lease
            raise
        if reply.get("released") or reply.get("error") == ErrorCode.LEASE_LOST:
            self._done = True
        reply = _check(reply)
        if reply.get("eof"):
            self.eof = True
        return reply.get("data", b"")  # type: ignore[no-any-return]

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
        # One-way: nothing to wait for. A lease already lost, or a parent's, is left alone.
        self._held.clear()
        if self._done or self._channel.pid != os.getpid() or self._channel.generation != self._generation:
            self._done = True
            return
        self._done = True
        self._channel.send_oneway(release_request(self._token, mode))

    @property
    def released(self) -> bool:
        return self._done
