"""This process's bridge for libpq: private Unix sockets that psycopg connects to, and the threads
that answer them.

A connection made by poolbroker.postgres.connect() is answered up to its startup and then handed
over, to be driven in psycopg's own thread (pg_inline.Inline); one made by other code from
conninfo() (asyncio's psycopg, for instance) is relayed by a bridge thread to its end. Either way
its messages go over leases through a PgLink, and a CancelRequest that arrives here (libpq 17's
cancel_safe) reaches the real backend through the broker.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import queue
import shutil
import socket
import tempfile
import threading
import time
import weakref
from typing import Any

from poolbroker.client.channel import Channel
from poolbroker.client.client import Client
from poolbroker.client.errors import PoolBrokerError
from poolbroker.pg_inline import RELAY_CHUNK, Inline
from poolbroker.pg_link import PgLink, PgLinkError, error_response, pool_info

# How long what the broker said of a pool (its mode, user, database, server parameters) serves
# new connections before it is asked again: a connection per request (SQLAlchemy's NullPool)
# should not cost a round trip more each.
POOL_INFO_TTL = 10.0


class Bridge:
    """This process's private Unix sockets for libpq: one per (client, pool, mode, inline or not),
    each a `.s.PGSQL.<port>` in one 0700 directory, accepted by a thread. Each accepted connection
    is served by a relay thread: up to its startup's answer on an inline route (then psycopg's own
    thread drives it), else until it closes. Relay threads are kept for the next connection (a
    thread's broker socket lives as long as the thread), and so are inline connections' own broker
    sockets. Made anew in a forked child (threads don't survive a fork)."""

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
                assert link.channel is not None  # (an inline route's links have their own)
                give_back = functools.partial(self.give_channel, link.broker, link.channel)
                self.handed[link.key[0]] = Inline(sock, link, give_back)
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
