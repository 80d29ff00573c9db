"""A bridged psycopg connection driven in its own thread (`Inline`), and the psycopg Connection
class that drives it (`connection_class()`).

Once the bridge has answered libpq's startup, what libpq writes goes to the link, and the link's
answer into libpq's socket, while psycopg waits: its wait() is the relay. No relay thread in
between: two thread switches fewer per round trip, about a third of the worker's CPU. What libpq
writes while no wait() drives it (a raw `pgconn.exec_()`, code with a waiting loop of its own) is
seen by the bridge's watcher (`Watcher`) and carried by a relay thread.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from poolbroker.client import PoolBrokerError
from poolbroker.postgres._link import PgLink, PgLinkError, failure_response

if TYPE_CHECKING:
    import psycopg

RELAY_CHUNK = 256 * 1024  # the most read from libpq, or handed to it, at once
# psycopg's Wait and Ready flags (psycopg/_enums.py), which its waiting generators yield and take.
WAIT_R, WAIT_W, READY_R, READY_W = 1, 2, 1, 2
# The watcher's epoll masks: EPOLLONESHOT, one event per arming (disarmed: none but a hang-up, once)
ARMED = select.EPOLLIN | select.EPOLLONESHOT
ARMED_FOR_ROOM = ARMED | select.EPOLLOUT
DISARMED = select.EPOLLONESHOT


def connection_class() -> type[psycopg.Connection[Any]]:
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
                if self._inline is not None:  # (libpq's Terminate and end are close()'s, not the watcher's)
                    self._inline.unwatch()
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

    def __init__(self, sock: socket.socket, link: PgLink, on_close: Callable[[], None], watcher: Watcher) -> None:
        self.sock = sock  # (made non-blocking once the bridge's thread has let it go: _mine())
        self.link = link
        self._on_close = on_close  # (the bridge takes its broker socket back)
        self._watcher = watcher
        self.watched = -1  # the descriptor the watcher knows it by, while it does
        self._pending = b""  # the link's answer not yet in libpq's socket (it was full)
        self._dead = False  # the upstream is gone: libpq has been told, and sees the end
        self._nonblocking = False
        # Held by the thread carrying its bytes (a wait(), or a relay); reentrant: the collector may
        # run close() (a dropped connection's finalizer) in that very thread.
        self._lock = threading.RLock()

    def watch(self) -> None:
        """From now on, what libpq writes outside a wait() is carried too (the startup's answer is
        in libpq's socket: the bridge's thread has let it go)."""
        self._watcher.watch(self)

    def unwatch(self) -> None:
        """The watcher no longer looks at this connection (it is closing)."""
        with self._lock:
            self._watcher.forget(self)

    def drive(self, gen: Any, fileno: int, interval: float, timeout: float | None) -> Any:
        """psycopg's waiting loop (its generator's waits met as above), the watcher told to look away."""
        with self._lock:
            self._mine()
            try:
                return self._drive(gen, fileno, interval, timeout)
            finally:
                self._watcher.arm(self, bool(self._pending))

    def _mine(self) -> None:
        """This thread carries the bytes (under the lock): the watcher looks away until arm()."""
        self._watcher.disarm(self)
        if not self._nonblocking:
            self.sock.setblocking(False)
            self._nonblocking = True

    def _drive(self, gen: Any, fileno: int, interval: float, timeout: float | None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
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

    def _take_written(self) -> bool:
        """What libpq wrote, to the link (once the link is dead, dropped); True at its end."""
        while True:
            try:
                data = self.sock.recv(RELAY_CHUNK)
            except BlockingIOError:
                return False
            except OSError:
                return True
            if not data:
                return True
            if not self._dead:
                try:
                    self.link.write(data)
                except (PgLinkError, PoolBrokerError) as exc:
                    self._fail(exc)
            if len(data) < RELAY_CHUNK:
                return False  # (libpq writes all it has before it waits: no need to ask again)

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

    def _fail(self, exc: PgLinkError | PoolBrokerError | None) -> None:
        """The link can't go on: libpq gets the reason (an ErrorResponse) and then the end."""
        if not self._dead:
            self._dead = True
            if exc is not None:
                self._pending += failure_response(exc)
            self.link.close()

    def relay(self) -> None:
        """What libpq wrote while no wait() drove it, and the answers it is owed (a relay thread's
        job, when the watcher saw it): carried as far as it goes without waiting on libpq (what
        its full socket can't take yet waits in `_pending` for the watcher to see room)."""
        with self._lock:
            if self.sock.fileno() < 0:
                return
            self._mine()
            ended = self._take_written()
            while not ended and self.sock.fileno() >= 0 and self._answer() and not self._pending and not self._dead:
                ended = self._take_written()
            if not ended:
                self._watcher.arm(self, bool(self._pending))
        if ended:  # (libpq closed its end without a word: the driver is gone)
            self.close()

    def close(self) -> None:
        """The driver closed: its Terminate stays here, the lease goes back, the socket closes."""
        with self._lock:
            if self.sock.fileno() < 0:
                return
            self._watcher.forget(self)
            with contextlib.suppress(OSError, PgLinkError, PoolBrokerError):
                self.sock.setblocking(False)  # (a connection never used was never made so in _mine())
                self._take_written()
            self.link.close()
            self.sock.close()
            self._on_close()


class Watcher:
    """One thread for all of a process's inline connections: what libpq writes while no wait()
    drives its connection (libpq's blocking PQexec() through `pgconn.exec_()`, a driver's own
    waiting loop, the Terminate of a connection collected unclosed) makes its socket readable, and
    a relay thread (`run`) carries it. A wait() disarms its socket while it drives it, and arms it
    again after (EPOLLONESHOT: one event per arming, so a socket being carried never wakes it)."""

    def __init__(self, run: Callable[[Callable[[], None]], None]) -> None:
        self._run = run
        self._epoll = select.epoll()
        self._modify = self._epoll.modify  # (twice per wait(): the hot path)
        self._inlines: dict[int, Inline] = {}  # by their socket's descriptor
        threading.Thread(target=self._watch, name="poolbroker-pg-watch", daemon=True).start()

    def watch(self, inline: Inline) -> None:
        inline.watched = inline.sock.fileno()
        self._inlines[inline.watched] = inline
        self._epoll.register(inline.watched, ARMED)

    def arm(self, inline: Inline, room: bool = False) -> None:
        """Watch for libpq's writes again (and, `room`, for space in its socket for what waits)."""
        if inline.watched >= 0:
            self._modify(inline.watched, ARMED_FOR_ROOM if room else ARMED)

    def disarm(self, inline: Inline) -> None:
        if inline.watched >= 0:
            self._modify(inline.watched, DISARMED)

    def forget(self, inline: Inline) -> None:
        if inline.watched >= 0:
            with contextlib.suppress(OSError):
                self._epoll.unregister(inline.watched)
            self._inlines.pop(inline.watched, None)
            inline.watched = -1

    def _watch(self) -> None:
        while True:
            for fd, _ in self._epoll.poll():
                inline = self._inlines.get(fd)
                if inline is not None:
                    self._run(inline.relay)
