"""The worker side: Client leases connections from the broker; Lease does I/O through one.

Sockets are made lazily, one DEALER per thread per process, so a Client may be created before
fork (gunicorn --preload) and shared by threads. Every call has a deadline: a broker that does not
answer gives BrokerUnavailable, never a hang.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any, Literal, overload

import zmq

from poolbroker.client._channel import DEFAULT_MAX_MESSAGE_SIZE, HOSTNAME, Channel, Curve, check_reply, close_sockets
from poolbroker.client._errors import BrokerUnavailable
from poolbroker.client._exchanges import DEFAULT_RECV, HOLD_WRITES_UP_TO, first_exchange
from poolbroker.client._lease import Lease
from poolbroker.client._lending import Lender, SocketLease
from poolbroker.wire.endpoint import default_endpoint
from poolbroker.wire.protocol import (
    ADMIN_DRAIN,
    ADMIN_PAUSE,
    ADMIN_RELOAD,
    ADMIN_RESIZE,
    ADMIN_RESUME,
    ADMIN_SHUTDOWN,
    RELEASE_KEEP,
    admin_request,
    cancel_request,
    lease_request,
    leases_request,
    ping_request,
    stats_request,
)

__all__ = ["HOLD_WRITES_UP_TO", "Client", "Lease", "SocketLease"]

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
        self._curve = Curve.from_arguments(server_key, client_key)
        self.max_message_size = max_message_size
        self.timeout = timeout
        self.io_timeout = io_timeout
        self.broker_timeout = broker_timeout
        self._lock = threading.Lock()
        self._ctx: zmq.Context[Any] | None = None
        self._channels: list[Channel] = []
        self._lenders: list[Lender] = []  # every thread's lending connection
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
        self._lenders = []  # (the parent's: their copies here are closed after fork)
        self._local = threading.local()

    def own_thread(self) -> Channel | None:
        """This thread's broker socket, if it has one yet."""
        return getattr(self._local, "channel", None)

    def _channel(self) -> Channel:
        channel: Channel | None = getattr(self._local, "channel", None)
        if channel is None:
            channel = self._local.channel = self.own_channel()
        return channel

    def own_channel(self) -> Channel:
        """A broker socket of its own, not this thread's: for leases that one connection of a
        client library uses from whichever thread uses it, one at a time (the channel's lock keeps
        them in turn). It closes with the Client."""
        with self._lock:
            if self._closed:
                raise BrokerUnavailable("this Client is closed")
            if self._ctx is None:
                self._ctx = zmq.Context()
                # Sockets before their context, even when the Client is collected in a cycle
                # (pyzmq's own collection could term the context first, and term waits forever).
                self._finalizer = weakref.finalize(self, close_sockets, self._ctx, self._channels)
                self._finalizer.atexit = False  # at exit another thread may still be in a call
            channel = Channel(self._ctx, self.endpoint, self._curve, self.max_message_size)
            self._channels.append(channel)
        return channel

    @overload
    def lease(
        self,
        pool: str,
        timeout: float | None = None,
        *,
        tag: str | None = None,
        io_timeout: float | None = None,
        lazy: bool = False,
        when_done: bool = False,
        channel: Channel | None = None,
        socket: Literal[False] = False,
    ) -> Lease: ...

    @overload
    def lease(
        self,
        pool: str,
        timeout: float | None = None,
        *,
        tag: str | None = None,
        io_timeout: float | None = None,
        socket: Literal[True],
    ) -> SocketLease: ...

    def lease(
        self,
        pool: str,
        timeout: float | None = None,
        *,
        tag: str | None = None,
        io_timeout: float | None = None,
        lazy: bool = False,
        when_done: bool = False,
        channel: Channel | None = None,
        socket: bool = False,
    ) -> Lease | SocketLease:
        """Lease a connection from `pool`, waiting up to `timeout` seconds for one.

        Use it in a `with` block: leaving normally releases it, leaving by an exception discards
        it (its state is unknown). `lazy=True` asks for nothing yet: the lease request goes with the
        first exchange, one round trip fewer, and the pool's errors come from that exchange.
        `when_done=True` ends the lease after the read that finishes the conversation, as the
        broker's redis or http pool sees it (see Lease): no release message of its own.
        `channel` (from own_channel()) carries it instead of this thread's broker socket.

        `socket=True` lends the upstream socket itself (a SocketLease; `lease.socket`), on the
        broker's host only: NotLent where it can't be (tcp, a TLS pool, lend_sockets = false).
        """
        timeout = self.timeout if timeout is None else timeout
        io_timeout = self.io_timeout if io_timeout is None else io_timeout
        if socket:
            return self._lend(pool, tag, io_timeout, timeout)
        channel = channel or self._channel()
        generation = channel.generation
        token, reply = None, {}
        if not lazy:
            message = lease_request(pool, timeout, channel.pid, HOSTNAME, tag)
            reply = check_reply(channel.call(message, timeout + self.broker_timeout))
            token = reply["lease"]
        lease = Lease(self, channel, generation, pool, token, io_timeout, timeout=timeout, tag=tag, when_done=when_done)
        lease.backend_pid = reply.get("backend_pid")
        return lease

    def _lend(self, pool: str, tag: str | None, io_timeout: float | None, timeout: float | None = None) -> SocketLease:
        """A socket lease whose socket has exactly `io_timeout` (None: it blocks), for the adapters
        (lease(socket=True) gives the Client's io_timeout for None)."""
        timeout = self.timeout if timeout is None else timeout
        lender: Lender | None = getattr(self._local, "lender", None)
        if lender is None:
            if self._closed:
                raise BrokerUnavailable("this Client is closed")
            lender = self._local.lender = Lender(self.endpoint)
            with self._lock:
                self._lenders.append(lender)
        reply, fd = lender.call(lease_request(pool, timeout, lender.pid, HOSTNAME, tag), timeout + self.broker_timeout)
        check_reply(reply)
        if fd is None:
            raise BrokerUnavailable("the broker's grant carried no socket")
        return SocketLease(lender, pool, reply["lease"], fd, io_timeout, reply)

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
        exchange = (io_timeout, until, exactly, max_bytes, RELEASE_KEEP, False, None)
        template = first_exchange(channel, pool, timeout, None, exchange, bool(data))
        wait = timeout + io_timeout + self.broker_timeout
        reply = check_reply(channel.call_packed(template, (data,) if data else (), wait))
        return reply.get("data", b"")  # type: ignore[no-any-return]

    def stats(self, pool: str | None = None) -> dict[str, dict[str, Any]]:
        """{pool_name: {stat_name: value}} for every pool, or just `pool`."""
        return self._stats_reply(pool)["pools"]  # type: ignore[no-any-return]

    def broker_stats(self) -> dict[str, Any]:
        """The broker's own counters: requests_received (every message), bad_requests, leases_active."""
        return self._stats_reply(None)["broker"]  # type: ignore[no-any-return]

    def _stats_reply(self, pool: str | None) -> dict[str, Any]:
        return check_reply(self._channel().call(stats_request(pool), self.broker_timeout))

    def ping(self) -> dict[str, Any]:
        """The broker's version, pool names, and per pool what it speaks: {"protocol": "redis",
        "reset": "auto", "protects": True} ("protects": what a holder leaves on a connection's
        session never reaches the next holder). Raises BrokerUnavailable if it does not answer."""
        reply = check_reply(self._channel().call(ping_request(), self.broker_timeout))
        return {
            "version": reply.get("version"),
            "pools": reply.get("pools", []),
            "protocols": reply.get("protocols", {}),
        }

    def cancel(self, lease: Lease | SocketLease) -> bool:
        """PostgreSQL: ask the server to cancel what `lease`'s backend is running now, as libpq's
        cancel does (the query fails with 57014). Any thread may call it, while another waits on
        the lease. False if the lease holds no connection (not granted yet, or over)."""
        token = lease.token
        if token is None:
            return False
        check_reply(self._channel().call(cancel_request(token), self.broker_timeout))
        return True

    def leases(self, pool: str | None = None) -> list[dict[str, Any]]:
        """Who holds what: per active lease its pool, holder (pid, host, tag), seconds held, idle
        and busy with I/O, operations and bytes each way."""
        return check_reply(self._channel().call(leases_request(pool), self.broker_timeout))["leases"]  # type: ignore[no-any-return]

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
        return check_reply(self._channel().call(admin_request(action, **fields), self.broker_timeout))

    def close(self) -> None:
        """Close this process's sockets, within broker_timeout. A call another thread is in
        meanwhile ends with BrokerUnavailable; its lease goes back when the broker sees its
        socket's connection end."""
        with self._lock:
            self._closed = True
            if self._finalizer is not None and self._ctx is not None:
                self._finalizer.detach()  # (a finalizer runs at most once: this is that once)
                close_sockets(self._ctx, self._channels, self.broker_timeout)
                self._finalizer = None
            self._ctx = None
            self._channels = []
            for lender in self._lenders:  # (the broker ends what they still lend: cut, then closed)
                lender.close()
            self._lenders = []
        self._local = threading.local()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
