"""pymemcache over leases: `poolbroker.memcache.Client(broker, "cache")` is a pymemcache Client whose
every command runs on a lease of the broker's pool `cache` (whose upstream is memcached).

    from poolbroker import Client
    from poolbroker.memcache import Client as MemcacheClient

    cache = MemcacheClient(Client(), "cache")
    cache.set("greeting", "hello")          # noreply (pymemcache's default): one message
    cache.get("greeting")                   # one round trip and a one-way release

It goes through pymemcache's `socket_module` hook: the "socket" it connects is a stand-in whose
I/O goes through a lazy lease, asked for with the command's bytes; each command gives its lease
back when it returns (a noreply command's bytes go with that release, in one round trip that
raises if they could not be sent). memcached keeps no session, so nothing needs resetting between
holders; a command that fails has its lease discarded (pymemcache closes its socket then).

Where the pool lends its sockets (the broker's host), each command runs on a socket lease instead:
pymemcache writes to and reads from memcached's socket itself (`lend=False`: the relay).
"""

from __future__ import annotations

import socket
from typing import Any

from pymemcache.client.base import Client as PymemcacheClient

from poolbroker.client import Client as BrokerClient
from poolbroker.client.extension import LeasedSocket, LentSocket, described, lends
from poolbroker.sessions import Stateless

__all__ = ["Client", "LeaseSocket", "LeaseSocketModule", "LentLeaseSocket"]


class LeaseSocket(LeasedSocket):
    """The socket pymemcache holds: each command runs on a lazy lease of its own, given back when
    the command returns (memcached's stream is not followed: the lease ends only then)."""

    def connect(self, address: Any) -> None:
        pass  # where to connect is the broker pool's business

    def close(self) -> None:
        """pymemcache closes its socket after a failed command (or on close()): a lease in use is
        discarded then, its connection's state being unknown."""
        self.lease.discard()


class LentLeaseSocket(LentSocket):
    """The socket pymemcache holds where the pool lends: each command on a socket lease of its own,
    given back when the command returns (discarded if pymemcache closes it after a failure)."""

    def connect(self, address: Any) -> None:
        pass  # where to connect is the broker pool's business


class LeaseSocketModule:
    """What pymemcache's `socket_module` hook takes: the socket module's names, with sockets that
    are leases of `pool`."""

    AF_INET, AF_INET6, AF_UNIX, AF_UNSPEC = socket.AF_INET, socket.AF_INET6, socket.AF_UNIX, socket.AF_UNSPEC
    SOCK_STREAM, IPPROTO_TCP, TCP_NODELAY = socket.SOCK_STREAM, socket.IPPROTO_TCP, socket.TCP_NODELAY
    error, timeout = socket.error, socket.timeout

    def __init__(self, broker: BrokerClient, pool: str, tag: str | None = None, lend: bool | None = None) -> None:
        self.broker = broker
        self.pool = pool
        self.tag = tag
        self.lend = lend

    def getaddrinfo(self, host: str, port: int, *args: Any) -> list[tuple[Any, ...]]:
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]

    def socket(self, *args: Any) -> LeaseSocket | LentLeaseSocket:
        if lends(self.broker, described(self.broker, self.pool), self.lend):
            return LentLeaseSocket(self.broker, self.pool, Stateless, self.tag)
        return LeaseSocket(self.broker, self.pool, self.tag)


class Client(PymemcacheClient):  # type: ignore[misc]
    """pymemcache's Client, each command on a lease of the broker's `pool`. Takes pymemcache's
    own options (serde, timeouts, default_noreply...) except where to connect. `lend`: socket
    leases (True) or the relay (False); None: socket leases wherever the pool lends them."""

    def __init__(
        self,
        broker: BrokerClient,
        pool: str = "memcached",
        *,
        tag: str | None = None,
        lend: bool | None = None,
        **kwargs: Any,
    ) -> None:
        for key in ("server", "socket_module", "tls_context", "socket_keepalive"):
            if key in kwargs:
                raise ValueError(f"{key}: where and how to connect is the broker pool's business")
        super().__init__((pool, 0), socket_module=LeaseSocketModule(broker, pool, tag, lend), **kwargs)

    def _give_back(self) -> None:
        if isinstance(self.sock, (LeaseSocket, LentLeaseSocket)):  # (None after a failure: pymemcache closed it)
            self.sock.give_back()

    def _fetch_cmd(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super()._fetch_cmd(*args, **kwargs)
        finally:
            self._give_back()

    def _store_cmd(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super()._store_cmd(*args, **kwargs)
        finally:
            self._give_back()

    def _misc_cmd(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super()._misc_cmd(*args, **kwargs)
        finally:
            self._give_back()
