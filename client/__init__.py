"""poolbroker's client: lease connections from a broker shared by every worker process."""

from client.client import Client
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
from client.lease import Lease

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
