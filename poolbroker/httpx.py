"""httpx over leases, sync and async, on httpcore's network backend interface.

    import httpx
    from poolbroker import AsyncClient, Client
    from poolbroker.httpx import AsyncPoolBrokerTransport, PoolBrokerTransport

    api = httpx.Client(transport=PoolBrokerTransport(Client(), "api"), base_url="http://api.internal")
    api.get("/health")
    async with httpx.AsyncClient(transport=AsyncPoolBrokerTransport(AsyncClient(), "api")) as api:
        await api.get("http://api.internal/health")

The transports are httpx's own (HTTPTransport, AsyncHTTPTransport: its limits, retries and error
mapping), over a network backend whose "TCP connections" are streams of leases of the broker's
`pool`: every request goes to the pool's upstream, whatever the URL's host (which still goes in
the Host header). Each request runs on a lease of its own, asked for with the request's bytes and
ended by the end of its response, which the broker sees in an `http` pool. It must be one: on
another pool the first request raises PoolMismatch (a connection httpx keeps alive would keep its
lease, and a crowd larger than the pool would wait for it until a pool timeout). TLS is the
pool's (`tls = true`): an `https://` URL is spoken in plain HTTP to the lease, so `verify` and
`cert` do not apply. HTTP/1.1 only. Where the pool lends its sockets (the broker's host, no TLS),
each request runs on a socket lease instead, given back at its response's end (h11 follows the
stream here); `lend=False` keeps the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import httpcore
import httpx

from poolbroker.client import AsyncClient, Client, PoolBrokerError, PoolTimeout, UpstreamTimeout
from poolbroker.client.extension import (
    AsyncConversations,
    AsyncLentConversations,
    LeasedSocket,
    LentSocket,
    described,
    described_async,
    lends,
    require,
)
from poolbroker.sessions.http import HttpSession

__all__ = ["AsyncPoolBrokerTransport", "PoolBrokerTransport"]

# Why a pool must speak http: the broker then ends each lease at its response's end.
NEEDS_HTTP = "so that each response's end ends its lease: a connection httpx keeps alive would hold one"


def _require_http(description: dict[str, Any] | None, pool: str) -> None:
    require(description, pool, "http", "poolbroker.httpx", NEEDS_HTTP)


@contextlib.contextmanager
def _as_httpcore_errors(reading: bool) -> Iterator[None]:
    """The broker's errors as httpcore's, which httpx turns into its own (httpx.PoolTimeout...)."""
    try:
        yield
    except PoolTimeout as exc:
        raise httpcore.PoolTimeout(str(exc)) from exc
    except UpstreamTimeout as exc:
        raise (httpcore.ReadTimeout if reading else httpcore.WriteTimeout)(str(exc)) from exc
    except PoolBrokerError as exc:
        raise (httpcore.ReadError if reading else httpcore.WriteError)(str(exc)) from exc
    except TimeoutError as exc:  # (a lent socket's own)
        raise (httpcore.ReadTimeout if reading else httpcore.WriteTimeout)(str(exc)) from exc
    except OSError as exc:
        raise (httpcore.ReadError if reading else httpcore.WriteError)(str(exc)) from exc


class LeaseStream(httpcore.NetworkStream):
    """What httpcore takes for a TCP connection: a LeasedSocket (a lease per request), or where the
    pool lends, a LentSocket (a socket lease per request, given back at its response's end)."""

    def __init__(self, broker: Client, pool: str, tag: str | None, lend: bool) -> None:
        self._socket: LeasedSocket | LentSocket
        if lend:
            self._socket = LentSocket(broker, pool, HttpSession, tag, when_done=True)
        else:
            self._socket = LeasedSocket(broker, pool, tag)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with _as_httpcore_errors(reading=True):
            self._socket.settimeout(timeout)
            return self._socket.recv(max_bytes)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        with _as_httpcore_errors(reading=False):
            self._socket.sendall(buffer)  # (held: it goes with the read of its response)

    def close(self) -> None:
        self._socket.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None) -> Any:
        return self  # TLS is the broker pool's: the lease speaks plain HTTP

    def get_extra_info(self, info: str) -> Any:
        return False if info == "is_readable" else None  # (the broker hands out only open connections)


