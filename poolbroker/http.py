"""http.client over leases: the standard library's HTTP client, pooled by the broker.

    from poolbroker.client import Client
    from poolbroker.http import HTTPConnection

    conn = HTTPConnection(Client(), "api", host="api.internal")
    conn.request("GET", "/health")
    response = conn.getresponse()

Each time http.client would open a socket it leases a connection from `pool` instead (the pool's
upstream is the HTTP server); `close()` gives it back. A keep-alive response leaves the lease held
for the next request; `Connection: close` ends it.
"""

from __future__ import annotations

import http.client
import socket
from typing import Any

from poolbroker.client import Client


class HTTPConnection(http.client.HTTPConnection):
    """http.client.HTTPConnection whose connection is a lease from a pool. `host` is what the
    Host header says; where to connect is the pool's business."""

    def __init__(
        self, broker: Client, pool: str, host: str = "localhost", *, tag: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(host, **kwargs)
        self.broker = broker
        self.pool = pool
        self.tag = tag

    def connect(self) -> None:
        # Lazy: the lease request goes with the first request's bytes (one round trip, not two).
        lease = self.broker.lease(self.pool, tag=self.tag, lazy=True)
        if self.timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
            lease.settimeout(self.timeout)
        self.sock = lease
