"""poolbroker's client: lease connections from a broker shared by every worker process."""

from client.client import Client, Lease
from client.endpoint import default_endpoint
from client.errors import (
    BrokerUnavailable,
    LeaseLost,
    LimitExceeded,
    NotAuthorized,
    PoolBrokerError,
    PoolFull,
    PoolTimeout,
    ProtocolError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)

__all__ = [
    "BrokerUnavailable",
    "Client",
    "Lease",
    "LeaseLost",
    "LimitExceeded",
    "NotAuthorized",
    "PoolBrokerError",
    "PoolFull",
    "PoolTimeout",
    "ProtocolError",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "default_endpoint",
]
