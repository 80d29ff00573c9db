"""Socket leases for asyncio (see _lending.py): one lending connection per event loop, shared by
its tasks (each request carries an id; one reader callback hands each answer to its task). A task
cancelled while it waits for a grant leaks nothing: the grant, when it comes, is given back."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
from types import TracebackType
from typing import TYPE_CHECKING, Any

import msgpack

from poolbroker.client._channel import HOSTNAME, check_reply
from poolbroker.client._errors import BrokerUnavailable, NotLent
from poolbroker.client._lending import _FD_SPACE, MAX_PACKET, SocketLease, _descriptor
from poolbroker.wire.endpoint import lending_path
from poolbroker.wire.protocol import VERSION, lease_request, release_request

if TYPE_CHECKING:
    from poolbroker.client._aio import AsyncClient


class AsyncLender:
    """A lending connection driven by an event loop."""

    def __init__(self, endpoint: str, loop: asyncio.AbstractEventLoop) -> None:
        path = lending_path(endpoint)
        if path is None:
            raise NotLent(f"{endpoint} is not an ipc endpoint: a socket can be lent on the broker's host only")
        self.path = path
        self.loop = loop
        self.pid = os.getpid()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.setblocking(False)
        self._ids = itertools.count(1)
        self._packer = msgpack.Packer(use_bin_type=True)
        self._waiting: dict[int, asyncio.Future[tuple[dict[str, Any], int | None]]] = {}
        self._connected = False
        self._failed: Exception | None = None

    async def _connect(self) -> None:
        try:
            self.sock.connect(self.path)  # (a Unix socket connects at once, or is refused)
        except FileNotFoundError:
            raise NotLent(f"no lending socket at {self.path}: this broker lends no pool's sockets") from None
        except OSError as exc:
            raise BrokerUnavailable(f"can't reach the lending socket {self.path}: {exc}") from None
        self.loop.add_reader(self.sock.fileno(), self._on_readable)
        self._connected = True

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
        if not self._connected:
            await self._connect()
        if self._failed is not None:
            raise self._failed
        rid = next(self._ids)
        waiter = self._waiting[rid] = self.loop.create_future()
        try:
            self.sock.send(self._packer.pack({"v": VERSION, "id": rid, **message}))
            return await asyncio.wait_for(waiter, wait)
        except TimeoutError:
            raise BrokerUnavailable(f"no answer on the lending socket within {wait:.1f}s") from None
        except OSError as exc:
            raise BrokerUnavailable(f"the lending connection failed: {exc}") from None
        finally:
            self._waiting.pop(rid, None)

    def tell(self, message: dict[str, Any]) -> None:
        try:
            self.sock.send(self._packer.pack({"v": VERSION, "id": next(self._ids), "noreply": True, **message}))
        except OSError as exc:
            raise BrokerUnavailable(f"the lending connection failed: {exc}") from None

    def _give_back(self, reply: dict[str, Any], fd: int | None) -> None:
        if fd is not None:
            os.close(fd)
        if reply.get("lease") is not None:
            self.tell(release_request(reply["lease"]))

    def close(self) -> None:
        if self._connected and self._failed is None and not self.loop.is_closed():
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


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
        if client._closed:
            raise BrokerUnavailable("this AsyncClient is closed")
        if client._pid != os.getpid():
            client._forget_parent()
        loop = asyncio.get_running_loop()
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
        self.lease = SocketLease(lender, self.pool, reply["lease"], fd, 0.0, reply.get("backend_pid"))
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
