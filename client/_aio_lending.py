"""Socket leases for asyncio (see _lending.py): one lending connection per event loop, shared by
its tasks (each request carries an id; one reader callback hands each answer to its task). A task
cancelled while it waits for a grant leaks nothing: the grant, when it comes, is given back."""

from __future__ import annotations

import asyncio
import socket
from types import TracebackType
from typing import TYPE_CHECKING, Any

import msgpack

from poolbroker.client._channel import HOSTNAME, check_reply
from poolbroker.client._errors import BrokerUnavailable
from poolbroker.client._lending import _FD_SPACE, MAX_PACKET, LendingConnection, SocketLease, _descriptor
from poolbroker.wire.protocol import VERSION, lease_request

if TYPE_CHECKING:
    from poolbroker.client._aio import AsyncClient


class AsyncLender(LendingConnection):
    """A lending connection driven by an event loop: its replies read as they come."""

    def __init__(self, endpoint: str, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(endpoint)
        self.loop = loop
        self.sock.setblocking(False)
        self._waiting: dict[int, asyncio.Future[tuple[dict[str, Any], int | None]]] = {}
        self._failed: Exception | None = None
        loop.add_reader(self.sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(MAX_PACKET, _FD_SPACE, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(BrokerUnavailable(f"the lending connection failed: {exc}"))
                return
            if not data:
                self._fail(BrokerUnavailable("the broker closed its lending connection (it stopped?)"))
                return
            fd = _descriptor(ancillary)
            reply = msgpack.unpackb(data, raw=False)
            waiter = self._waiting.pop(reply.get("id"), None)
            if waiter is None or waiter.done():  # (its task gave up or was cancelled)
                self._give_back(reply, fd)
            else:
                waiter.set_result((reply, fd))

    def _fail(self, error: Exception) -> None:
        self._failed = error
        self.loop.remove_reader(self.sock.fileno())
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(error)
        self._waiting.clear()

    async def call(self, message: dict[str, Any], wait: float) -> tuple[dict[str, Any], int | None]:
        if self._failed is not None:
            raise self._failed
        rid = next(self._ids)
        waiter = self._waiting[rid] = self.loop.create_future()
        try:
            self.sock.send(self._packer.pack({"v": VERSION, "id": rid, **message}))
            async with asyncio.timeout(wait):
                reply, fd = await waiter
            return reply, fd
        except TimeoutError:
            raise BrokerUnavailable(f"no answer on the lending socket within {wait:.1f}s") from None
        except OSError as exc:
            raise BrokerUnavailable(f"the lending connection failed: {exc}") from None
        except asyncio.CancelledError:
            # Cancelled after its answer came, before this task ran again: the grant is given back.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._give_back(*waiter.result())
            raise
        finally:
            self._waiting.pop(rid, None)

    def close(self) -> None:
        if self._failed is None and not self.loop.is_closed():
            self.loop.remove_reader(self.sock.fileno())
        super().close()


class AsyncSocketLeasing:
    """`async with client.lease(pool, socket=True) as lease:` (or `lease = await ...`): a
    SocketLease whose socket is non-blocking, for the loop's own socket calls and streams."""

    def __init__(self, client: AsyncClient, pool: str, timeout: float, tag: str | None) -> None:
        self.client = client
        self.pool = pool
        self.timeout = timeout
        self.tag = tag
        self.lease: SocketLease | None = None

    def _lender(self) -> AsyncLender:
        """The client's lending connection for this event loop (made on first use)."""
        client = self.client
        loop = client._this_loop()
        lender = client._lenders.get(loop)
        if lender is None:
            lender = client._lenders[loop] = AsyncLender(client.endpoint, loop)
        return lender

    async def _lease(self) -> SocketLease:
        lender = self._lender()
        message = lease_request(self.pool, self.timeout, lender.pid, HOSTNAME, self.tag)
        reply, fd = await lender.call(message, self.timeout + self.client.broker_timeout)
        check_reply(reply)
        if fd is None:
            raise BrokerUnavailable("the broker's grant carried no socket")
        self.lease = SocketLease(lender, self.pool, reply["lease"], fd, 0.0, reply)
        return self.lease

    def __await__(self) -> Any:
        return self._lease().__await__()

    async def __aenter__(self) -> SocketLease:
        return await self._lease()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self.lease is not None
        self.lease.__exit__(exc_type, exc, tb)
