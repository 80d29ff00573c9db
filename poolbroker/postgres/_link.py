"""One PostgreSQL driver connection carried over the broker's leases (`PgLink`), and the pg8000
socket built on it. The driver speaks to a link as to a server: the link answers its startup as the
pool's server would (the pool's connections are logged in already), then carries every message to
a pooled connection and every answer back.

    session mode:      one lease, from the driver's first message until it closes
    transaction mode:  a lease per transaction, from its first message to the ReadyForQuery that
                       ends it (status I: the broker ends the lease then, "when done")

Where the pool lends its sockets (the broker's host), the leases are socket leases: the link
writes to and reads from the upstream socket itself, and follows the session with
poolbroker.sessions' PostgreSQL tracker (the relay's own), which says when a transaction-mode
lease is at rest (the lent socket goes back then: when_done) and what the release reports.

The link follows both streams (ReadyForQuery owed, COPY IN, the transaction status) to tell its
relay when the server has more to say, and takes the driver's Terminate for itself: the pooled
connection stays open.

A lone BEGIN between transactions is answered at once and goes with the transaction's first
statement: one round trip less per transaction (psycopg and pg8000 send BEGIN on its own and wait
for it). The server's own answer to it is checked and taken out of the stream. So now() and
transaction_timestamp() are those of the first statement, not of the BEGIN.
"""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Callable
from typing import Any

from poolbroker.client import Client, Lease, PoolBrokerError, UpstreamError
from poolbroker.client.extension import DEFAULT_RECV, FIRST_POLL, Channel, LeasedSocket, LentSocket
from poolbroker.postgres._greeter import (
    MAX_STARTUP,
    StartupError,
    error_response,
    new_key,
    startup_answer,
    startup_parameters,
)
from poolbroker.postgres._statements import Statements
from poolbroker.sessions.postgres import PostgresSession
from poolbroker.wire.pgwire import (
    ANSWERED_BY_READY,
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    PROTOCOL_VERSION,
    READY_CHUNK,
    READY_HEAD,
    SSL_REQUEST_CODE,
    Frames,
    message,
)

READY, COPY_IN, COPY_DONE, COPY_FAIL, FLUSH, TERMINATE, ERROR = (ord(c) for c in "ZGcfHXE")
ANSWERED_AT_FLUSH = frozenset(b"PBDEC")  # Parse, Bind, Describe, Execute, Close: answered before the Sync

# A BEGIN with nothing else in its Query, and the server's answer to it.
LONE_BEGIN = re.compile(
    rb"\s*BEGIN(?:\s+(?:TRANSACTION|WORK))?(?:\s*,?\s*(?:ISOLATION\s+LEVEL\s+(?:SERIALIZABLE|REPEATABLE\s+READ"
    rb"|READ\s+COMMITTED|READ\s+UNCOMMITTED)|READ\s+(?:ONLY|WRITE)|(?:NOT\s+)?DEFERRABLE))*\s*;?\s*\0",
    re.IGNORECASE,
)
BEGIN_ANSWER = message(b"C", b"BEGIN\0") + message(b"Z", b"T")
FLUSH_MESSAGE = message(b"H", b"")
LENT_READ = 256 * 1024  # the most read from a lent socket at once


PgLinkError = StartupError  # the driver asked for something the pool can't give (another database...)


def failure_response(exc: PgLinkError | PoolBrokerError) -> bytes:
    """The ErrorResponse a driver reads when its link can't go on: the link's own SQLSTATE, or
    08006 (connection failure) with the broker's reason."""
    if isinstance(exc, PgLinkError):
        return error_response(exc.sqlstate, str(exc))
    return error_response("08006", f"poolbroker: {exc}")


