"""One upstream TCP connection: non-blocking connect, buffered reads, and the reads a lease asks for."""

from __future__ import annotations

import errno
import os
import select
import socket
import ssl
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from poolbroker.broker.decide.connection import State, check_move
from poolbroker.broker.drive.cancel import send_cancel

if TYPE_CHECKING:
    from poolbroker.broker.decide.probes import Check, ProbeFailed
    from poolbroker.broker.drive.pools import PoolState
    from poolbroker.broker.drive.tables import DriveLease
    from poolbroker.broker.drive.timers import Timer

RECV_CHUNK = 256 * 1024
# Reads land here first: recv(RECV_CHUNK) would allocate a 256 KiB object per read (about 20 us)
# to keep a few bytes. One buffer serves every connection: the server loop is one thread.
_READ_BUFFER = memoryview(bytearray(RECV_CHUNK))


class UpstreamConn:
    """A socket to the upstream, its read buffer, and what the broker knows of its health."""

    __slots__ = (
        "pool",
        "opened_at",
        "sock",
        "fd",
        "family",
        "rbuf",
        "eof",
        "broken",
        "error",
        "state",
        "tls_wants",
        "lease",
        "checks",
        "timer",
        "watching",
        "backend_key",
        "_readable",
        "_nowait",
    )

    def __init__(self, pool: PoolState, opened_at: float) -> None:
        self.pool = pool
        self.opened_at = opened_at  # when the broker began to open it (monotonic seconds)
        self.sock: socket.socket | None = None
        self.fd = -1
        self.family = 0  # the socket's address family, as a plain int (socket.family makes an enum)
        self.rbuf = bytearray()  # bytes read from the upstream and not yet handed to a client
        self.eof = False  # the upstream closed its side
        self.broken = False  # an I/O failed or was cut short: never reuse
        self.error = ""  # what went wrong, for the log line that closes it
        self.state = State.CONNECTING  # moved only along connection.MOVES (move())
        self.tls_wants = 0  # during the TLS handshake: the poll flag it waits for
        self.lease: DriveLease | None = None  # LEASED: whose
        self.checks: ProbeRun | None = None  # HANDSHAKE, PROBING, RESETTING: the run of checks
        self.timer: Timer | None = None  # the connect's or the checks' deadline
        self.watching = 0  # poll flags currently registered
        self.backend_key: tuple[int, int] | None = None  # postgres: its backend's pid and secret
        self._readable: select.poll | None = None  # this socket alone: is anything there, right now?
        # Each send and recv is asked not to wait (MSG_DONTWAIT), whatever the socket's file says:
        # a holder of the lent socket shares that file, and may have made it blocking.
        self._nowait: int = socket.MSG_DONTWAIT

    def __repr__(self) -> str:
        return f"<UpstreamConn {self.pool.config.name} fd={self.fd} {self.state.value}>"

    def move(self, state: State) -> None:
        """Into `state`, along the table of moves (BadMove if it has none: a bug of ours)."""
        self.state = check_move(self.state, state)

    def cancel(self, timeout: float) -> bool:
        """PostgreSQL: ask the server, on a connection of its own, to cancel what this one's
        backend is running. False when the connection has no backend to name."""
        if self.backend_key is None or self.sock is None or self.eof:  # (eof: the backend is gone)
            return False
        try:
            address = self.sock.getpeername()
        except OSError:
            return False
        send_cancel(address, self.sock.family, self.backend_key, timeout)
        return True

    def fail(self, error: str) -> None:
        """An I/O on it failed or was cut short: it must never be reused."""
        self.broken = True
        self.error = error

    def start_connect(self, family: int, sockaddr: Any) -> bool:
        """Begin a non-blocking connect; True if it completed at once. Raises OSError on failure."""
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        self.sock, self.fd, self.family = sock, sock.fileno(), int(family)
        self._readable = select.poll()
        self._readable.register(self.fd, select.POLLIN)
        if family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        err = sock.connect_ex(sockaddr)
        if err == 0:
            return True
        if err in (errno.EINPROGRESS, errno.EWOULDBLOCK):
            return False
        raise OSError(err, os.strerror(err))

    def connect_result(self) -> OSError | None:
        """After the socket turned writable: None if connected, else the connect error. Raises
        BlockingIOError if the connect is still in progress (a wake-up meant for the fd's former owner)."""
        assert self.sock is not None
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            return OSError(err, os.strerror(err))
        try:
            self.sock.getpeername()
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                raise BlockingIOError(errno.EINPROGRESS, "connect in progress") from None
            return exc
        return None

    def start_tls(self, context: ssl.SSLContext, server_name: str) -> None:
        """Wrap the connected socket in TLS; handshake() then drives the handshake."""
        assert self.sock is not None
        self.sock = context.wrap_socket(self.sock, server_hostname=server_name, do_handshake_on_connect=False)
        self._nowait = 0  # (an SSL socket takes no flags; it is never lent, so it stays non-blocking)
        self.tls_wants = select.EPOLLOUT

    def handshake(self) -> int:
        """Advance the TLS handshake: 0 once done, else the poll flag to wait for. Raises OSError
        (ssl.SSLCertVerificationError included) when it fails."""
        assert isinstance(self.sock, ssl.SSLSocket)
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.tls_wants = select.EPOLLIN
        except ssl.SSLWantWriteError:
            self.tls_wants = select.EPOLLOUT
        else:
            self.tls_wants = 0
        return self.tls_wants

    def send(self, data: memoryview) -> int:
        """Send what the socket takes now; 0 when its buffer is full. Raises OSError if broken."""
        assert self.sock is not None
        try:
            return self.sock.send(data, self._nowait)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return 0

    def fill(self) -> None:
        """Read what has arrived into the buffer (noting end of stream). Raises OSError if broken."""
        sock = self.sock
        assert sock is not None
        while True:
            try:
                n = sock.recv_into(_READ_BUFFER, 0, self._nowait)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return  # (TLS: what came was records of the protocol's own, no data)
            if not n:
                self.eof = True
                return
            self.rbuf += _READ_BUFFER[:n]
            # TLS may hold decrypted bytes the socket's poll will never announce: take them too.
            if not isinstance(sock, ssl.SSLSocket) or not sock.pending():
                return

    def unfit(self) -> str | None:
        """Why it can't go back to the pool, as a close reason, or None if it is clean: no I/O
        failed, nothing unread, and the peer has not closed."""
        if self.broken or self.eof or self.sock is None:
            return "broken"
        if self.rbuf:
            return "unread"
        assert self._readable is not None
        if isinstance(self.sock, ssl.SSLSocket):
            # No peeking through TLS, and a readable socket may only hold the protocol's own
            # records (a session ticket): read, and judge what came out.
            if not (self.sock.pending() or self._readable.poll(0)):
                return None
            try:
                self.fill()
            except OSError:
                return "broken"
            return "broken" if self.eof else "unread" if self.rbuf else None
        if not self._readable.poll(0):
            return None  # nothing to read: clean (a poll costs less than a failing recv)
        try:
            peeked = self.sock.recv(1, socket.MSG_PEEK | self._nowait)
        except BlockingIOError:
            return None  # nothing to read: clean
        except OSError:
            return "broken"
        return "unread" if peeked else "broken"  # b"": the peer closed

    def cut(self) -> None:
        """Shut a lent socket down both ways, which reaches every copy: a holder that keeps one
        fails at its next I/O. (Its file may have been made blocking by the holder: every I/O of
        ours says MSG_DONTWAIT, so that is left as it is.)"""
        assert self.sock is not None
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # (already closed by the upstream)

    def close(self) -> None:
        if self.state is not State.CLOSED:
            self.move(State.CLOSED)
        if self.sock is not None:
            self.sock.close()


