"""redis-py over leases: `redis.Redis(connection_pool=BrokerConnectionPool(client, "redis"))`.

Each command, and each pipeline (MULTI/EXEC included), runs under one lease: redis-py takes a
connection from this pool for it and gives it back after, and this pool turns that into a lease
and its release. The broker's pool is the one bound across every process; this one only hands out
wrappers. AUTH and SELECT belong in the broker's `on_connect` for the pool (done once per upstream
connection), not here. Pub/sub and blocking commands that hold a connection for long are not what
leases are for.
"""

from __future__ import annotations

import inspect
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.connection import AbstractConnection, Connection
from redis.retry import Retry

from client.client import Client, Lease


class LeaseConnection(Connection):
    """A redis-py connection whose socket is a lease; connect() leases, the pool's release gives it back."""

    def __init__(self, *, broker: Client, pool: str, tag: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self.broker = broker
        self.pool_name = pool
        self.tag = tag

    def _connect(self) -> Lease:
        lease = self.broker.lease(self.pool_name, tag=self.tag)
        if self.socket_timeout is not None:
            lease.settimeout(self.socket_timeout)
        return lease

    def can_read(self, timeout: float = 0) -> bool:
        # A new lease has nothing unread (the broker hands out only clean connections), and one is
        # held only for one command or pipeline, so there is never anything to peek at.
        return False

    def give_back(self) -> None:
        """The command or pipeline is done: release the lease (kept by the broker if clean), then
        let redis-py forget the socket (closing a released lease does nothing)."""
        if self._sock is not None:
            self._sock.release()
        self.disconnect()  # type: ignore[no-untyped-call]

    def repr_pieces(self) -> list[tuple[str, Any]]:
        return [("pool", self.pool_name), ("broker", self.broker.endpoint)]


class BrokerConnectionPool(redis.ConnectionPool):
    """A redis-py connection pool that leases from the broker's `pool` for every command or pipeline."""

    def __init__(self, broker: Client, pool: str = "redis", *, tag: str | None = None, **kwargs: Any) -> None:
        # Session state belongs to the broker's pool, not to one lease: a password or db given here
        # would have to be sent on every lease, and would change the connection for its next holder.
        for key in ("username", "password", "db", "client_name", "credential_provider"):
            if kwargs.get(key):
                raise ValueError(f"{key}: set it up in the broker's on_connect for the pool, not per lease")
        # Nothing to send when a lease starts: no CLIENT SETINFO (redis-py >= 8 reads driver_info,
        # earlier versions lib_name and lib_version), no AUTH or SELECT (below), no HELLO (RESP2).
        if "driver_info" in inspect.signature(AbstractConnection.__init__).parameters:
            kwargs.setdefault("driver_info", None)
        else:
            kwargs.setdefault("lib_name", None)
            kwargs.setdefault("lib_version", None)
        # RESP2, which needs no HELLO per lease (HELLO 3 would switch the connection for its next holder).
        if kwargs.setdefault("protocol", 2) not in (2, "2"):
            raise ValueError(
                "leased connections speak RESP2 (protocol=2): HELLO 3 would change them for their next holder"
            )
        # A lease request already waits its acquire timeout, and the broker retries connects itself:
        # redis-py's own retries would only multiply the wait.
        kwargs.setdefault("retry", Retry(NoBackoff(), 0))
        super().__init__(connection_class=LeaseConnection, broker=broker, pool=pool, tag=tag, **kwargs)

    def release(self, connection: Any) -> None:
        if isinstance(connection, LeaseConnection):
            connection.give_back()
        super().release(connection)
