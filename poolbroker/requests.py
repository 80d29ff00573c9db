"""requests over leases: a transport adapter whose connections are the broker pool's.

    import requests
    from poolbroker import Client
    from poolbroker.requests import PoolBrokerAdapter

    session = requests.Session()
    session.mount("http://api.internal/", PoolBrokerAdapter(Client(), "api"))
    session.get("http://api.internal/health")

Every request under the mounted prefix goes to the pool's upstream, whatever the URL's host says
(the host still goes in the Host header), and with the pool's TLS: an `https://` URL is spoken in
plain HTTP to the lease and the broker encrypts when the pool says `tls = true`, so certificates
are the pool's settings, not requests' `verify` or `cert`. The adapter keeps requests' and
urllib3's own machinery (retries, streaming, timeouts, cookies); under it each connection urllib3
keeps is a LeasedSocket: each request runs on a lease of its own, asked for with the request's
bytes and ended by the end of its response (in an `http` pool the broker sees it), or when urllib3
takes the connection back. An idle Session holds no upstream connection. Where the pool lends its
sockets (the broker's host, no TLS), each request runs on a socket lease instead (a LentSocket:
urllib3 writes to and reads from the upstream socket itself, the stream followed by h11 to give it
back at the response's end); `lend=False` keeps the relay.
"""

from __future__ import annotations

from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.util import parse_url

from poolbroker.client import Client
from poolbroker.client.extension import LeasedSocket, LentSocket, described, lends
from poolbroker.sessions.http import HttpSession

__all__ = ["PoolBrokerAdapter"]


class LeaseHTTPConnection(HTTPConnection):
    """urllib3's HTTPConnection, connected to a LeasedSocket (or a LentSocket) instead of the network."""

    def __init__(
        self, *args: Any, broker: Client, lease_pool: str, tag: str | None, lend: bool | None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.broker = broker
        self.lease_pool = lease_pool
        self.tag = tag
        self.lend = lend

    def _new_conn(self) -> Any:
        timeout = self.timeout if isinstance(self.timeout, int | float) else None
        if lends(self.broker, described(self.broker, self.lease_pool), self.lend):
            return LentSocket(self.broker, self.lease_pool, HttpSession, self.tag, timeout, when_done=True)
        return LeasedSocket(self.broker, self.lease_pool, self.tag, timeout)

    @property
    def is_connected(self) -> bool:
        # (urllib3 asks the socket's fd whether the peer closed: a leased socket has none, and
        # the broker hands out only connections it knows to be open)
        return self.sock is not None


class LeaseConnectionPool(HTTPConnectionPool):
    """urllib3's pool of LeaseHTTPConnections: a connection it takes back gives its lease back."""

    ConnectionCls = LeaseHTTPConnection

    def _put_conn(self, conn: Any) -> None:
        if conn is not None and isinstance(conn.sock, (LeasedSocket, LentSocket)):
            conn.sock.give_back()
        super()._put_conn(conn)


class PoolBrokerAdapter(HTTPAdapter):
    """A requests transport adapter sending every request through a lease of the broker's `pool`
    (an `http` pool, so that each response's end ends its lease). `pool_maxsize` bounds the
    connections urllib3 keeps per host in this process; the broker's `max_size` bounds them all.
    `lend`: socket leases (True) or the relay (False); None: socket leases wherever the pool lends."""

    def __init__(
        self, broker: Client, pool: str, *, tag: str | None = None, lend: bool | None = None, **kwargs: Any
    ) -> None:
        self.broker = broker
        self.pool = pool
        self.tag = tag
        self.lend = lend
        self._pools: dict[tuple[str, int | None], LeaseConnectionPool] = {}
        super().__init__(**kwargs)

    def get_connection_with_tls_context(
        self, request: Any, verify: Any, proxies: Any = None, cert: Any = None
    ) -> LeaseConnectionPool:
        if proxies and proxies.get(request.url.split(":", 1)[0]):
            raise ValueError("poolbroker's adapter goes to its pool's upstream: proxies do not apply")
        url = parse_url(request.url)
        key = (url.host or "", url.port)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = LeaseConnectionPool(
                url.host or "",
                url.port,
                maxsize=self._pool_maxsize,
                block=self._pool_block,
                broker=self.broker,
                lease_pool=self.pool,
                tag=self.tag,
                lend=self.lend,
            )
        return pool

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        pass  # TLS is the broker pool's: the lease speaks plain HTTP

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        super().close()
