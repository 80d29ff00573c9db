"""A bridged psycopg connection driven in its own thread (`Inline`), and the psycopg Connection
class that drives it (`connection_class()`).

Once the bridge has answered libpq's startup, what libpq writes goes to the link, and the link's
answer into libpq's socket, while psycopg waits: its wait() is the relay. No relay thread in
between: two thread switches fewer per round trip, about a third of the worker's CPU.
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

from poolbroker.client.errors import PoolBrokerError
from poolbroker.pg_greeter import error_response
from poolbroker.pg_link import PgLink, PgLinkError

if TYPE_CHECKING:
    import psycopg

RELAY_CHUNK = 256 * 1024  # the most read from libpq, or handed to it, at once
# psycopg's Wait and Ready flags (psycopg/_enums.py), which its waiting generators yield and take.
WAIT_R, WAIT_W, READY_R, READY_W = 1, 2, 1, 2


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

    def __init__(self, sock: socket.socket, link: PgLink, on_close: Callable[[], None]) -> None:
        self.sock = sock  # (made non-blocking once the bridge's thread has let it go: in drive())
        self.link = link
        self._on_close = on_close  # (the bridge takes its broker socket back)
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
                self.sock.setblocking(False)  # (a connection never used was never made so in drive())
                self._take_written()
            self.link.close()
            self.sock.close()
            self._on_close()
