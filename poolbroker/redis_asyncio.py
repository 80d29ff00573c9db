"""redis.asyncio over leases: `redis.asyncio.Redis(connection_pool=AsyncBrokerConnectionPool(c, "redis"))`
with `c` a poolbroker AsyncClient. The async twin of poolbroker.redis.

Each command, and each pipeline (MULTI/EXEC included), runs on a lease of its own, asked for with
the command (lazy) and ended by the reply that finishes it (when_done, in a `protocol = "redis"`
pool), or when redis.asyncio gives the connection back: one message and its answer per command.
redis.asyncio's connections stay "connected" (no connect, handshake or teardown per command); what
they read and write goes through a stream reader and writer over the lease, in place of
asyncio.open_connection's. The options, and what cannot be set here (a password, a db, RESP3), are
those of poolbroker.redis.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection, Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from poolbroker.client.aio import AsyncClient
from poolbroker.client.leased_socket import AsyncConversations
from poolbroker.redis import lease_connection_options

__all__ = ["AsyncBrokerConnectionPool", "LeaseStreamReader", "LeaseStreamWriter"]


class LeaseStreamReader:
    """What redis.asyncio reads from in place of asyncio's StreamReader (`readline`,
    `readexactly`, `read`, `at_eof`, and the `_buffer` its parser looks into)."""

    def __init__(self, conversations: AsyncConversations) -> None:
        self._conversations = conversations
        self._buffer = bytearray()
        self._eof = False

    async def _fill(self) -> None:
        lease = self._conversations.current()
        data = await lease.recv()
        if data:
            self._buffer += data
        elif lease.eof:
            self._eof = True

    def at_eof(self) -> bool:
        return self._eof and not self._buffer

    async def readline(self) -> bytes:
        while (end := self._buffer.find(b"\n")) < 0:
            if self._eof:
                return self._take(len(self._buffer))
            await self._fill()
        return self._take(end + 1)

    async def readexactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            if self._eof:
                raise asyncio.IncompleteReadError(self._take(len(self._buffer)), n)
            await self._fill()
        return self._take(n)

    async def read(self, n: int = -1) -> bytes:
        if not self._buffer and not self._eof:
            await self._fill()
        return self._take(len(self._buffer) if n < 0 else min(n, len(self._buffer)))

    def _take(self, n: int) -> bytes:
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data


class LeaseStreamWriter:
    """What redis.asyncio writes to in place of asyncio's StreamWriter: writes are held by the
    conversation's lease and go with its next read."""

    def __init__(self, conversations: AsyncConversations) -> None:
        self._conversations = conversations

    def write(self, data: bytes) -> None:
        self._conversations.current().sendall(bytes(data))

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    async def drain(self) -> None:
        pass  # (held until the read of the answer: one round trip for both)

    def close(self) -> None:
        self._conversations.discard()  # redis.asyncio closes after an error: the state is unknown

    async def wait_closed(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class LeaseConnection(Connection):
    """A redis.asyncio connection whose streams go through leases of the broker's `pool`."""

    def __init__(self, *, broker: AsyncClient, pool: str, tag: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.broker = broker
        self.pool_name = pool
        self.tag = tag
        self._conversations: AsyncConversations | None = None

    async def _connect(self) -> None:
        self._conversations = AsyncConversations(self.broker, self.pool_name, self.tag, self.socket_timeout)
        self._reader = LeaseStreamReader(self._conversations)  # type: ignore[assignment]
        self._writer = LeaseStreamWriter(self._conversations)  # type: ignore[assignment]

    async def give_back(self) -> None:
        """The command or pipeline is done: its lease goes back (nothing is sent if its reply
        ended it). Bytes of it still unread in a buffer: disconnected instead, as redis.asyncio
        does with a connection returned before its reply was read."""
        conversations = self._conversations
        if conversations is None:
            return
        reader = self._reader
        if isinstance(reader, LeaseStreamReader) and reader._buffer:
            conversations.discard()
            await self.disconnect()
        else:
            await conversations.give_back()

    def repr_pieces(self) -> list[tuple[str, Any]]:
        return [("pool", self.pool_name), ("broker", self.broker.endpoint)]


class AsyncBrokerConnectionPool(ConnectionPool):
    """A redis.asyncio connection pool that leases from the broker's `pool` for every command or
    pipeline (through an AsyncClient)."""

    def __init__(self, broker: AsyncClient, pool: str = "redis", *, tag: str | None = None, **kwargs: Any) -> None:
        kwargs = lease_connection_options(kwargs, AbstractConnection, Retry(NoBackoff(), 0))
        super().__init__(connection_class=LeaseConnection, broker=broker, pool=pool, tag=tag, **kwargs)

    async def release(self, connection: Any) -> None:
        if isinstance(connection, LeaseConnection):
            await connection.give_back()
        await super().release(connection)
