"""PostgreSQL drivers, unmodified, on the broker's pooled and already-authenticated connections.

    from poolbroker import Client, postgres

    broker = Client()
    with postgres.connect(broker, "pg") as conn:          # a psycopg Connection
        conn.execute("SELECT 1").fetchone()

    conn = postgres.pg8000_connect(broker, "pg")           # a pg8000.native Connection

psycopg's libpq opens its own socket, so its socket ends at a private bridge in this process: a
Unix socket in a 0700 directory, accepted by the bridge's greeter process (_greeter). libpq's
startup is answered as the pool's server would (AuthenticationOk, the server's parameters, a
BackendKeyData, ReadyForQuery) by the link, which in session mode leases first and gives the
backend's own pid; for conninfo(), by the greeter instead if the bridge can't claim it in time
(libpq's blocking calls hold the caller's GIL, and they still get their answer). A connect()
connection is then driven in psycopg's own thread (Inline): while psycopg waits on its socket,
what libpq wrote goes over a lease (_link.PgLink) and the answer back into the socket
(_inline). Connections made from conninfo() by other code are relayed by bridge threads
instead (_bridge). Where the pool lends its sockets (the broker's host), the lease is a socket
lease: the link writes to the upstream socket itself, in this process, with no broker hop.
Closing the connection gives the lease back;
`conn.cancel()` reaches the real backend through the broker. pg8000 takes a socket object
(`sock=`), so it needs no bridge and no thread.

A pool with `pool_mode = "transaction"` makes each connection hold a lease only from the first
message of a transaction to its end; psycopg's prepared statements are prepared again on each
backend that needs them (_statements). docs/guides/postgresql-modes.md says what transaction mode can't do.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from poolbroker.client import Client
from poolbroker.client.extension import lends
from poolbroker.postgres._bridge import bridge
from poolbroker.postgres._inline import connection_class
from poolbroker.postgres._link import Pg8000Socket, PgLink, pool_info

if TYPE_CHECKING:
    import pg8000.native
    import psycopg

__all__ = ["async_connect", "connect", "conninfo", "pg8000_connect", "pg8000_socket"]


def _transaction_mode(info: dict[str, Any], transaction_mode: bool | None) -> bool:
    return info.get("pool_mode") == "transaction" if transaction_mode is None else transaction_mode


def _bridge_target(
    broker: Client,
    pool: str,
    info: dict[str, Any],
    transactions: bool,
    tag: str | None,
    inline: bool,
    lend: bool | None,
) -> dict[str, Any]:
    """libpq's parameters that reach `pool` through this process's bridge: its socket (host and
    port), the pool's user and database, and neither TLS nor GSS (the bridge, in this process,
    refuses both)."""
    lent = lends(broker, info, lend)
    directory, port = bridge().route(broker, pool, transactions, tag, info, inline=inline, lend=lent)
    return {
        "host": directory,
        "port": port,
        "user": info["user"],
        "dbname": info["database"],
        "sslmode": "disable",
        "gssencmode": "disable",
    }


def _psycopg_arguments(
    broker: Client,
    pool: str,
    info: dict[str, Any],
    transaction_mode: bool | None,
    tag: str | None,
    kwargs: dict[str, Any],
    inline: bool,
    lend: bool | None,
) -> dict[str, Any]:
    """psycopg's connect() arguments: the bridge's target and the caller's own."""
    transactions = _transaction_mode(info, transaction_mode)
    target = _bridge_target(broker, pool, info, transactions, tag, inline, lend)
    if clash := sorted(target.keys() & kwargs.keys()):  # (as a repeated keyword argument would be)
        raise TypeError(f"{', '.join(clash)}: the bridge's to set, not the caller's")
    return {**target, **kwargs}


