"""redis-py over leases: `redis.Redis(connection_pool=BrokerConnectionPool(client, "redis"))`.

Each command, and each pipeline (MULTI/EXEC included), runs under one lease: redis-py takes a
connection from this pool for it and gives it back after, and this pool turns that into a lazy
lease (asked for with the command itself: one round trip) and its one-way release. A pub/sub
holds one lease for its life, until `close()`. The broker's pool is the one bound across every
process; this one only hands out wrappers, which stay "connected" from one command to the next.

The broker's pool should say `protocol = "redis"`: then what a holder leaves on a connection (a
SELECT, a MULTI without EXEC, a WATCH, CLIENT SETNAME or TRACKING, a subscription) is reset
before the next holder gets it, and AUTH, SELECT and the client name come from the pool's settings
(`username`, `password`, `db`, `client_name`), done once per upstream connection. Over a pool that
does not reset sessions this adapter warns once.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import redis
from redis._parsers import _RESP2Parser, _RESP3Parser
from redis.backoff import NoBackoff
from redis.connection import AbstractConnection, Connection
from redis.retry import Retry

from poolbroker.client import Client, PoolMismatch
from poolbroker.client.extension import LeasedSocket, LentSocket, described, lends
from poolbroker.sessions.redis import RedisSession

_warned: set[tuple[str, str]] = set()  # (endpoint, pool) this process has warned about


class SessionLeakWarning(UserWarning):
    """The broker's pool does not reset what a holder leaves on a Redis connection."""


def require_resp(description: dict[str, Any] | None, pool: str, protocol: int | str) -> None:
    """PoolMismatch unless the pool's connections speak the RESP version redis-py will parse
    (a RESP3 pool's `resp = 3`: HELLO 3 in its handshake, and again after each RESET)."""
    wanted = int(protocol)
    if description is not None and description.get("resp", 2) != wanted:
        raise PoolMismatch(
            f"pool {pool!r} speaks RESP{description.get('resp', 2)} and redis-py was given protocol={wanted}:"
            f" set resp = {wanted} in the pool's settings, or protocol={description.get('resp', 2)} here"
        )


def settle_resp(connection: Any, description: dict[str, Any] | None, pool: str, parsers: tuple[type, type]) -> None:
    """The RESP version a connection speaks: the one redis-py was given, which the pool must speak
    (else PoolMismatch); or, when none was given, the pool's, as redis-py >= 8 speaks RESP3 unless
    the server can't. `parsers`: redis-py's RESP2 and RESP3 parser classes (sync or asyncio)."""
    resp = int(description.get("resp", 2)) if description is not None else None
    # (redis-py < 8 has no such flag: its default, RESP2, is then as good as asked for)
    chosen = not getattr(connection, "_protocol_specified_explicitly", True)
    if resp is not None and chosen and int(connection.protocol) != resp:
        connection.protocol = resp
        if type(connection._parser) in parsers:  # (hiredis parses both)
            connection.set_parser(parsers[resp - 2])
        if resp == 2:  # as redis-py's own fallback: its client then reads answers the RESP2 way
            connection._resp2_fallback = True
    require_resp(description, pool, connection.protocol)


def _warn_unless_protected(broker: Client, pool: str) -> None:
    """Once per process and pool: warn if the pool would hand a holder's session to the next one."""
    key = (broker.endpoint, pool)
    if key in _warned:
        return
    info = described(broker, pool)
    if info is None or info.get("protects"):
        return  # (an unknown pool: the lease itself says so)
    _warned.add(key)
    why = f"it speaks {info.get('protocol')}" if info.get("protocol") != "redis" else "its reset is off"
    warnings.warn(
        f"poolbroker pool {pool!r} does not reset Redis sessions ({why}): a holder's SELECT, AUTH,"
        " CLIENT SETNAME or TRACKING, an unfinished MULTI or WATCH, or a subscription reaches the next"
        ' holder of its connection. Set protocol = "redis" (and leave reset on) for the pool.',
        SessionLeakWarning,
        stacklevel=4,
    )


