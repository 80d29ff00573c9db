"""Socket leases: the broker lends the upstream socket itself to a process on its own host and of
its own user, so the bytes go from here straight to the upstream, as a private pool's would.

They go over the lending socket beside the broker's ipc endpoint (`broker.sock.lend`): a lease
request, answered by a grant that carries the socket's descriptor (SCM_RIGHTS), and a release
that says what the session left. The broker still keeps the bound, the line, the checks, the
limits and what happens on return; it no longer sees the bytes, so a socket lease has no byte
counters, no io_timeout of the broker's and no lease_idle_timeout (max_lease_time still holds:
the broker then shuts the socket down, and the holder's next I/O fails).

A lent socket is close-on-exec, and a child of fork never keeps one: it is closed there.
"""

from __future__ import annotations

import array
import itertools
import os
import socket
import struct
import weakref
from types import TracebackType
from typing import Any

import msgpack

from poolbroker.client._errors import BrokerUnavailable, NotLent
from poolbroker.wire.endpoint import lending_path
from poolbroker.wire.protocol import (
    RELEASE_DISCARD,
    RELEASE_KEEP,
    VERSION,
    release_request,
)

MAX_PACKET = 4096  # a grant is well under 1 KiB (a bigger buffer costs every recv)
_FD_SPACE = socket.CMSG_SPACE(array.array("i").itemsize)

# Every lent socket and lending connection of this process: after fork, the child's copies close
# (the parent's stay the parent's: the broker sees the same connection and socket as before).
_lent: weakref.WeakSet[SocketLease] = weakref.WeakSet()
_lenders: weakref.WeakSet[LendingConnection] = weakref.WeakSet()


def _close_in_child() -> None:
    for lease in list(_lent):
        lease._forget_in_child()
    for lender in list(_lenders):
        lender.sock.close()


os.register_at_fork(after_in_child=_close_in_child)


class LendingConnection:
    """A connection to the broker's lending socket, made at once (a Unix socket connects or is
    refused, never waits): what Lender and asyncio's AsyncLender share, and what a lease asks of
    its connection (the process it belongs to, and a one-way send)."""

    def __init__(self, endpoint: str) -> None:
        path = lending_path(endpoint)
        if path is None:
            raise NotLent(f"{endpoint} is not an ipc endpoint: a socket can be lent on the broker's host only")
        self.path = path
        self.pid = os.getpid()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # (close-on-exec, as Python's are)
        try:
            self.sock.connect(path)
        except FileNotFoundError:
            self.sock.close()
            raise NotLent(f"no lending socket at {path}: this broker lends no pool's sockets") from None
        except OSError as exc:
            self.sock.close()
            raise BrokerUnavailable(f"can't reach the lending socket {path}: {exc}") from None
        self._ids = itertools.count(1)
        self._packer = msgpack.Packer(use_bin_type=True)
        _lenders.add(self)

    def tell(self, message: dict[str, Any]) -> None:
        """A one-way request (a release): nothing waits for its answer, as on the relay."""
        try:
            self.sock.send(self._packer.pack({"v": VERSION, "id": next(self._ids), "noreply": True, **message}))
        except OSError as exc:  # (the broker is gone: it ended the lease with the connection)
            raise BrokerUnavailable(f"the lending connection failed: {exc}") from None

    def _give_back(self, reply: dict[str, Any], fd: int | None) -> None:
        """A reply whose caller gave up: its descriptor closed, and a grant in it released."""
        if fd is not None:
            os.close(fd)
        if reply.get("lease") is not None:
            self.tell(release_request(reply["lease"]))

    def close(self) -> None:
        self.sock.close()