def connect(
    broker: Client,
    pool: str,
    *,
    transaction_mode: bool | None = None,
    tag: str | None = None,
    lend: bool | None = None,
    **kwargs: Any,
) -> psycopg.Connection[Any]:
    """A psycopg connection on the pool `pool` (its user and database are the pool's). Keyword
    arguments go to psycopg.Connection.connect (autocommit, row_factory...). `transaction_mode`
    defaults to the pool's pool_mode. (Transaction mode on a session-mode pool works, with the
    pool's reset after every transaction.) `lend`: its messages go on socket leases (True), or
    through the broker's relay (False); None: on socket leases wherever the pool lends them."""

    here = bridge()
    info = here.pool_info(broker, pool)
    arguments = _psycopg_arguments(broker, pool, info, transaction_mode, tag, kwargs, True, lend)
    conn = connection_class().connect(**arguments)
    conn.adopt(here.take_handed(conn.info.backend_pid))  # type: ignore[attr-defined]
    return conn


async def async_connect(
    broker: Client,
    pool: str,
    *,
    transaction_mode: bool | None = None,
    tag: str | None = None,
    lend: bool | None = None,
    **kwargs: Any,
) -> psycopg.AsyncConnection[Any]:
    """A psycopg AsyncConnection on the pool `pool`, as connect() makes a Connection. asyncio
    waits on libpq's socket, and a bridge thread carries the connection over its lease (a socket
    lease where the pool lends: `lend` as connect()'s). What the broker says of the pool is asked
    off the event loop."""
    import asyncio

    info = await asyncio.to_thread(bridge().pool_info, broker, pool)
    arguments = _psycopg_arguments(broker, pool, info, transaction_mode, tag, kwargs, False, lend)
    return await _async_connection_class().connect(**arguments)


def _async_connection_class() -> type[psycopg.AsyncConnection[Any]]:
    """psycopg's AsyncConnection, but for cancel(): libpq's PQcancel would wait, holding the GIL,
    for the bridge thread that must answer it; the link is asked directly instead."""
    global _AsyncBridgedConnection
    if _AsyncBridgedConnection is None:
        import psycopg

        class AsyncBridgedConnection(psycopg.AsyncConnection[Any]):
            def cancel(self) -> None:
                link = bridge().links.get(self.info.backend_pid)
                if link is not None:
                    link.cancel()

        _AsyncBridgedConnection = AsyncBridgedConnection
    return _AsyncBridgedConnection


_AsyncBridgedConnection: type[psycopg.AsyncConnection[Any]] | None = None


def conninfo(
    broker: Client,
    pool: str,
    *,
    transaction_mode: bool | None = None,
    tag: str | None = None,
    lend: bool | None = None,
) -> str:
    """A libpq connection string that reaches `pool` through this process's bridge: for code that
    builds its own connections from one (it holds only in this process). `lend` as connect()'s."""
    info = bridge().pool_info(broker, pool)
    target = _bridge_target(broker, pool, info, _transaction_mode(info, transaction_mode), tag, False, lend)
    return " ".join(f"{name}={value}" for name, value in target.items())


def pg8000_socket(
    broker: Client,
    pool: str,
    *,
    transaction_mode: bool | None = None,
    tag: str | None = None,
    lend: bool | None = None,
) -> Pg8000Socket:
    """What pg8000's `sock=` takes: give it with ssl_context=False. `lend` as connect()'s."""
    info = pool_info(broker, pool)
    # (a broker socket of its own, as each connection has: a read on one connection, waiting for a
    # lock, never holds up another that shares the thread's socket and would free that lock)
    here, mode = bridge(), _transaction_mode(info, transaction_mode)
    channel = here.take_channel(broker)
    lent = lends(broker, info, lend)
    link = PgLink(broker, pool, info, transaction_mode=mode, tag=tag, channel=channel, lend=lent)
    return Pg8000Socket(link, functools.partial(here.give_channel, broker, channel))


def pg8000_connect(
    broker: Client,
    pool: str,
    *,
    transaction_mode: bool | None = None,
    tag: str | None = None,
    lend: bool | None = None,
    **kwargs: Any,
) -> pg8000.native.Connection:
    """A pg8000.native Connection on the pool `pool`, through `sock=` (no thread); `lend` as connect()'s."""
    import pg8000.native

    sock = pg8000_socket(broker, pool, transaction_mode=transaction_mode, tag=tag, lend=lend)
    user, database = sock.link.info["user"], sock.link.info["database"]
    return pg8000.native.Connection(user, database=database, sock=sock, ssl_context=False, **kwargs)