class ProbeRun:
    """Checks in progress on a connection, one after another: a probe is one, a handshake
    (on_connect) or a reset may be several. Holds the current check, what is left of its request
    to send, and what to do once every check passed or one failed."""

    __slots__ = ("name", "checks", "pipelined", "step", "check", "send", "on_pass", "on_fail")

    def __init__(
        self,
        name: str,
        checks: Sequence[Check],
        on_pass: Callable[[UpstreamConn, float], None],
        on_fail: Callable[[UpstreamConn, ProbeFailed, float], None],
        *,
        pipelined: bool = False,
    ) -> None:
        self.name = name
        self.checks = checks
        # Pipelined: every request goes at once and the answers are read in order (Redis): one
        # round trip for a reset and its handshake, not one each.
        self.pipelined = pipelined and len(checks) > 1
        self.on_pass = on_pass
        self.on_fail = on_fail  # (conn, what went wrong, now)
        self.step = -1
        self.check: Check = checks[0]
        self.send: memoryview | None = None
        self.next_step()
        if self.pipelined:
            self.send = memoryview(b"".join(check.request for check in checks))

    def next_step(self) -> bool:
        """Move on to the next check; False when none is left."""
        self.step += 1
        if self.step >= len(self.checks):
            return False
        self.check = self.checks[self.step]
        self.send = memoryview(self.check.request) if self.check.request and not self.pipelined else None
        return True

    def describe(self) -> str:
        """The run's name, and which step when it has several (with the step's command, never
        its arguments: they may hold a password): for error messages."""
        if len(self.checks) == 1:
            return self.name
        return f"{self.name} step {self.step + 1} ({command_word(self.check.request)})"


def command_word(request: bytes) -> str:
    """A request's command, for a message: a RESP array's first string, or a line's first word."""
    lines = request.split(b"\r\n")
    word = lines[2] if request.startswith(b"*") and len(lines) > 2 else request.split(None, 1)[0] if request else b""
    return word[:20].decode(errors="replace")
