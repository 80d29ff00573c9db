"""The worker side for asyncio: AsyncClient and AsyncLease, on zmq.asyncio.

Every task of an event loop shares one DEALER socket: each request carries its id, and one reader
task hands each reply to the task that waits for it. Every call has a deadline. A task cancelled
(or timed out) while it waits leaks nothing: a grant that arrives after it gave up is given back,
and a lease cut in the middle of an exchange is discarded (its connection's state is unknown).
"""

from __future__ import annotations

import asyncio
import os
import socket
import weakref
from types import TracebackType
from typing import Any

import zmq
import zmq.asyncio

from poolbroker.client._aio_lending import AsyncLender, AsyncSocketLeasing
from poolbroker.client._async_channel import AsyncChannel
from poolbroker.client._channel import DEFAULT_MAX_MESSAGE_SIZE, HOSTNAME, Curve, check_reply
from poolbroker.client._errors import BrokerUnavailable
from poolbroker.client._exchanges import (
    DEFAULT_RECV,
    HOLD_WRITES_UP_TO,
    LeaseCore,
    first_exchange,
    next_exchange,
    reads,
)
from poolbroker.client._lease import FIRST_POLL
from poolbroker.wire.endpoint import default_endpoint
from poolbroker.wire.protocol import (
    ADMIN_DRAIN,
    ADMIN_PAUSE,
    ADMIN_RELOAD,
    ADMIN_RESIZE,
    ADMIN_RESUME,
    ADMIN_SHUTDOWN,
    RELEASE_DISCARD,
    RELEASE_KEEP,
    admin_request,
    cancel_request,
    lease_request,
    leases_request,
    ping_request,
    stats_request,
)

__all__ = ["AsyncClient", "AsyncLease"]