class LeaseConnection(Connection):
    """A redis-py connection whose socket is a LeasedSocket: a lease per command, given back when
    redis-py gives the connection back to this pool."""

    def __init__(
        self, *, broker: Client, pool: str, tag: str | None = None, lend: bool | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self.broker = broker
        self.pool_name = pool
        self.tag = tag
        self.lend = lend

    def _connect(self) -> LeasedSocket | LentSocket:
        _warn_unless_protected(self.broker, self.pool_name)
        description = described(self.broker, self.pool_name)
        settle_resp(self, description, self.pool_name, (_RESP2Parser, _RESP3Parser))
        # redis-py's socket_timeout, as a socket's: None waits as long as a command takes (BLPOP 0).
        if lends(self.broker, description, self.lend):  # (the upstream socket itself, same host)
            return LentSocket(self.broker, self.pool_name, RedisSession, self.tag, self.socket_timeout)
        return LeasedSocket(self.broker, self.pool_name, self.tag, self.socket_timeout)

    def can_read(self, timeout: float = 0) -> bool:
        # A command's lease has nothing to read before it sends (the broker hands out clean
        # connections only): say so without a round trip, since redis-py asks on every checkout.
        # Later (pub/sub) ask the lease.
        sock = self._sock
        if (isinstance(sock, LeasedSocket) and sock.lease.fresh) or (isinstance(sock, LentSocket) and not sock.holding):
            return False
        if isinstance(sock, LentSocket) and timeout == 0 and not self._unread() and not sock.readable():
            return False  # (one poll: redis-py's own check toggles the socket's blocking mode twice)
        return bool(super().can_read(timeout))

    def _unread(self) -> int:
        """Bytes redis-py's parser holds unread (-1: it can't say)."""
        unread = getattr(getattr(self._parser, "_buffer", None), "unread_bytes", None)
        return int(unread()) if callable(unread) else -1

    def give_back(self) -> None:
        """The command or pipeline is done: release its lease (kept by the broker if clean). The
        connection stays connected for the next command, which leases anew, unless redis-py's
        parser still holds bytes of this one (or can't say): then it is disconnected, as redis-py
        does with a connection returned before its reply was read."""
        sock = self._sock
        if not isinstance(sock, (LeasedSocket, LentSocket)):
            return
        if self._unread() == 0:
            sock.give_back()
        elif isinstance(sock, LentSocket):
            sock.discard()  # (replies read here and not by redis-py: the stream is out of step)
            self.disconnect()
        else:
            sock.lease.release()
            self.disconnect()

    def repr_pieces(self) -> list[tuple[str, Any]]:
        return [("pool", self.pool_name), ("broker", self.broker.endpoint)]


def lease_connection_options(kwargs: dict[str, Any], connection_class: Any, no_retry: Any) -> dict[str, Any]:
    """redis-py's connection options for leased connections (sync or asyncio): refused where they
    belong to the broker's pool, and set so that nothing is sent when a lease starts."""
    # Session state belongs to the broker's pool, not to one lease: a password or db given here
    # would have to be sent on every lease, and would change the connection for its next holder.
    for key in ("username", "password", "db", "client_name", "credential_provider"):
        if kwargs.get(key):
            setting = {"credential_provider": "username and password"}.get(key, key)
            raise ValueError(f'{key}: set {setting} in the broker\'s pool (protocol = "redis"), not per lease')
    # Nothing to send when a lease starts: no CLIENT SETINFO (redis-py >= 8 reads driver_info,
    # earlier versions lib_name and lib_version), no AUTH or SELECT (below). (With protocol=3, redis-py
    # sends HELLO 3 once per connection of its own: that lease is then reset, as after any HELLO.)
    if "driver_info" in inspect.signature(connection_class.__init__).parameters:
        kwargs.setdefault("driver_info", None)
    else:
        kwargs.setdefault("lib_name", None)
        kwargs.setdefault("lib_version", None)
    # A lease request already waits its acquire timeout, and the broker retries connects itself:
    # redis-py's own retries would only multiply the wait.
    kwargs.setdefault("retry", no_retry)
    return kwargs


class BrokerConnectionPool(redis.ConnectionPool):
    """A redis-py connection pool that leases from the broker's `pool` for every command or pipeline."""

    def __init__(
        self, broker: Client, pool: str = "redis", *, tag: str | None = None, lend: bool | None = None, **kwargs: Any
    ) -> None:
        """`lend`: run each command on the upstream socket itself (a socket lease) or through the
        broker (a relay lease); None: on the socket wherever the pool lends it (the broker's host)."""
        kwargs = lease_connection_options(kwargs, AbstractConnection, Retry(NoBackoff(), 0))
        super().__init__(connection_class=LeaseConnection, broker=broker, pool=pool, tag=tag, lend=lend, **kwargs)

    def release(self, connection: Any) -> None:
        if isinstance(connection, LeaseConnection):
            connection.give_back()
        super().release(connection)
