"""This process's bridge for libpq: private Unix sockets that psycopg connects to, the greeter
process that answers their startup, and the threads that carry them on.

A connection made by poolbroker.postgres.connect() is handed over once its startup is answered, to
be driven in psycopg's own thread (_inline.Inline); one made by other code from conninfo()
(asyncio's psycopg, for instance) is relayed by a bridge thread to its end. Either way its messages
go over leases through a PgLink, and a CancelRequest that arrives here (libpq's cancel, or 17's
cancel_safe) reaches the real backend through the broker.
"""

from __future__ import annotations

import array
import atexit
import contextlib
import functools
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from typing import Any, NamedTuple

import poolbroker.postgres._greeter as pg_greeter
from poolbroker.client import Client, PoolBrokerError
from poolbroker.client.extension import Channel
from poolbroker.postgres._inline import RELAY_CHUNK, Inline, Watcher
from poolbroker.postgres._link import PgLink, PgLinkError, failure_response, pool_info

# How long what the broker said of a pool (its mode, user, database, server parameters) serves
# new connections before it is asked again: a connection per request (SQLAlchemy's NullPool)
# should not cost a round trip more each.
POOL_INFO_TTL = 10.0


class Route(NamedTuple):
    """What the connections made on one of the bridge's sockets reach, and how."""

    broker: Client
    pool: str
    transaction_mode: bool
    tag: str | None
    inline: bool  # handed over to be driven by its psycopg connection (else relayed by a thread)
    lend: bool  # on socket leases (else through the broker's relay)


RUN_FILE = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"


