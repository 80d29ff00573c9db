"""redis.asyncio over leases: `redis.asyncio.Redis(connection_pool=AsyncBrokerConnectionPool(c, "redis"))`
with `c` a poolbroker AsyncClient. The async twin of poolbroker.redis.

Each command, and each pipeline (MULTI/EXEC included), runs on a lease of its own. Where the pool
lends its sockets (the broker's host), that is a socket lease: the command goes straight to Redis
on the upstream socket itself, followed by poolbroker.sessions' Redis tracker, and the socket goes
back with its verdict when redis.asyncio gives the connection back (`lend=False`: the relay).
Through the relay, the lease is asked for with the command (lazy) and ended by the reply that
finishes it (when_done, in a `protocol = "redis"` pool), or when redis.asyncio gives the
connection back: one message and its answer per command.
redis.asyncio's connections stay "connected" (no connect, handshake or teardown per command); what
they read and write goes through asyncio's own StreamReader and StreamWriter over a transport of
leases (open_lease_streams), in place of asyncio.open_connection's. The options, and what cannot
be set here (a password, a db), and RESP3 (a pool with resp = 3), are those of poolbroker.redis.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis._parsers import _AsyncRESP2Parser, _AsyncRESP3Parser
from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection, Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from poolbroker.client import AsyncClient, UpstreamError, UpstreamTimeout
from poolbroker.client.extension import AsyncConversations, AsyncLentConversations, described_async, lends
from poolbroker.redis import lease_connection_options, settle_resp
from poolbroker.sessions.redis import RedisSession

__all__ = ["AsyncBrokerConnectionPool", "LeaseStreamReader", "LeaseTransport", "open_lease_streams"]


class LeaseStreamReader(asyncio.StreamReader):
    """asyncio's own StreamReader, so redis.asyncio has every method and attribute it may use
    (readline, readuntil, readexactly, read, at_eof, exception, iteration, the `_buffer` its parser
    looks into), fed from the conversation's lease instead of a socket's transport."""

    def __init__(self, conversations: AsyncConversations | AsyncLentConversations) -> None:
        super().__init__()
        self._conversations = conversations
        self._waiting = False  # a read is waiting for data
        self._filling: asyncio.Future[None] | None = None  # the round trip bringing it

    def unread(self) -> int:
        """How many bytes the stream holds that nobody has read yet."""
        return len(self._buffer)  # type: ignore[attr-defined]  # (asyncio's, not in typeshed)

    @property
    def filling(self) -> bool:
        """A round trip a reader gave up on is still under way: more bytes may come."""
        return self._filling is not None

    async def _wait_for_data(self, func_name: str) -> None:
        # Every read of asyncio's StreamReader comes here when its buffer holds too little: where
        # a transport would feed it, a round trip on the lease does (sending the held writes). A
        # read that gives up (a timeout, get_message(timeout=0), a cancelled task) leaves that
        # round trip running, as a socket goes on receiving: what it brings waits in the buffer
        # for the next read, and the lease is not cut mid-exchange.
        if self._waiting:  # (as asyncio's own guard: two readers would interleave their bytes)
            raise RuntimeError(f"{func_name}() called while another coroutine is already waiting for incoming data")
        if self._filling is None:
            self._filling = asyncio.ensure_future(self._fill())
            self._filling.add_done_callback(_retrieve)
        self._waiting = True
        try:
            await asyncio.shield(self._filling)
        finally:
            self._waiting = False

    async def _fill(self) -> None:
        try:
            lease = self._conversations.current()
            while True:
                try:
                    data = await lease.recv()
                    break
                except UpstreamTimeout:
                    # A socket's stream has no deadline of its own: its readers bring theirs
                    # (redis.asyncio's socket_timeout, or none for a blocking pub/sub read). A
                    # round trip that ends empty while a reader still waits is followed by another.
                    if not self._waiting:
                        raise  # (nobody waits: the next read starts the next round trip)
                except UpstreamError as exc:
                    self.set_exception(ConnectionResetError(str(exc)))  # what a lost transport reports
                    raise
            if data:
                self.feed_data(data)
            elif lease.eof:
                self.feed_eof()
        finally:
            self._filling = None

    def stop(self) -> None:
        """The stream is closed: a round trip under way is cut (its lease is discarded)."""
        if self._filling is not None:
            self._filling.cancel()


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # (its reader was told, or had gone: nothing more to report)


class LeaseTransport(asyncio.Transport):
    """The transport under a lease stream: writes are held by the conversation's lease and go
    with its next read; closing discards the lease (redis.asyncio closes after an error, when the
    state is unknown). There is no socket to tune: get_extra_info("socket") is None."""

    def __init__(
        self,
        conversations: AsyncConversations | AsyncLentConversations,
        protocol: asyncio.StreamReaderProtocol,
        reader: LeaseStreamReader,
    ) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._conversations = conversations
        self._reader = reader
        self._protocol = protocol
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            raise ConnectionResetError("the lease stream is closed")
        self._conversations.current().sendall(bytes(data))

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._loop.is_closed():
            return  # (collected after its loop ended: the broker reclaims what the closed socket held)
        self._reader.stop()
        self._conversations.discard()
        # As a socket's transport: the protocol hears of it on the next turn of the loop.
        self._loop.call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def can_write_eof(self) -> bool:
        return False  # (a half-closed lease would be a connection no next holder could use)

    def get_write_buffer_size(self) -> int:
        return 0  # (held writes are the lease's; drain() never has to wait for them)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 0)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_reading(self) -> bool:
        return not self._closing

    def pause_reading(self) -> None:
        pass  # (nothing is read until the reader asks for it)

    def resume_reading(self) -> None:
        pass

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        raise NotImplementedError("a lease stream keeps its protocol")


def open_lease_streams(
    conversations: AsyncConversations | AsyncLentConversations,
) -> tuple[LeaseStreamReader, asyncio.StreamWriter]:
    """What asyncio.open_connection returns, over leases: asyncio's own StreamWriter and
    StreamReaderProtocol on a LeaseTransport, and a LeaseStreamReader."""
    loop = asyncio.get_running_loop()
    reader = LeaseStreamReader(conversations)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport = LeaseTransport(conversations, protocol, reader)
    protocol.connection_made(transport)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


class LeaseConnection(Connection):
    """A redis.asyncio connection whose streams go through leases of the broker's `pool`."""

    def __init__(
        self, *, broker: AsyncClient, pool: str, tag: str | None = None, lend: bool | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.broker = broker
        self.pool_name = pool
        self.tag = tag
        self.lend = lend
        self._conversations: AsyncConversations | AsyncLentConversations | None = None

    async def _connect(self) -> None:
        description = await described_async(self.broker, self.pool_name)
        settle_resp(self, description, self.pool_name, (_AsyncRESP2Parser, _AsyncRESP3Parser))
        if lends(self.broker, description, self.lend):  # (the upstream socket itself, same host)
            self._conversations = AsyncLentConversations(self.broker, self.pool_name, RedisSession, self.tag)
        else:
            self._conversations = AsyncConversations(self.broker, self.pool_name, self.tag, self.socket_timeout)
        self._reader, self._writer = open_lease_streams(self._conversations)

    async def give_back(self) -> None:
        """The command or pipeline is done: its lease goes back (nothing is sent if its reply
        ended it). Bytes of it still unread in a buffer, or a round trip still bringing some:
        disconnected instead, as redis.asyncio does with a connection returned before its reply
        was read."""
        conversations = self._conversations
        if conversations is None:
            return
        reader = self._reader
        if isinstance(reader, LeaseStreamReader) and (reader.unread() or reader.filling):
            conversations.discard()
            await self.disconnect()
        else:
            await conversations.give_back()

    def repr_pieces(self) -> list[tuple[str, Any]]:
        return [("pool", self.pool_name), ("broker", self.broker.endpoint)]


class AsyncBrokerConnectionPool(ConnectionPool):
    """A redis.asyncio connection pool that leases from the broker's `pool` for every command or
    pipeline (through an AsyncClient)."""

    def __init__(
        self,
        broker: AsyncClient,
        pool: str = "redis",
        *,
        tag: str | None = None,
        lend: bool | None = None,
        **kwargs: Any,
    ) -> None:
        """`lend`: as poolbroker.redis.BrokerConnectionPool's (None: socket leases wherever the pool lends)."""
        kwargs = lease_connection_options(kwargs, AbstractConnection, Retry(NoBackoff(), 0))
        super().__init__(connection_class=LeaseConnection, broker=broker, pool=pool, tag=tag, lend=lend, **kwargs)

    async def release(self, connection: Any) -> None:
        if isinstance(connection, LeaseConnection):
            await connection.give_back()
        await super().release(connection)
