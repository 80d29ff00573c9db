"""poolbroker's client: lease connections from a broker shared by every worker process."""

from poolbroker.client._aio import AsyncClient, AsyncLease
from poolbroker.client._client import Client
from poolbroker.client._errors import (
    BrokerUnavailable,
    LeaseLost,
    LimitExceeded,
    NotAuthorized,
    NotLent,
    PoolBrokerError,
    PoolFull,
    PoolMismatch,
    PoolTimeout,
    ProtocolError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from poolbroker.client._lease import Lease
from poolbroker.client._lending import SocketLease
from poolbroker.client._scope import LeaseScope
from poolbroker.wire.endpoint import default_endpoint

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
    "default_endpoint",
]