class Bridge:
    """This process's private Unix sockets for libpq: one per (client, pool, mode, inline or not),
    each a `.s.PGSQL.<port>` in one 0700 directory. The greeter process accepts them and passes
    each back here, its startup for a link here to answer (leased first in session mode, with the
    backend's own pid) or, when this process can't claim it in time (a libpq call holding its
    GIL), answered by the greeter (_greeter). A connection on an inline route is then handed
    over (`take_handed`) to be driven by its psycopg connection's own thread (Inline); any other is
    relayed by a relay thread until it closes. Relay threads are kept for the next connection (a
    thread's broker socket lives as long as the thread), and so are inline connections' own broker
    sockets. Made anew in a forked child (threads don't survive a fork)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.directory = tempfile.mkdtemp(prefix="poolbroker-pg-")  # (mkdtemp makes it 0700)
        self._routes: dict[tuple[int, str, bool, str | None, bool, bool], int] = {}
        self._route_of: dict[int, Route] = {}  # by port
        self._listeners: dict[int, socket.socket] = {}  # by port (the greeter accepts on its copies)
        self._handed: dict[int, Inline] = {}  # inline connections whose startup is answered, by pid
        self._handed_ready = threading.Condition()
        # Broker sockets of closed inline connections, for the next (by client): a socket closed
        # right after a one-way release could reach the broker as a holder gone before its release.
        self._channels: dict[int, list[Channel]] = {}
        self._pool_infos: dict[tuple[int, str], tuple[float, dict[str, Any]]] = {}  # (when asked, what)
        self._infos: dict[int, dict[str, Any]] = {}  # by port: what the broker last said of its pool
        self._lock = threading.Lock()
        self._greeter: socket.socket | None = None  # this end of the socket pair with the greeter
        self._given: set[int] = set()  # the ports whose listener the greeter has
        self._jobs: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._idle = 0  # relay threads waiting for a connection
        self._inline_watcher: Watcher | None = None
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
        lend: bool = False,
    ) -> tuple[str, int]:
        """The directory and port (libpq's host and port) that reach `pool` through `broker`;
        `info` (pool_info's) is what the connections made there answer their driver's startup with.
        `inline`: once a connection's startup is answered it is handed over (`take_handed`, by its
        BackendKeyData pid) to be driven by its psycopg connection (Inline); else a relay thread
        carries it to its end. `lend`: its links run on socket leases."""
        key = (id(broker), pool, transaction_mode, tag, inline, lend)
        with self._lock:
            port = self._routes.get(key)
            if port is None:
                port = self._routes[key] = len(self._routes) + 1
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listener.bind(os.path.join(self.directory, f".s.PGSQL.{port}"))
                listener.listen(128)
                self._listeners[port] = listener
                self._route_of[port] = Route(broker, pool, transaction_mode, tag, inline, lend)
            if self._infos.get(port) != info or self._greeter is None:
                self._infos[port] = info
                self._tell_greeter(port)
        return self.directory, port

    # -- the greeter ---------------------------------------------------------------------------

    def _tell_greeter(self, port: int) -> None:
        """What the greeter answers on `port` (and, the first time, its listener). Under _lock."""
        if self._greeter is None:
            self._greeter = self._start_greeter()
            self._given.clear()
        way = self._route_of[port]
        info = self._infos[port]
        route = {"route": port, "pool": way.pool, "user": info["user"], "database": info["database"]}
        # connect() never holds the GIL while it waits: its link answers, leased first in session
        # mode (the real backend's pid). Code that makes its own connections might: the bridge
        # claims those when it can (in session mode: no pid to show in transaction mode).
        route["answer"] = "bridge" if way.inline else "greeter" if way.transaction_mode else "claimed"
        route["parameters"] = info["parameters"]
        fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [self._listeners[port].fileno()]))]
        self._greeter.sendmsg([json.dumps(route).encode()], [] if port in self._given else fds)
        self._given.add(port)

    def _start_greeter(self) -> socket.socket:
        """The greeter process, and the thread that takes the connections it passes back."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            # (-I: nothing of the caller's environment or directory; the file, not -m: nothing of
            # poolbroker's package imported, so it starts in milliseconds)
            argv = [sys.executable, "-I", "-c", RUN_FILE, pg_greeter.__file__, str(theirs.fileno())]
            process = subprocess.Popen(argv, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        started = time.monotonic()
        threading.Thread(target=self._receive, args=(ours, process, started), name="poolbroker-pg", daemon=True).start()
        return ours

    def _receive(self, greeter: socket.socket, process: subprocess.Popen[bytes], started: float) -> None:
        """The greeter's connections (each with its BackendKeyData and descriptor) and cancels."""
        while True:
            try:
                data, ancillary, _, _ = greeter.recvmsg(1 << 16, pg_greeter.FDS)
            except OSError:
                data, ancillary = b"", []
            if not data:  # the greeter is gone (killed?): another takes over its routes
                with self._lock:
                    if self._greeter is greeter:
                        self._greeter = None
                        if time.monotonic() - started > 1.0:  # (else the next route() tries: no respawn loop)
                            for port in self._route_of:
                                self._tell_greeter(port)
                greeter.close()
                process.wait()
                return
            said = json.loads(data)
            if "ask" in said:  # (this thread runs: the connection's caller does not hold the GIL)
                with contextlib.suppress(OSError):
                    greeter.send(json.dumps({"claim": said["ask"]}).encode())
                continue
            if "cancel" in said:
                self._jobs.put((self._cancel, tuple(said["cancel"])))
                self._spare_thread()
                continue
            fds = [fd for level, kind, raw in ancillary if kind == socket.SCM_RIGHTS for fd in array.array("i", raw)]
            sock = socket.socket(fileno=fds[0])
            sock.setblocking(True)  # (the greeter's copy was not: the flag is the descriptor's)
            port = said["port"]
            # (answered in a relay thread, which may wait for a lease: here, the next connection waits)
            if "key" in said:  # the greeter answered its startup: relayed from here
                self._jobs.put((self._serve, sock, port, tuple(said["key"]), bytes.fromhex(said["rest"])))
            elif self._route_of[port].inline:  # an inline route's: handed over once answered
                self._jobs.put((self._answer_inline, sock, port, bytes.fromhex(said["startup"])))
            else:  # claimed: answered by its link, then relayed
                self._jobs.put((self._serve, sock, port, None, bytes.fromhex(said["startup"])))
            self._spare_thread()

    def _answer_inline(self, sock: socket.socket, port: int, startup: bytes) -> None:
        """An inline route's connection: its link answers the startup (in session mode, with the
        backend's own pid, once leased), then the connection is handed over to its driver."""
        way = self._route_of[port]
        broker = way.broker
        channel = self.take_channel(broker)
        link: PgLink | None = None
        try:
            link = PgLink(
                broker,
                way.pool,
                self._infos[port],
                transaction_mode=way.transaction_mode,
                tag=way.tag,
                channel=channel,
                backend_pid=True,
                lend=way.lend,
            )
            link.write(startup)
            answer = link.read(RELAY_CHUNK)
        except (PgLinkError, PoolBrokerError) as exc:
            _tell(sock, failure_response(exc))
            if link is not None:
                link.close()
            self.give_channel(broker, channel)
            sock.close()
            return
        self.links[link.key[0]] = link
        inline = Inline(sock, link, functools.partial(self.give_channel, broker, channel), self._watcher())
        inline.watch()  # (libpq writes nothing more until it has the answer)
        with self._handed_ready:  # (before libpq can see ReadyForQuery, and its connect() return)
            self._handed[link.key[0]] = inline
            self._handed_ready.notify_all()
        _tell(sock, answer)

    def take_handed(self, pid: int, timeout: float = 10.0) -> Inline:
        """The inline connection whose BackendKeyData pid is `pid` (its driver's connect() has
        returned: the greeter's hand-over is on its way, if not here yet)."""
        with self._handed_ready:
            if not self._handed_ready.wait_for(lambda: pid in self._handed, timeout):
                raise PgLinkError("08006", f"poolbroker: the bridge never received connection {pid}")
            return self._handed.pop(pid)

    def _watcher(self) -> Watcher:
        """The watcher of inline connections (started with the first)."""
        with self._lock:
            if self._inline_watcher is None:
                self._inline_watcher = Watcher(self._relay_job)
            return self._inline_watcher

    def _relay_job(self, job: Any) -> None:
        self._jobs.put((job,))
        self._spare_thread()

    # -- relay threads -------------------------------------------------------------------------

    def _spare_thread(self) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
            else:
                threading.Thread(target=self._work, name="poolbroker-pg-relay", daemon=True).start()

    def _work(self) -> None:
        while True:
            job, *args = self._jobs.get()
            job(*args)
            with self._lock:
                self._idle += 1

    def _serve(self, sock: socket.socket, port: int, key: tuple[int, int] | None, data: bytes) -> None:
        """Carry one libpq connection over its link until either side ends it: `data` is what
        came after the startup the greeter answered with `key`, or (key None) the startup for the
        link to answer, leased first in session mode. The link is made here: its leases go over
        this relay thread's own broker socket (one made in the thread that receives from the
        greeter would be every connection's, and a read waiting for a lock would hold up the
        COMMIT that frees it)."""
        way = self._route_of[port]
        try:
            link = PgLink(
                way.broker,
                way.pool,
                self._infos[port],
                transaction_mode=way.transaction_mode,
                tag=way.tag,
                backend_pid=key is None,
                lend=way.lend,
            )
            if key is not None:
                link.greeted(key)
            if data:  # (after a greeter's answer, libpq sends nothing more before ReadyForQuery: never so far)
                link.write(data)
        except (PgLinkError, PoolBrokerError) as exc:
            _tell(sock, failure_response(exc))
            sock.close()
            return
        self.links[link.key[0]] = link
        try:
            relay(sock, link)
        except (PgLinkError, PoolBrokerError) as exc:
            _tell(sock, failure_response(exc))
        except OSError:
            pass  # libpq went away: the link's close below gives the lease back
        finally:
            link.close()
            sock.close()

    def _cancel(self, key: tuple[int, int]) -> None:
        """A CancelRequest (libpq's cancel, or cancel_safe, or a tool's): to the real backend."""
        target = self.links.get(key[0])
        if target is not None and target.key == key:
            with contextlib.suppress(PoolBrokerError):
                target.cancel()

    # -- what routes share ---------------------------------------------------------------------

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


def relay(sock: socket.socket, link: PgLink) -> None:
    """libpq's bytes to the link; the link's answers back, read whenever the server owes some.
    (What libpq sends meanwhile waits in the socket: the server owes those answers for what it
    has already, so they come without it.)"""
    if not _pass_answers(sock, link):  # (the startup's answer, when the link gave it)
        return
    while not link.closed:
        data = sock.recv(RELAY_CHUNK)
        if not data:
            return
        link.write(data)
        if not _pass_answers(sock, link):
            return
        if not link.closed:
            link.flush()  # (COPY data, a pipeline's messages: nothing to wait for)


def _pass_answers(sock: socket.socket, link: PgLink) -> bool:
    """What the link has for libpq, until the server owes nothing more; False once the pooled
    connection has closed (so does libpq's)."""
    while link.awaiting():
        answer = link.read(RELAY_CHUNK)
        if not answer:
            return False
        sock.sendall(answer)
    return True


def _tell(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(data)


_bridge: Bridge | None = None
_bridge_lock = threading.Lock()


def _forget_parent_s() -> None:
    """In a forked child: the parent's bridge is not this process's (its greeter ends with its
    parent's end of their socket pair, which the child must not hold)."""
    if _bridge is not None and _bridge._greeter is not None:
        _bridge._greeter.close()


os.register_at_fork(after_in_child=_forget_parent_s)


def bridge() -> Bridge:
    """This process's bridge (a forked child makes its own)."""
    global _bridge
    with _bridge_lock:
        if _bridge is None or _bridge.pid != os.getpid():
            _bridge = Bridge()
        return _bridge