class Lender(LendingConnection):
    """A thread's own lending connection, one call at a time.

    Its socket blocks, bounded by the kernel's own timeouts (SO_RCVTIMEO, SO_SNDTIMEO), set only
    when a call's wait differs from the last: a Python timeout would cost a poll before every send
    and receive, and a mode switch per call."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(endpoint)
        self.sock.settimeout(None)  # (blocking, whatever socket.setdefaulttimeout says)
        self._wait = 0.0

    def _bound(self, wait: float) -> None:
        if wait != self._wait:
            seconds = max(wait, 1e-6)  # (zero would mean no bound at all)
            limit = struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
            self._wait = wait

    def call(self, message: dict[str, Any], wait: float) -> tuple[dict[str, Any], int | None]:
        """Send a request and wait up to `wait` seconds for its reply, and the descriptor a grant
        carries. A late reply to an earlier call that gave up is skipped (a grant in it given back)."""
        rid = next(self._ids)
        self._bound(wait)
        try:
            self.sock.send(self._packer.pack({"v": VERSION, "id": rid, **message}))
            while True:
                data, ancillary, _, _ = self.sock.recvmsg(MAX_PACKET, _FD_SPACE, socket.MSG_CMSG_CLOEXEC)
                if not data:
                    raise BrokerUnavailable("the broker closed its lending connection (it stopped?)")
                fd = _descriptor(ancillary)
                reply = msgpack.unpackb(data, raw=False)
                if reply.get("id") == rid:
                    return reply, fd
                self._give_back(reply, fd)
        except BlockingIOError:  # (the kernel's timeout passed)
            raise BrokerUnavailable(f"no answer on the lending socket within {wait:.1f}s") from None
        except (ConnectionError, BrokenPipeError) as exc:
            raise BrokerUnavailable(f"the lending connection failed: {exc}") from None


def _descriptor(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    for extra in fds[1:]:  # (one is all a grant carries)
        os.close(extra)
    return fds[0] if fds else None


class SocketLease:
    """A lent upstream socket: `socket` is connected to the upstream itself, not to a relay.

    Use it in a `with` block: leaving normally releases it, leaving by an exception discards it
    (the broker then closes the connection: its state is unknown). `release(session=...)` says what
    the session left, as the caller followed it: "clean" (back as it is), "reset" (the pool's reset
    first) or "out_of_sync" (closed); saying nothing gets the pool's reset. Closing the socket is
    the lease's business: don't keep it, or a copy of it, past the release."""

    def __init__(
        self,
        lender: LendingConnection,
        pool: str,
        token: bytes,
        fd: int,
        io_timeout: float | None,
        grant: dict[str, Any],
    ) -> None:
        self.pool = pool
        self.token = token
        self.backend_pid: int | None = grant.get("backend_pid")  # PostgreSQL: the backend's pid
        self.released = False
        self._lender = lender
        # The grant names the socket's family, so that its type and protocol need not be asked of
        # the socket (two syscalls); a grant without it (an older broker's) leaves them to be asked.
        family = grant.get("family")
        self._socket: socket.socket | None = (
            socket.socket(fileno=fd) if family is None else socket.socket(family, socket.SOCK_STREAM, 0, fileno=fd)
        )
        self._socket.settimeout(io_timeout)
        _lent.add(self)

    @property
    def socket(self) -> socket.socket:
        if self._socket is None:
            raise NotLent("this socket lease is over")
        return self._socket

    def release(self, session: str | None = None) -> None:
        """Give the socket back (one way: nothing waits); `session` says what the session left
        (None: not known, so the pool's reset runs)."""
        self._end(RELEASE_KEEP, session)

    def discard(self) -> None:
        """Give the socket back to be closed: its state is unknown."""
        self._end(RELEASE_DISCARD, None)

    def _end(self, mode: str, session: str | None) -> None:
        if self.released:
            return
        self.released = True
        if self._socket is not None:
            self._socket.close()  # (ours first: nothing here can use it after the release)
            self._socket = None
        # (A fork's child never gets here: the fork hook marked its copies released.)
        message = release_request(self.token, mode)
        if session is not None:
            message["session"] = session
        self._lender.tell(message)

    def _forget_in_child(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self.released = True

    def __enter__(self) -> SocketLease:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.release()
        else:
            self.discard()

    def __repr__(self) -> str:
        state = "released" if self.released else "lent"
        return f"<SocketLease {self.token[:4].hex()}.. pool={self.pool} {state}>"