class LeaseBackend(httpcore.NetworkBackend):
    def __init__(self, broker: Client, pool: str, tag: str | None, lend: bool | None) -> None:
        self.broker, self.pool, self.tag, self.lend = broker, pool, tag, lend

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> LeaseStream:
        description = described(self.broker, self.pool)
        _require_http(description, self.pool)
        return LeaseStream(self.broker, self.pool, self.tag, lends(self.broker, description, self.lend))

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> LeaseStream:
        return self.connect_tcp(path, 0)


class AsyncLeaseStream(httpcore.AsyncNetworkStream):
    """The async twin of LeaseStream: each request on an AsyncLease of its own (a socket lease
    where the pool lends)."""

    def __init__(self, broker: AsyncClient, pool: str, tag: str | None, lend: bool) -> None:
        self._conversations: AsyncConversations | AsyncLentConversations
        if lend:
            self._conversations = AsyncLentConversations(broker, pool, HttpSession, tag, when_done=True)
        else:
            self._conversations = AsyncConversations(broker, pool, tag)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with _as_httpcore_errors(reading=True):
            conversations = self._conversations
            if isinstance(conversations, AsyncLentConversations):
                async with asyncio.timeout(timeout):
                    return await conversations.recv(max_bytes)
            lease = conversations.current()
            lease.settimeout(timeout)
            return await lease.recv(max_bytes)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        with _as_httpcore_errors(reading=False):
            self._conversations.current().sendall(buffer)

    async def aclose(self) -> None:
        await self._conversations.give_back()

    async def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> Any:
        return self  # TLS is the broker pool's

    def get_extra_info(self, info: str) -> Any:
        return False if info == "is_readable" else None


class AsyncLeaseBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, broker: AsyncClient, pool: str, tag: str | None, lend: bool | None) -> None:
        self.broker, self.pool, self.tag, self.lend = broker, pool, tag, lend

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> AsyncLeaseStream:
        description = await described_async(self.broker, self.pool)
        _require_http(description, self.pool)
        return AsyncLeaseStream(self.broker, self.pool, self.tag, lends(self.broker, description, self.lend))

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> AsyncLeaseStream:
        return await self.connect_tcp(path, 0)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def _pool_options(limits: httpx.Limits, retries: int) -> dict[str, Any]:
    return {
        "max_connections": limits.max_connections,
        "max_keepalive_connections": limits.max_keepalive_connections,
        "keepalive_expiry": limits.keepalive_expiry,
        "retries": retries,
        "http1": True,
        "http2": False,
    }


class PoolBrokerTransport(httpx.HTTPTransport):
    """httpx's HTTPTransport, its connections leases of the broker's `pool`. `lend`: socket leases
    (True) or the relay (False); None: socket leases wherever the pool lends them."""

    def __init__(
        self,
        broker: Client,
        pool: str,
        *,
        tag: str | None = None,
        lend: bool | None = None,
        limits: httpx.Limits = httpx.Limits(),  # noqa: B008 (httpx's own default, immutable)
        retries: int = 0,
    ) -> None:
        super().__init__(limits=limits, retries=retries)
        self._pool = httpcore.ConnectionPool(
            network_backend=LeaseBackend(broker, pool, tag, lend), **_pool_options(limits, retries)
        )


class AsyncPoolBrokerTransport(httpx.AsyncHTTPTransport):
    """httpx's AsyncHTTPTransport, its connections AsyncLeases of the broker's `pool` (`lend` as
    PoolBrokerTransport's)."""

    def __init__(
        self,
        broker: AsyncClient,
        pool: str,
        *,
        tag: str | None = None,
        lend: bool | None = None,
        limits: httpx.Limits = httpx.Limits(),  # noqa: B008
        retries: int = 0,
    ) -> None:
        super().__init__(limits=limits, retries=retries)
        backend = AsyncLeaseBackend(broker, pool, tag, lend)
        self._pool = httpcore.AsyncConnectionPool(network_backend=backend, **_pool_options(limits, retries))
