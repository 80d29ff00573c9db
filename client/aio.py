"""The worker side for asyncio: AsyncClient and AsyncLease, on zmq.asyncio.

Every task of an event loop shares one DEALER socket: each request carries its id, and one reader
task hands each reply to the task that waits for it. Every call has a deadline. A task cancelled
(or timed out) while it waits leaks nothing: a grant that arrives after it gave up is given back,
and a lease cut in the middle of an exchange is discarded (its connection's state is unknown).
"""

from __future__ import annotations

import asyncio
import os
import weakref
from types import TracebackType
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from poolbroker.client.channel import DEFAULT_MAX_MESSAGE_SIZE, HOSTNAME, MAX_TEMPLATES, Curve, check_reply
from poolbroker.client.endpoint import default_endpoint
from poolbroker.client.errors import BrokerUnavailable, LimitExceeded
from poolbroker.client.exchanges import DEFAULT_RECV, LeaseCore, first_exchange, release_template
from poolbroker.client.protocol import (
    RELEASE_DISCARD,
    RELEASE_KEEP,
    VERSION,
    Template,
    lease_request,
    leases_request,
    ping_request,
    stats_request,
)

__all__ = ["AsyncClient", "AsyncLease"]


class AsyncChannel:
    """One DEALER socket of one event loop, shared by its tasks: replies are matched to requests
    by id."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, curve: Curve | None, max_message_size: int) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.get_running_loop()
        self.endpoint = endpoint
        self.max_message_size = max_message_size
        self.generation = 0  # (never reset: a timed-out request's late reply is simply dropped)
        self.templates: dict[tuple[Any, ...], Template] = {}
        self.packer = msgpack.Packer(use_bin_type=True)
        self.next_id = 1
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.sock: zmq.asyncio.Socket = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            self.sock.curve_serverkey = curve.server_key
            self.sock.curve_publickey = curve.public
            self.sock.curve_secretkey = curve.secret
        self.sock.connect(endpoint)
        self._reader = self.loop.create_task(self._read_replies(), name="poolbroker replies")

    def remember(self, key: tuple[Any, ...], template: Template) -> Template:
        if len(self.templates) >= MAX_TEMPLATES:
            self.templates.clear()
        self.templates[key] = template
        return template

    async def call(self, message: dict[str, Any], wait: float) -> dict[str, Any]:
        rid = self.next_id
        self.next_id = rid + 1
        message["v"] = VERSION
        message["id"] = rid
        return await self._round_trip(self.packer.pack(message), rid, wait)

    async def call_packed(self, template: Template, values: tuple[Any, ...], wait: float) -> dict[str, Any]:
        rid = self.next_id
        self.next_id = rid + 1
        return await self._round_trip(template.pack(self.packer.pack, rid, values), rid, wait)

    async def _round_trip(self, body: bytes, rid: int, wait: float) -> dict[str, Any]:
        if len(body) > self.max_message_size:
            limit = self.max_message_size
            raise LimitExceeded(f"a request of {len(body)} bytes is over the limit of {limit} (max_message_size)")
        answer: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        self.waiting[rid] = answer
        taken = False
        try:
            async with asyncio.timeout(wait):
                await self.sock.send(body)
                reply = await answer
                taken = True
                return reply
        except TimeoutError:
            raise BrokerUnavailable(f"no answer from the broker at {self.endpoint} within {wait:.1f}s") from None
        finally:
            # Given up (answered, timed out or cancelled): a late answer finds nobody, and a grant
            # in it is given back (_unclaimed).
            self.waiting.pop(rid, None)
            if not taken and answer.done() and not answer.cancelled():
                # The answer came, but the task was cancelled (or timed out) before it took it: no
                # one ever will. Without this, a grant in it would hold its connection until the
                # broker's lease_idle_timeout.
                self._unclaimed(answer.result())

    def send_oneway(self, template: Template, values: tuple[Any, ...]) -> None:
        """A request that wants no answer, sent now (from a task being cancelled, too)."""
        rid = self.next_id
        self.next_id = rid + 1
        try:
            # (an asyncio socket tries a send at once: a NOBLOCK one is done, or failed, on return)
            sent = asyncio.ensure_future(self.sock.send(template.pack(self.packer.pack, rid, values), zmq.NOBLOCK))
            sent.add_done_callback(_ignore)
        except zmq.ZMQError:
            pass  # the broker is unreachable; it will reclaim the lease itself

    async def _read_replies(self) -> None:
        while True:
            try:
                data = await self.sock.recv()
            except zmq.ZMQError:
                return  # the socket is closed
            try:
                reply = msgpack.unpackb(data)
            except Exception:  # msgpack raises several types for bad input
                continue  # (whoever waited for it is told by its deadline)
            rid = reply.get("id") if type(reply) is dict else None
            answer = self.waiting.pop(rid, None) if type(rid) is int else None
            if answer is None or answer.done():
                self._unclaimed(reply)
            else:
                answer.set_result(reply)

    def _unclaimed(self, reply: Any) -> None:
        """An answer nobody waits for any more. A lease granted in it goes back at once: kept if
        only granted, discarded if an exchange ran on it (its holder never saw the answer)."""
        if not (type(reply) is dict and reply.get("ok") is True and not reply.get("released")):
            return
        token = reply.get("lease")
        if isinstance(token, bytes):
            mode = RELEASE_DISCARD if "data" in reply else RELEASE_KEEP
            self.send_oneway(release_template(self, mode), (token,))

    def close(self) -> None:
        self._reader.cancel()
        for answer in self.waiting.values():
            answer.cancel()
        self.sock.close(linger=500)  # (a last one-way release may still be leaving)


def _ignore(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # (retrieved: a failed one-way send has nobody to tell)


class AsyncLease(LeaseCore):
    """A leased connection for asyncio: `await request(...)`, `await recv(...)`, `recv_exactly`,
    `recv_until`, `flush`; `sendall` holds writes for the next read (as the sync Lease's do);
    `settimeout` as a socket's. Use it in `async with`: leaving normally releases it, leaving by an
    exception (cancellation included) discards it. A task cancelled in the middle of an exchange
    discards the lease: its connection is closed, never handed on."""

    def __init__(
        self,
        client: AsyncClient,
        channel: AsyncChannel,
        pool: str,
        io_timeout: float,
        *,
        timeout: float,
        tag: str | None,
        lazy: bool,
        when_done: bool,
    ) -> None:
        super().__init__(
            channel, 0, pool, None, io_timeout, client.broker_timeout, timeout=timeout, tag=tag, when_done=when_done
        )
        self.client = client
        self._lazy = lazy  # asked for with its first exchange, not on entering

    async def __aenter__(self) -> AsyncLease:
        if not self._lazy and self._token is None and not self._done:
            message = lease_request(self.pool, self._acquire_timeout, self._channel.pid, HOSTNAME, self.tag)
            reply = check_reply(await self._channel.call(message, self._acquire_timeout + self._broker_timeout))
            self._token = reply["lease"]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            await self.release()
        else:
            self.discard()

    def sendall(self, data: bytes) -> None:
        """Hold `data`: it goes with the next read (or flush, or release)."""
        self._hold(data)

    async def flush(self) -> None:
        """Send the held writes now (a round trip per HOLD_WRITES_UP_TO bytes)."""
        if self._held:
            await self._send_held(keep_tail=False)

    async def _send_held(self, keep_tail: bool) -> None:
        """As the sync Lease's: whole chunks at once, a round trip each; with `keep_tail`, what
        is left under a chunk is held again, for the next read."""
        chunks, tail = self._take_held(keep_tail)
        for chunk in chunks:
            await self._io(chunk)  # an error drops the rest: it can't follow
        self._held += tail

    async def recv(self, bufsize: int = DEFAULT_RECV) -> bytes:
        """At least 1 byte and at most `bufsize`; b"" once the upstream has closed. settimeout(0):
        BlockingIOError when nothing is there; settimeout(None): wait as long as it takes."""
        if self._timeout == 0:
            await self.flush()  # (writes go out whole first: a poll has no time to wait)
            data = await self._io(max_bytes=bufsize, poll=True, io_timeout=0)
            if not data and not self.eof:
                raise BlockingIOError("nothing to read from the lease yet")
            return data
        if self._timeout is None:
            while True:
                data = await self._io(max_bytes=bufsize, poll=True)
                if data or self.eof:
                    return data
        return await self._io(max_bytes=bufsize)

    async def recv_exactly(self, n: int) -> bytes:
        return await self._io(exactly=n)

    async def recv_until(self, delimiter: bytes) -> bytes:
        return await self._io(until=delimiter)

    async def request(
        self, data: bytes, *, until: bytes | None = None, exactly: int | None = None, max_bytes: int = DEFAULT_RECV
    ) -> bytes:
        """Send `data` and read the answer in one round trip."""
        return await self._io(data, until=until, exactly=exactly, max_bytes=max_bytes)

    async def _io(
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
        if self._hold(send or b""):  # (sendall only holds: past a chunk, the chunks go first)
            await self._send_held(keep_tail=True)
        send = None  # (held: it goes first, with this exchange)
        template, values, wait, token = self._prepare(send, until, exactly, max_bytes, release, poll, io_timeout)
        try:
            reply = await self._channel.call_packed(template, values, wait)
        except (asyncio.CancelledError, BrokerUnavailable):
            # Cut short: the exchange may still be running, the connection's state is unknown. A
            # granted lease is discarded now; a lazy one's grant, if it comes, the channel discards.
            self.discard()
            raise
        return self._conclude(reply, token)

    async def release(self) -> None:
        """Give the connection back (closed instead if not clean). Held writes go with it, in a
        round trip that raises if sending them fails; else it is one-way."""
        if self._held and not self._done:
            await self._io(release=RELEASE_KEEP)
            return
        self._end(RELEASE_KEEP)

    def discard(self) -> None:
        """End the lease and close the connection; held writes are dropped."""
        self._end(RELEASE_DISCARD)

    def _end(self, mode: str) -> None:
        ending = self._ending(mode)
        if ending is not None:
            self._channel.send_oneway(*ending)


# Contexts and sockets a forked child inherited: never used, closed or collected there.
_inherited: list[Any] = []


def _close_collected(ctx: zmq.asyncio.Context, channels: dict[asyncio.AbstractEventLoop, AsyncChannel]) -> None:
    """An AsyncClient collected unclosed: its sockets before its context, as Client does (pyzmq's
    own collection may term the context first, and term waits forever). Its loops may be closed or
    busy: nothing here touches them."""
    for channel in channels.values():
        channel.sock.close(linger=0)
    ctx.term()


class AsyncClient:
    """A handle on the broker for asyncio code, shared by the tasks of a process: as Client, with
    every call awaited. `async with AsyncClient() as c:` closes it at the end (else `await
    c.aclose()`)."""

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
        self._ctx: zmq.asyncio.Context | None = None
        self._pid = os.getpid()
        self._channels: dict[asyncio.AbstractEventLoop, AsyncChannel] = {}
        self._closed = False
        self._finalizer: weakref.finalize[Any, Any] | None = None  # closes the sockets and context

    def __repr__(self) -> str:
        return f"<AsyncClient {self.endpoint}>"

    def _channel(self) -> AsyncChannel:
        if self._closed:
            raise BrokerUnavailable("this AsyncClient is closed")
        if self._pid != os.getpid():
            self._forget_parent()
        loop = asyncio.get_running_loop()
        channel = self._channels.get(loop)
        if channel is None:
            if self._ctx is None:
                self._ctx = zmq.asyncio.Context()
                self._finalizer = weakref.finalize(self, _close_collected, self._ctx, self._channels)
                self._finalizer.atexit = False  # at exit a loop may still be in a call
            channel = self._channels[loop] = AsyncChannel(self._ctx, self.endpoint, self._curve, self.max_message_size)
        return channel

    def _forget_parent(self) -> None:
        """Forked: the parent's sockets are the parent's (closing them here could disturb its
        connections)."""
        _inherited.extend([self._ctx, self._channels])
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._ctx, self._channels, self._pid = None, {}, os.getpid()

    def lease(
        self,
        pool: str,
        timeout: float | None = None,
        *,
        tag: str | None = None,
        io_timeout: float | None = None,
        lazy: bool = False,
        when_done: bool = False,
    ) -> AsyncLease:
        """`async with c.lease(pool) as conn:` leases on entering (or, `lazy`, with the first
        exchange), releases on leaving normally and discards on an exception."""
        return AsyncLease(
            self,
            self._channel(),
            pool,
            self.io_timeout if io_timeout is None else io_timeout,
            timeout=self.timeout if timeout is None else timeout,
            tag=tag,
            lazy=lazy,
            when_done=when_done,
        )

    async def request(
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
        """A whole lease cycle in one round trip: lease, send `data`, read the answer, release."""
        timeout = self.timeout if timeout is None else timeout
        io_timeout = self.io_timeout if io_timeout is None else io_timeout
        channel = self._channel()
        template = first_exchange(
            channel, pool, timeout, None, (io_timeout, until, exactly, max_bytes, RELEASE_KEEP, False, None), bool(data)
        )
        wait = timeout + io_timeout + self.broker_timeout
        reply = check_reply(await channel.call_packed(template, (data,) if data else (), wait))
        return reply.get("data", b"")  # type: ignore[no-any-return]

    async def stats(self, pool: str | None = None) -> dict[str, dict[str, Any]]:
        return (await self._ask(stats_request(pool)))["pools"]  # type: ignore[no-any-return]

    async def broker_stats(self) -> dict[str, Any]:
        return (await self._ask(stats_request(None)))["broker"]  # type: ignore[no-any-return]

    async def leases(self, pool: str | None = None) -> list[dict[str, Any]]:
        return (await self._ask(leases_request(pool)))["leases"]  # type: ignore[no-any-return]

    async def ping(self) -> dict[str, Any]:
        reply = await self._ask(ping_request())
        return {key: reply.get(key) for key in ("version", "pools", "protocols")}

    async def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        return check_reply(await self._channel().call(message, self.broker_timeout))

    async def aclose(self) -> None:
        """Close this process's sockets (a last one-way release gets a moment to leave)."""
        self._closed = True
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            channel.close()
        if self._ctx is not None and self._pid == os.getpid():
            await asyncio.to_thread(self._ctx.term)  # (it waits for the sockets' linger: not in the loop)
        self._ctx = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
