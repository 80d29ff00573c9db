"""poolbroker's client: lease connections from a broker shared by every worker process."""

from poolbroker.client.aio import AsyncClient, AsyncLease
from poolbroker.client.client import Client
from poolbroker.client.errors import (
    BrokerUnavailable,
    LeaseLost,
    LimitExceeded,
    NotAuthorized,
    PoolBrokerError,
    PoolFull,
    PoolMismatch,
    PoolTimeout,
    ProtocolError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from poolbroker.client.lease import Lease
from poolbroker.wire.endpoint import default_endpoint

__all__ = [
    "AsyncClient",
    "AsyncLease",
    "BrokerUnavailable",
    "Client",
    "Lease",
    "LeaseLost",
    "LimitExceeded",
    "NotAuthorized",
    "PoolBrokerError",
    "PoolFull",
    "PoolMismatch",
    "PoolTimeout",
    "ProtocolError",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "default_endpoint",
]
