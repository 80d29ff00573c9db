"""PostgreSQL drivers, unmodified, on the broker's pooled and already-authenticated connections.

    from poolbroker import Client, postgres

    broker = Client()
    with postgres.connect(broker, "pg") as conn:          # a psycopg Connection
        conn.execute("SELECT 1").fetchone()

    conn = postgres.pg8000_connect(broker, "pg")           # a pg8000.native Connection

psycopg's libpq opens its own socket, so its socket ends at a private bridge in this process: a
Unix socket in a 0700 directory. A bridge thread answers libpq's startup as the pool's server would
(AuthenticationOk, the server's parameters, a BackendKeyData of its own, ReadyForQuery); then the
connection is driven in psycopg's own thread (Inline): while psycopg waits on its socket, what
libpq wrote goes over a lease (pg_link.PgLink) and the answer back into the socket. Connections
made from conninfo() by other code are relayed by bridge threads instead. Closing the connection
gives the lease back; `conn.cancel()` reaches the real backend through the broker. pg8000 takes a
socket object (`sock=`), so it needs no bridge and no thread.

A pool with `pool_mode = "transaction"` makes each connection hold a lease only from the first
message of a transaction to its end; psycopg's prepared statements are turned off there (each
transaction may run on another backend). See the README for what transaction mode can't do.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import select
import shutil
import socket
import tempfile
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from poolbroker.client.channel import Channel
from poolbroker.client.client import Client
from poolbroker.client.errors import PoolBrokerError
from poolbroker.pg_link import Pg8000Socket, PgLink, PgLinkError, error_response, pool_info

if TYPE_CHECKING:
    import pg8000.native
    import psycopg

__all__ = ["Bridge", "PgLink", "async_connect", "connect", "conninfo", "pg8000_connect", "pg8000_socket"]

RELAY_CHUNK = 256 * 1024
# How long what the broker said of a pool (its mode, user, database, server parameters) serves
# new connections before it is asked again: a connection per request (SQLAlchemy's NullPool)
# should not cost a round trip more each.
POOL_INFO_TTL = 10.0
# psycopg's Wait and Ready flags (psycopg/_enums.py), which its waiting generators yield and take.
WAIT_R, WAIT_W, READY_R, READY_W = 1, 2, 1, 2


def _transaction_mode(info: dict[str, Any], transaction_mode: bool | None) -> bool:
    return info.get("pool_mode") == "transaction" if transaction_mode is None else transaction_mode


def connect(
    broker: Client,
    pool: str,
    *,
    transaction_mode: bool | None = None,
    tag: str | None = None,
    **kwargs: Any,
) -> psycopg.Connection[Any]:
    """A psycopg connection on the pool `pool` (its user and database are the pool's). Keyword
    arguments go to psycopg.Connection.connect (autocommit, row_factory...). `transaction_mode`
    defaults to the pool's pool_mode; in it, prepare_threshold defaults to None."""

    here = bridge()
    info = here.pool_info(broker, pool)
    transactions = _transaction_mode(info, transaction_mode)
    if transactions:
        kwargs.setdefault("prepare_threshold", None)
    directory, port = here.route(broker, pool, transactions, tag, info, inline=True)
    conn = _connection_class().connect(
        host=directory,
        port=port,
        user=info["user"],
        dbname=info["database"],
        sslmode="disable",
        gssencmode="disable",
        **kwargs,
    )
    conn.adopt(here.handed.pop(conn.info.backend_pid))  # type: ignore[attr-defined]
    return conn


async def async_connect(
    broker: Client,
    pool: str,
    *,
    transaction_mode: bool | None = None,
    tag: str | None = None,
    **kwargs: Any,
) -> psycopg.AsyncConnection[Any]:
    """A psycopg AsyncConnection on the pool `pool`, as connect() makes a Connection. asyncio
    waits on libpq's socket, and a bridge thread carries the connection over its lease. What the
    broker says of the pool is asked off the event loop."""
    import asyncio

    here = bridge()
    info = await asyncio.to_thread(here.pool_info, broker, pool)
    transactions = _transaction_mode(info, transaction_mode)
    if transactions:
        kwargs.setdefault("prepare_threshold", None)
    directory, port = here.route(broker, pool, transactions, tag, info)
    return await _async_connection_class().connect(
        host=directory,
        port=port,
        user=info["user"],
        dbname=info["database"],
        sslmode="disable",
        gssencmode="disable",
        **kwargs,
    )


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


def _connection_class() -> type[psycopg.Connection[Any]]:
    """psycopg's Connection, driven in its own thread: once the bridge has answered libpq's
    startup, what libpq writes goes to the link, and the link's answer into libpq's socket, while
    psycopg waits (Inline). No relay thread in between: two thread switches fewer per round trip,
    about a third of the worker's CPU. And cancel() asks the link directly: libpq's blocking
    PQcancel holds the GIL while it waits for an answer, which this process's threads could never
    give (cancel_safe() goes through the bridge's socket, as libpq 17 does it)."""
    global _BridgedConnection
    if _BridgedConnection is None:
        import psycopg

        class BridgedConnection(psycopg.Connection[Any]):
            _inline: Inline | None = None

            def adopt(self, inline: Inline) -> None:
                self._inline = inline
                weakref.finalize(self, inline.close)  # (a connection dropped unclosed gives its lease back)

            def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
                if self._inline is None:
                    return super().wait(gen, interval, timeout)
                return self._inline.drive(gen, self.pgconn.socket, interval, timeout)

            def cancel(self) -> None:
                if self._inline is not None:
                    self._inline.link.cancel()

            def close(self) -> None:
                super().close()
                if self._inline is not None:
                    self._inline.close()

        _BridgedConnection = BridgedConnection
    return _BridgedConnection


_BridgedConnection: type[psycopg.Connection[Any]] | None = None


class Inline:
    """One bridged libpq connection, driven by the thread that waits on it (psycopg's wait(), under
    the connection's lock: one thread at a time, any thread, since the link has a broker socket of
    its own). Each wait for libpq's socket to be readable is met by carrying what libpq wrote to the
    link and the link's answer back into the socket, in this thread."""

    def __init__(self, sock: socket.socket, link: PgLink) -> None:
        self.sock = sock  # (made non-blocking once the bridge's thread has let it go: in drive())
        self.link = link
        self._pending = b""  # the link's answer not yet in libpq's socket (it was full)
        self._dead = False  # the upstream is gone: libpq has been told, and sees the end
        self._nonblocking = False
        self._lock = threading.Lock()

    def drive(self, gen: Any, fileno: int, interval: float, timeout: float | None) -> Any:
        """psycopg's waiting loop (its generator's waits met as above)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._nonblocking:
            self.sock.setblocking(False)
            self._nonblocking = True
        try:
            wait = next(gen)
            while True:
                self._take_written()
                ready = READY_W if wait & WAIT_W else 0  # (libpq's socket was just drained)
                if wait & WAIT_R:
                    # (with nothing owed, e.g. waiting for a notification: the socket itself, a
                    # while; not at all when libpq may write meanwhile, as in a pipeline)
                    pause = 0.0 if ready else interval
                    if self._answer() or select.select([fileno], [], [], pause)[0]:
                        ready |= READY_R
                    elif deadline is not None and time.monotonic() > deadline:
                        from psycopg import errors

                        raise errors._WaitTimeout(f"no answer within {timeout} s")
                wait = gen.send(ready)
        except StopIteration as done:
            return done.value

    def _take_written(self) -> None:
        while not self._dead:
            try:
                data = self.sock.recv(RELAY_CHUNK)
            except BlockingIOError:
                return
            if not data:
                return
            try:
                self.link.write(data)
            except (PgLinkError, PoolBrokerError) as exc:
                self._fail(exc)
            if len(data) < RELAY_CHUNK:
                return  # (libpq writes all it has before it waits: no need to ask again)

    def _answer(self) -> bool:
        """Put the link's next answer into libpq's socket: False if none is owed."""
        if not self._pending and not self._dead:
            if not self.link.awaiting():
                self.link.flush()  # (COPY data, a pipeline: nothing to wait for)
                return False
            try:
                self._pending = self.link.read(RELAY_CHUNK) or b""
                if not self._pending:  # the pooled connection closed: so does libpq's
                    self._fail(None)
            except (PgLinkError, PoolBrokerError) as exc:
                self._fail(exc)
        if self._pending:
            try:
                sent = self.sock.send(self._pending)
            except BlockingIOError:
                sent = 0  # (libpq's socket is full: libpq reads, then waits again)
            self._pending = self._pending[sent:]
        if self._dead and not self._pending:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)  # (libpq reads the error, then the end)
        return True

    def _fail(self, exc: BaseException | None) -> None:
        """The link can't go on: libpq gets the reason (an ErrorResponse) and then the end."""
        if not self._dead:
            self._dead = True
            if isinstance(exc, PgLinkError):
                self._pending += error_response(exc.sqlstate, str(exc))
            elif exc is not None:
                self._pending += error_response("08006", f"poolbroker: {exc}")
            self.link.close()

    def close(self) -> None:
        """The driver closed: its Terminate stays here, the lease goes back, the socket closes."""
        with self._lock:
            if self.sock.fileno() < 0:
                return
            with contextlib.suppress(OSError, PgLinkError, PoolBrokerError):
                self._take_written()
            self.link.close()
            self.sock.close()
            if self.link.channel is not None:
                bridge().give_channel(self.link.broker, self.link.channel)


def conninfo(broker: Client, pool: str, *, transaction_mode: bool | None = None, tag: str | None = None) -> str:
    """A libpq connection string that reaches `pool` through this process's bridge: for code that
    builds its own connections from one (it holds only in this process)."""
    info = pool_info(broker, pool)
    directory, port = bridge().route(broker, pool, _transaction_mode(info, transaction_mode), tag, info)
    return f"host={directory} port={port} user={info['user']} dbname={info['database']} sslmode=disable"


def pg8000_socket(
    broker: Client, pool: str, *, transaction_mode: bool | None = None, tag: str | None = None
) -> Pg8000Socket:
    """What pg8000's `sock=` takes: give it with ssl_context=False."""
    info = pool_info(broker, pool)
    return Pg8000Socket(PgLink(broker, pool, info, transaction_mode=_transaction_mode(info, transaction_mode), tag=tag))


def pg8000_connect(
    broker: Client, pool: str, *, transaction_mode: bool | None = None, tag: str | None = None, **kwargs: Any
) -> pg8000.native.Connection:
    """A pg8000.native Connection on the pool `pool`, through `sock=` (no thread)."""
    import pg8000.native

    sock = pg8000_socket(broker, pool, transaction_mode=transaction_mode, tag=tag)
    user, database = sock.link.info["user"], sock.link.info["database"]
    return pg8000.native.Connection(user, database=database, sock=sock, ssl_context=False, **kwargs)


class Bridge:
    """This process's private Unix sockets for libpq: one per (client, pool, mode), each a
    `.s.PGSQL.<port>` in one 0700 directory, accepted by a thread. Each accepted connection is
    relayed by a relay thread until it closes; relay threads are kept for the next connection (a
    thread's broker socket lives as long as the thread: one per thread, not one per connection).
    Made anew in a forked child (threads don't survive a fork)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.directory = tempfile.mkdtemp(prefix="poolbroker-pg-")  # (mkdtemp makes it 0700)
        self._routes: dict[tuple[int, str, bool, str | None, bool], int] = {}
        self.handed: dict[int, Inline] = {}  # inline connections whose startup is answered, by pid
        # Broker sockets of closed inline connections, for the next (by client): a socket closed
        # right after a one-way release could reach the broker as a holder gone before its release.
        self._channels: dict[int, list[Channel]] = {}
        self._pool_infos: dict[tuple[int, str], tuple[float, dict[str, Any]]] = {}  # (when asked, what)
        self._infos: dict[int, dict[str, Any]] = {}  # by port: what the broker last said of its pool
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._idle = 0  # relay threads waiting for a connection
        self.links: weakref.WeakValueDictionary[int, PgLink] = weakref.WeakValueDictionary()  # by their pid
        atexit.register(shutil.rmtree, self.directory, True)

    def route(
        self,
        broker: Client,
        pool: str,
        transaction_mode: bool,
        tag: str | None,
        info: dict[str, Any],
        *,
        inline: bool = False,
    ) -> tuple[str, int]:
        """The directory and port (libpq's host and port) that reach `pool` through `broker`;
        `info` (pool_info's) is what the connections made there answer their driver's startup with.
        `inline`: once a connection's startup is answered it is handed over (`handed`, by its
        BackendKeyData pid) to be driven by its psycopg connection (Inline); else a relay thread
        carries it to its end."""
        key = (id(broker), pool, transaction_mode, tag, inline)
        with self._lock:
            port = self._routes.get(key)
            if port is None:
                port = self._routes[key] = len(self._routes) + 1
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listener.bind(os.path.join(self.directory, f".s.PGSQL.{port}"))
                listener.listen(128)
                route = (port, broker, pool, transaction_mode, tag, inline)
                threading.Thread(target=self._accept, args=(listener, route), name="poolbroker-pg", daemon=True).start()
            self._infos[port] = info
        return self.directory, port

    def _accept(self, listener: socket.socket, route: tuple[Any, ...]) -> None:
        while True:
            sock, _ = listener.accept()
            with self._lock:
                if self._idle:
                    self._idle -= 1
                else:
                    threading.Thread(target=self._work, name="poolbroker-pg-relay", daemon=True).start()
            self._jobs.put((sock, *route))

    def _work(self) -> None:
        while True:
            self._serve(*self._jobs.get())
            with self._lock:
                self._idle += 1

    def _serve(
        self,
        sock: socket.socket,
        port: int,
        broker: Client,
        pool: str,
        transaction_mode: bool,
        tag: str | None,
        inline: bool,
    ) -> None:
        """Carry one libpq connection over its link until either side ends it (inline: answer its
        startup, then hand it over)."""
        link: PgLink | None = None
        handed_over = False
        try:
            channel = self.take_channel(broker) if inline else None
            link = PgLink(broker, pool, self._infos[port], transaction_mode=transaction_mode, tag=tag, channel=channel)
            self.links[link.key[0]] = link
            if inline:
                handed_over = self._answer_startup(sock, link)
                if handed_over:
                    return  # (the psycopg connection's now)
            relay(sock, link)
            if link.cancel_key is not None:  # (a CancelRequest: libpq 17's cancel_safe, or a tool's)
                target = self.links.get(link.cancel_key[0])
                if target is not None and target.key == link.cancel_key:
                    target.cancel()
        except PgLinkError as exc:
            _tell(sock, error_response(exc.sqlstate, str(exc)))
        except PoolBrokerError as exc:
            _tell(sock, error_response("08006", f"poolbroker: {exc}"))
        except OSError:
            pass  # libpq went away: the link's close below gives the lease back
        finally:
            if not handed_over:
                if link is not None:
                    link.close()
                    if link.channel is not None:
                        self.give_channel(broker, link.channel)
                sock.close()

    def pool_info(self, broker: Client, pool: str) -> dict[str, Any]:
        """pool_info(), asked again once POOL_INFO_TTL has passed."""
        key = (id(broker), pool)
        now = time.monotonic()
        with self._lock:
            known = self._pool_infos.get(key)
        if known is not None and now - known[0] < POOL_INFO_TTL:
            return known[1]
        info = pool_info(broker, pool)
        with self._lock:
            self._pool_infos[key] = (now, info)
        return info

    def take_channel(self, broker: Client) -> Channel:
        with self._lock:
            free = self._channels.get(id(broker))
            if free:
                return free.pop()
        return broker.own_channel()

    def give_channel(self, broker: Client, channel: Channel) -> None:
        with self._lock:
            self._channels.setdefault(id(broker), []).append(channel)

    def _answer_startup(self, sock: socket.socket, link: PgLink) -> bool:
        """Answer libpq's startup (and an SSLRequest before it); True once the connection is
        handed over, False for a CancelRequest (carried out by the caller)."""
        while not link.closed:
            data = sock.recv(RELAY_CHUNK)
            if not data:
                return False
            link.write(data)
            if link.started:  # handed over before libpq can see ReadyForQuery (and look for it)
                self.handed[link.key[0]] = Inline(sock, link)
                try:
                    sock.sendall(link.read(RELAY_CHUNK))
                except OSError:
                    del self.handed[link.key[0]]  # (libpq went away: nobody will adopt it)
                    raise
                return True
            while link.awaiting():
                sock.sendall(link.read(RELAY_CHUNK))
        return False


def relay(sock: socket.socket, link: PgLink) -> None:
    """libpq's bytes to the link; the link's answers back, read whenever the server owes some.
    (What libpq sends meanwhile waits in the socket: the server owes those answers for what it
    has already, so they come without it.)"""
    while not link.closed:
        data = sock.recv(RELAY_CHUNK)
        if not data:
            return
        link.write(data)
        while link.awaiting():
            answer = link.read(RELAY_CHUNK)
            if not answer:
                return  # the pooled connection closed: so does libpq's
            sock.sendall(answer)
        if not link.closed:
            link.flush()  # (COPY data, a pipeline's messages: nothing to wait for)


def _tell(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(data)


_bridge: Bridge | None = None
_bridge_lock = threading.Lock()


def bridge() -> Bridge:
    """This process's bridge (a forked child makes its own)."""
    global _bridge
    with _bridge_lock:
        if _bridge is None or _bridge.pid != os.getpid():
            _bridge = Bridge()
        return _bridge