class AsyncLease(LeaseCore):
    """A leased connection for asyncio, as the sync Lease with its I/O awaited: `await
    request(...)`, `recv`, `recv_into`, `recv_exactly`, `recv_until`, `recv_ready`, `flush`,
    `shutdown`, `release`, and `aclose` for close; `sendall` and `send` hold writes for the next
    read (as the sync Lease's do), or send them at once while another task's read is under way;
    `settimeout` as a socket's. (No `makefile`: a file's reads block.) Use it in `async with`:
    leaving normally releases it, leaving by an exception (cancellation included) discards it. A
    task cancelled in the middle of an exchange discards the lease: its connection is closed,
    never handed on."""

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
        self.backend_pid: int | None = None  # a postgres pool's backend, as its grant said (not lazy)
        self._lazy = lazy  # asked for with its first exchange, not on entering
        self._reading = False  # a read's exchange is under way (everything written before it went with it)
        # Sends beside it not yet answered, in the order sent: each answer's future, and its bytes.
        self._beside: dict[asyncio.Future[dict[str, Any]], bytes] = {}
        self.crossed = b""  # sent beside the read whose answer ended the lease: the next lease's to send

    async def __aenter__(self) -> AsyncLease:
        if not self._lazy and self._token is None and not self._done:
            message = lease_request(self.pool, self._acquire_timeout, self._channel.pid, HOSTNAME, self.tag)
            reply = check_reply(await self._channel.call(message, self._acquire_timeout + self._broker_timeout))
            self._token = reply["lease"]
            self.backend_pid = reply.get("backend_pid")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            await self.release()
        else:
            self.discard()

    def sendall(self, data: bytes) -> None:
        """Hold `data`: it goes with the next read (or flush, or release). While another task's
        read is under way it goes now, beside that read, as a socket is written while read."""
        if self._reading and not self._held and not self._done and data:
            self._send_beside(data)
        else:
            self._hold(data)

    def send(self, data: bytes) -> int:
        """As sendall (a lease takes every byte): returns len(data)."""
        self.sendall(data)
        return len(data)

    def _send_beside(self, data: bytes) -> None:
        self._check_usable()
        assert self._token is not None  # (a read under way on a lazy lease was granted already)
        template = next_exchange(self._channel, (self.io_timeout, None, None, None, None, False, None), True)
        for start in range(0, len(data), HOLD_WRITES_UP_TO):
            chunk = data[start : start + HOLD_WRITES_UP_TO]
            answer = self._channel.send_now(template, (self._token, chunk))
            self._beside[answer] = chunk
            answer.add_done_callback(self._beside_answered)

    def _beside_answered(self, answer: asyncio.Future[dict[str, Any]]) -> None:
        if self._beside.pop(answer, None) is None:
            return  # (crossed, or the lease was ended: nothing more to do)
        if answer.cancelled() or answer.result().get("ok") is True:
            return
        # Not sent, and the read under way waits for its answer: the stream is broken. Ending
        # the lease ends that read too (its connection is closed).
        self.discard()

    async def _beside_settled(self) -> None:
        """Every send beside the last read answered: the next exchange can't find one still running."""
        wait = self.io_timeout + self._broker_timeout  # (a send beside a read is answered at once)
        while self._beside:
            done, _ = await asyncio.wait([next(reversed(self._beside))], timeout=wait)
            if not done:
                self.discard()
                raise BrokerUnavailable(f"no answer from the broker at {self._channel.endpoint} within {wait:.1f}s")

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

    async def recv_into(self, buffer: Any, nbytes: int = 0) -> int:
        """Read at least 1 and at most `nbytes` (or len(buffer)) bytes into `buffer`; 0 at end of stream."""
        view = memoryview(buffer).cast("B")
        data = await self.recv(nbytes or len(view))
        view[: len(data)] = data
        return len(data)

    async def recv_ready(self, count: int) -> bytes:
        """PostgreSQL: the server's messages up to and including the `count`-th ReadyForQuery (see
        the sync Lease's): under settimeout(None) in io_timeout rounds, a lazy lease's first short."""
        if self._timeout is None:
            while True:
                first_wait = FIRST_POLL if self._token is None else None
                data = await self._io(poll=True, ready=count, io_timeout=first_wait)
                if data or self.eof:
                    return data
        return await self._io(ready=count)

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
        ready: int | None = None,
    ) -> bytes:
        if self._beside:
            await self._beside_settled()
        if self._hold(send or b""):  # (past a chunk, the chunks go first)
            await self._send_held(keep_tail=True)
        send = None  # (held: it goes first, with this exchange)
        template, values, wait, token = self._prepare(send, until, exactly, max_bytes, release, poll, io_timeout, ready)
        self._reading = reads(until, exactly, max_bytes, ready) and token is not None
        try:
            reply = await self._channel.call_packed(template, values, wait)
        except (asyncio.CancelledError, BrokerUnavailable):
            # Cut short: the exchange may still be running, the connection's state is unknown. A
            # granted lease is discarded now; a lazy one's grant, if it comes, the channel discards.
            self.discard()
            raise
        finally:
            self._reading = False
        data = self._conclude(reply, token)
        if self._done and self._beside:
            # The answer ended the lease (when_done) while sends beside it were on their way: the
            # broker refuses them (lease_lost), unsent. They open the next lease's conversation.
            self.crossed = b"".join(self._beside.values())
            self._forget_beside()
        return data

    async def release(self) -> None:
        """Give the connection back (closed instead if not clean). Held writes go with it, in a
        round trip that raises if sending them fails; else it is one-way."""
        if self._beside:
            await self._beside_settled()
        if self._held and not self._done:
            await self._io(release=RELEASE_KEEP)
            return
        self._end(RELEASE_KEEP)

    def discard(self) -> None:
        """End the lease and close the connection; held writes are dropped."""
        self._end(RELEASE_DISCARD)

    async def shutdown(self, how: int = socket.SHUT_RDWR) -> None:
        """Send what is held; the connection is discarded on aclose (its state is unusual now)."""
        if not self._done:
            await self.flush()
        self._shut = True

    async def aclose(self) -> None:
        """As the sync Lease's close: give the connection back (discarded after shutdown()). Idempotent."""
        if self._shut:
            self.discard()
        elif not self._done:
            await self.release()

    def _forget_beside(self) -> None:
        beside = list(self._beside)
        self._beside.clear()
        for answer in beside:
            answer.cancel()  # (its answer, if it comes, finds nobody)

    def _end(self, mode: str) -> None:
        self._forget_beside()
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
        self._lenders: dict[asyncio.AbstractEventLoop, AsyncLender] = {}
        self._closed = False
        self._finalizer: weakref.finalize[Any, Any] | None = None  # closes the sockets and context

    def __repr__(self) -> str:
        return f"<AsyncClient {self.endpoint}>"

    def _this_loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, whose sockets (its channel, its lending connection) this client keeps;
        BrokerUnavailable once closed, and a forked child's own sockets from its first call on."""
        if self._closed:
            raise BrokerUnavailable("this AsyncClient is closed")
        if self._pid != os.getpid():
            self._forget_parent()
        return asyncio.get_running_loop()

    def _channel(self) -> AsyncChannel:
        loop = self._this_loop()
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
        self._lenders = {}  # (their sockets' copies here are closed after fork: _lending)
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
        socket: bool = False,
    ) -> Any:
        """`async with c.lease(pool) as conn:` leases on entering (or, `lazy`, with the first
        exchange), releases on leaving normally and discards on an exception. `socket=True`: the
        upstream socket itself, non-blocking (a SocketLease; see Client.lease)."""
        if socket:
            return AsyncSocketLeasing(self, pool, self.timeout if timeout is None else timeout, tag)
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

    async def cancel(self, lease: AsyncLease) -> bool:
        """PostgreSQL: ask the server to cancel what `lease`'s backend is running now (see
        Client.cancel); any task may, while another waits on the lease. False if it holds none."""
        token = lease.token
        if token is None:
            return False
        await self._ask(cancel_request(token))
        return True

    # -- administration, as Client's: NotAuthorized unless this client may administer --------------

    async def pause_pool(self, pool: str) -> None:
        """The pool hands nothing out until resumed: lease requests wait (with their timeouts)."""
        await self._admin(ADMIN_PAUSE, pool=pool)

    async def resume_pool(self, pool: str) -> None:
        await self._admin(ADMIN_RESUME, pool=pool)

    async def resize_pool(self, pool: str, max_size: int) -> None:
        """A new max_size, live: lowered, the excess connections close as they come back."""
        await self._admin(ADMIN_RESIZE, pool=pool, max_size=max_size)

    async def drain_pool(self, pool: str) -> None:
        """Close the pool's idle connections now and the others as they come back."""
        await self._admin(ADMIN_DRAIN, pool=pool)

    async def reload_broker(self) -> dict[str, list[str]]:
        """Reread the broker's config file, as SIGHUP does (see Client.reload_broker)."""
        reply = await self._admin(ADMIN_RELOAD)
        return {key: reply.get(key, []) for key in ("added", "removed", "changed")}

    async def shutdown_broker(self) -> None:
        """Ask the broker to shut down as SIGTERM does."""
        await self._admin(ADMIN_SHUTDOWN)

    async def _admin(self, action: str, **fields: Any) -> dict[str, Any]:
        return await self._ask(admin_request(action, **fields))

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
        lenders, self._lenders = self._lenders, {}
        for lender in lenders.values():
            lender.close()
        if self._ctx is not None and self._pid == os.getpid():
            await asyncio.to_thread(self._ctx.term)  # (it waits for the sockets' linger: not in the loop)
        self._ctx = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
