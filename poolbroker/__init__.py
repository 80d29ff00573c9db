"""poolbroker: one bounded pool of upstream TCP connections, shared by every worker process.

    from poolbroker import Client

    c = Client()                        # $POOLBROKER_ENDPOINT, else the broker's default ipc
    c.request("redis", b"INCR hits\r\n", until=b"\r\n")

    async with AsyncClient() as ac:     # asyncio: every task of the loop shares one socket
        await ac.request("redis", b"INCR hits\r\n", until=b"\r\n")

The service is `poolbroker serve` (or `python -m poolbroker serve`). The client is in
`poolbroker.client`, the broker in `poolbroker.broker`; the adapters are named after their
library: `poolbroker.redis` (redis-py), `poolbroker.http` (http.client).
"""

from poolbroker.client import (
    AsyncClient,
    AsyncLease,
    BrokerUnavailable,
    Client,
    Lease,
    LeaseLost,
    LeaseScope,
    LimitExceeded,
    NotAuthorized,
    NotLent,
    PoolBrokerError,
    PoolFull,
    PoolMismatch,
    PoolTimeout,
    ProtocolError,
    SocketLease,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    default_endpoint,
)
from poolbroker.wire.version import VERSION as __version__

__all__ = [
    "AsyncClient",
    "AsyncLease",
    "BrokerUnavailable",
    "Client",
    "Lease",
    "LeaseLost",
    "LeaseScope",
    "LimitExceeded",
    "NotAuthorized",
    "NotLent",
    "PoolBrokerError",
    "PoolFull",
    "PoolMismatch",
    "PoolTimeout",
    "ProtocolError",
    "SocketLease",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "__version__",
    "default_endpoint",
]