def pool_info(broker: Client, pool: str) -> dict[str, Any]:
    """What the broker says of a postgres pool: its user, database, pool_mode and the parameters
    its server announced. Before any connection has logged in there are none: one lease is taken
    and given back to open one."""
    info = broker.ping()["protocols"].get(pool)
    if info is None:
        raise PgLinkError("3D000", f"the broker has no pool named {pool!r}")
    if info.get("protocol") != "postgres":
        raise PgLinkError(
            "08004", f'pool {pool!r} speaks {info.get("protocol")}: set protocol = "postgres" in the pool\'s settings'
        )
    if not info.get("parameters"):
        broker.lease(pool).release()  # (its grant waits for the login: the next ping has them)
        info = broker.ping()["protocols"][pool]
    return info  # type: ignore[no-any-return]


class PgLink:
    """One driver connection over leases (see the module's docstring). `write` takes what the
    driver sends; `read` returns what it is to read next; `awaiting()` says whether the server
    owes it more (so a relay knows when to read); `close` gives the lease back."""

    def __init__(
        self,
        broker: Client,
        pool: str,
        info: dict[str, Any],
        *,
        transaction_mode: bool,
        tag: str | None = None,
        channel: Channel | None = None,
        backend_pid: bool = False,
        lend: bool = False,
    ) -> None:
        self.broker = broker
        self.pool = pool
        self.info = info
        self.transaction_mode = transaction_mode
        self.tag = tag
        self.channel = channel  # a broker socket for this link alone (any thread may drive it), or None
        # Session mode: lease at the startup, and answer it with the real backend's pid, which the
        # driver then shows (pg_terminate_backend() of it ends this connection's backend).
        self._backend_pid = backend_pid and not transaction_mode
        self.upstream: Lease | LeasedSocket | LentSocket
        if lend:  # the upstream socket itself: a transaction's goes back when its tracker sees it over
            self.upstream = LentSocket(broker, pool, PostgresSession, tag=tag, when_done=transaction_mode)
        elif transaction_mode:  # each transaction on a lazy lease of its own, ended when done
            self.upstream = LeasedSocket(broker, pool, tag=tag, timeout=None, channel=channel)
        else:  # one lazy lease for the whole connection
            self.upstream = broker.lease(pool, tag=tag, lazy=True, channel=channel)
            self.upstream.settimeout(None)  # (a long query is the server's to bound, not io_timeout's)
        self.key = new_key()  # (its BackendKeyData, unless greeted: the pid names the link in its process)
        self.cancel_key: tuple[int, int] | None = None  # this connection was a CancelRequest for it
        self.closed = False  # the driver sent Terminate (or a CancelRequest): nothing more follows
        self._startup = bytearray()  # the startup packet, until it is whole
        self._started = False
        self._answer = bytearray()  # what the driver is to read: the link's own answers, the server's
        self._sent, self._received = Frames(), Frames(keep=b"Z")
        self.status = b"I"  # the transaction status, as the last ReadyForQuery (ours or the server's) said
        self._begin = b""  # a lone BEGIN answered here, to go with the next message
        self._unseen = b""  # what is left of the server's answer to it, to take out of the stream
        self.owed = 0  # ReadyForQuery the server owes
        self.copy_in = False  # the server waits for the driver's COPY data
        self._flushed = False  # the driver sent Flush: it waits for what the server has so far
        self._unsynced = False  # extended-query messages sent since the last Sync (or Flush)
        # An error with no Sync sent since: the server skips every extended-query message until the
        # next Sync, and answers none of them (libpq reports them aborted without asking).
        self._skipping = False
        # Transaction mode: the driver's prepared statements, prepared again on each backend, and
        # the ends of messages not yet whole, held until they are (each direction's).
        self.statements = Statements() if transaction_mode else None
        self._statements_lease: object = None  # the lease whose backend `statements.here` is
        self._held_out = b""
        self._held_in = b""

    # -- what the driver sends -----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self._started:
            self._take_startup(data)
            return
        if self._nothing_to_flush(data):
            return  # (a lease taken for it would wait for an answer that never comes, in transaction mode)
        if self._lone_begin(data):
            self._begin = data
            self._answer += BEGIN_ANSWER
            self.status = b"T"
            return
        if self._begin and data != message(b"X", b""):  # (a BEGIN and then nothing but goodbye: dropped)
            data = self._begin + data
            self._unseen += BEGIN_ANSWER
        self._begin = b""
        terminate = False
        ends: list[int] | None = [] if self.statements is not None else None
        messages = self._sent.feed(data, ends)
        for kind, _ in messages:
            if kind in ANSWERED_BY_READY:
                self.owed += 1
                self._unsynced = self._skipping = False
            elif kind in ANSWERED_AT_FLUSH:
                self._unsynced = not self._skipping
            elif kind in (COPY_DONE, COPY_FAIL):
                self.copy_in = False
            elif kind == FLUSH:
                # The server answers a Flush with what it has for the messages sent since the last
                # Sync; after a Sync (whose ReadyForQuery `owed` counts) it owes nothing more.
                self._flushed = self._flushed or self._unsynced
                self._unsynced = False
            elif kind == TERMINATE:
                terminate = True
        if ends is not None and not (terminate and len(messages) == 1):  # (a goodbye alone takes no lease)
            data = self._edit(data, messages, ends)
        if terminate:  # (always the driver's last message: the pooled connection stays open)
            data = data[:-5]
            self.closed = True
        if data:
            try:
                self.upstream.sendall(data)
            except OSError as exc:  # (a lent socket: the broker cut it, or the server closed it)
                raise UpstreamError(f"the lent socket failed: {exc}") from exc

    def _edit(self, data: bytes, messages: list[tuple[int, bytes]], ends: list[int]) -> bytes:
        """Transaction mode: the driver's whole messages as `statements` has them go to the server
        (a message not yet whole is held until it is)."""
        assert self.statements is not None and isinstance(self.upstream, (LeasedSocket, LentSocket))
        lease = self.upstream.current()
        if lease is not self._statements_lease:  # (a new lease: a backend that may have none)
            self.statements.new_backend()
            self._statements_lease = lease
        held = self._held_out
        data = held + data if held else data
        out, start = bytearray(), 0
        for (kind, _), end in zip(messages, ends, strict=True):
            stop = len(held) + end
            out += self.statements.sent(kind, data[start:stop])
            start = stop
        self._held_out = data[start:]
        return bytes(out)

    def _nothing_to_flush(self, data: bytes) -> bool:
        """The driver's whole message is a Flush, with nothing sent since the last answer (libpq
        sends one after a pipeline's Sync, and it may come on its own once that is answered)."""
        if self.owed or self._unsynced or self._begin or self._sent.partial or not data:
            return False
        return data == FLUSH_MESSAGE * (len(data) // 5)

    def _lone_begin(self, data: bytes) -> bool:
        """The driver's whole message is a BEGIN, between transactions, with nothing owed."""
        if self.status != b"I" or self.owed or self._begin or data[:1] != b"Q" or len(data) > 200:
            return False
        if self._sent.partial:  # (then these bytes are the rest of a message, not one of their own)
            return False
        return int.from_bytes(data[1:5], "big") + 1 == len(data) and LONE_BEGIN.fullmatch(data, 5) is not None

    def _take_startup(self, data: bytes) -> None:
        self._startup += data
        if len(self._startup) < 8:
            return
        (length,) = struct.unpack_from("!i", self._startup)
        if not 8 <= length <= MAX_STARTUP:
            raise PgLinkError("08P01", f"invalid startup packet length {length}")
        if len(self._startup) < length:
            return
        packet, rest = bytes(self._startup[:length]), bytes(self._startup[length:])
        self._startup.clear()
        (code,) = struct.unpack_from("!i", packet, 4)
        if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
            self._answer += b"N"  # (the link is in the driver's own process: nothing to encrypt)
        elif code == CANCEL_REQUEST_CODE and length == 16:
            self.cancel_key = struct.unpack_from("!ii", packet, 8)
            self.closed = True
        elif code >> 16 == PROTOCOL_VERSION >> 16:
            self._hello(startup_parameters(packet))
        else:
            raise PgLinkError("08P01", f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}")
        if rest:
            self.write(rest)

    def _hello(self, asked: dict[str, str]) -> None:
        """Answer a StartupMessage as the pool's server would, with this link's own BackendKeyData
        (a CancelRequest for it reaches the real backend through the broker)."""
        route = {**self.info, "pool": self.pool}
        startup_answer(route, asked, self.key)  # (another user or database: refused before a lease)
        if self._backend_pid and isinstance(self.upstream, LentSocket):
            self.key = (self.upstream.current().backend_pid or self.key[0], self.key[1])
        elif self._backend_pid:
            lease = self.broker.lease(self.pool, tag=self.tag, channel=self.channel)
            lease.settimeout(None)
            self.upstream = lease
            self.key = (lease.backend_pid or self.key[0], self.key[1])
        self._answer += startup_answer(route, asked, self.key)
        self._started = True

    def greeted(self, key: tuple[int, int]) -> None:
        """The driver's startup was answered elsewhere (the bridge's greeter), with `key`."""
        self.key = key
        self._started = True

    @property
    def started(self) -> bool:
        """The driver's startup is answered (or queued to be): from here on, it speaks to the server."""
        return self._started

    # -- what the driver reads -----------------------------------------------------------------

    def awaiting(self) -> bool:
        """The server (or the link) owes the driver an answer: read before waiting on the driver."""
        # (the answer to a BEGIN answered here already is owed the link, not the driver: it is read,
        # and taken out, with the next answer the driver waits for)
        owed = self.owed - bool(self._unseen)
        return bool(self._answer) or self._flushed or (owed > 0 and not self.copy_in)

    def read(self, size: int = DEFAULT_RECV) -> bytes:
        """At most `size` bytes of what the driver reads next: the link's own answers, else the
        server's (b"" once the pooled connection has closed)."""
        if size <= 0:
            return b""  # (pg8000 reads a message's empty body so)
        if not self._answer:
            self._fetch()
        data = bytes(self._answer[:size])
        del self._answer[:size]
        return data

    def _fetch(self) -> None:
        """The server's next answers: all it owes in one round trip when they are there at once."""
        self._flushed = False
        while not self._answer:
            upstream = self.upstream
            if isinstance(upstream, LentSocket):
                if not self._fetch_lent(upstream):
                    return  # (the server closed the connection)
                continue
            whole = self.owed > 0 and not self.copy_in  # (a ready read: all that is owed, at once)
            data = upstream.recv_ready(self.owed) if whole else upstream.recv()
            if not data:
                return  # (the pooled connection closed)
            statements = self.statements
            if (
                whole
                and len(data) < READY_CHUNK
                and data[-6:-1] == READY_HEAD
                and not self._received.partial
                and (statements is None or not statements.counting())
            ):
                # It stopped at the last ReadyForQuery owed (a COPY's start or the chunk would have
                # stopped it first): nothing in between needs walking.
                self.owed, self.status = 0, data[-1:]
                if statements is not None:
                    statements.all_answered()
            else:
                data = self._follow(data)
            self._take(data)

    def _take(self, data: bytes) -> None:
        """The server's answer, followed, as the driver is to read it."""
        if self._unseen:  # (the server's answer to a BEGIN answered here already)
            seen = min(len(self._unseen), len(data))
            if data[:seen] != self._unseen[:seen]:
                raise PgLinkError("08P01", f"the server did not answer BEGIN as expected: {data[:40]!r}")
            self._unseen, data = self._unseen[seen:], data[seen:]
        self._answer += data

    def _fetch_lent(self, upstream: LentSocket) -> bool:
        """The server's next bytes from the lent socket itself (False: it closed). In transaction
        mode the socket goes back as it reads the end of its transaction (when_done)."""
        try:
            data = upstream.recv(LENT_READ)
        except OSError as exc:  # (the broker cut it, or the server closed it)
            raise UpstreamError(f"the lent socket failed: {exc}") from exc
        if not data:
            return False
        self._take(self._follow(data))
        return True

    def _follow(self, data: bytes) -> bytes:
        """The server's messages, as they bear on what is owed and what the server waits for; what
        the driver is to see of them (transaction mode: not the answers to what the link added)."""
        statements = self.statements
        ends: list[int] | None = [] if statements is not None else None
        messages = self._received.feed(data, ends)
        for kind, body in messages:
            if kind == READY:
                self.owed -= 1
                self.status = body[:1]
            elif kind == COPY_IN:
                self.copy_in = True
            elif kind == ERROR and self.owed == 0:  # (an error in a group whose Sync is still to come)
                self._skipping = True
                self._unsynced = False
        if statements is None or ends is None:
            return data
        if not statements.hidden and not self._held_in:  # (nothing to cut out: only count)
            for kind, _ in messages:
                statements.answered(kind)
            return data
        held = self._held_in
        data = held + data if held else data
        out, start = bytearray(), 0
        for (kind, _), end in zip(messages, ends, strict=True):
            stop = len(held) + end
            if not statements.answered(kind):
                out += data[start:stop]
            start = stop
        if statements.hidden:  # (a message not yet whole may be one to cut out: held until it is)
            self._held_in = data[start:]
        else:
            out += data[start:]
            self._held_in = b""
        return bytes(out)

    def flush(self) -> None:
        """Send what the driver wrote that waits for no answer yet (COPY data, a pipeline)."""
        if not isinstance(self.upstream, LentSocket):  # (a lent socket's writes went at once)
            self.upstream.flush()

    # -- the end -------------------------------------------------------------------------------

    def cancel(self) -> bool:
        """Cancel what this connection's backend runs now (from another thread: libpq's cancel
        arrives on a connection of its own). A lazy lease's first exchange has no token until its
        first reply, which comes within FIRST_POLL: wait for it that long. False when it holds no
        lease, or nothing is running."""
        if isinstance(self.upstream, LentSocket):  # (a socket lease's token comes with its grant)
            lent = self.upstream.lease
            return lent is not None and self.broker.cancel(lent)
        deadline = time.monotonic() + 2 * FIRST_POLL + self.broker.broker_timeout
        while True:
            upstream = self.upstream
            lease = upstream.lease if isinstance(upstream, LeasedSocket) else upstream
            if lease.token is not None:
                return self.broker.cancel(lease)
            if lease.fresh or lease.released or time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    def close(self) -> None:
        """Give the lease back (the broker judges what was left: the reset, or a close)."""
        self.closed = True
        try:
            if isinstance(self.upstream, LentSocket):
                self.upstream.give_back()  # (with its session's verdict)
            else:
                self.upstream.close()
        except PoolBrokerError:
            pass  # (the lease is over anyway: the broker reclaims what it can't hear about)


class Pg8000Socket:
    """What pg8000's `sock=` takes: a socket whose file is a PgLink, in the caller's thread (no
    bridge, no thread). Give it `ssl_context=False`, or its SSLRequest is answered N."""

    def __init__(self, link: PgLink, on_close: Callable[[], None] | None = None) -> None:
        self.link = link
        self._on_close = on_close  # (gives the link's broker socket back, for the next connection)

    def sendall(self, data: bytes) -> None:
        self.link.write(bytes(data))

    def recv(self, size: int) -> bytes:
        return self.link.read(size)

    def makefile(self, mode: str = "rwb", *_: Any, **__: Any) -> Pg8000File:
        return Pg8000File(self.link)

    def settimeout(self, timeout: float | None) -> None:
        pass  # (the link's reads wait for the server; a statement_timeout bounds a query)

    def setsockopt(self, *args: Any) -> None:
        pass

    def close(self) -> None:
        self.link.close()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


class Pg8000File:
    """The binary file pg8000 reads and writes: writes go with the next read, as on a socket."""

    def __init__(self, link: PgLink) -> None:
        self.link = link

    def write(self, data: bytes) -> int:
        self.link.write(bytes(data))
        return len(data)

    def flush(self) -> None:
        if not self.link.awaiting():
            self.link.flush()  # (else what is held goes with the read that follows)

    def read(self, size: int) -> bytes:
        return self.link.read(size)

    def close(self) -> None:
        pass  # (the socket's close gives the lease back)
