"""One I/O operation on a lease, as pure decisions: what a request may ask, what is left to send,
what to take from the read buffer, and when the read is done or can never be.

The driver sends what `Exchange.send` holds, fills the connection's read buffer, and asks `take`
whether the read is satisfied; nothing here touches a socket or a clock (times are given).
"""

from __future__ import annotations

from typing import Generic

from poolbroker.broker.decide.leases import C, Lease, P, T
from poolbroker.wire.pgwire import READY_CHUNK
from poolbroker.wire.protocol import READ_ANY, READ_EXACTLY, READ_READY, ErrorCode, Request

READY, COPY_IN, COPY_BOTH = ord("Z"), ord("G"), ord("W")


class ReadFailed(Exception):
    """A read that can never be satisfied: `code` is its wire error code, the message says why."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def over_limits(req: Request, max_payload: int) -> str | None:
    """Why an exchange asks for more than one operation may carry (limit_exceeded), or None. The
    one check of a request's payload: sends and exact reads over max_payload are refused before
    anything goes upstream; `any` and `until` reads are clamped to it instead."""
    if req.read == READ_EXACTLY and req.n is not None and req.n > max_payload:
        return f"read exactly {req.n} bytes is over the limit of {max_payload} (max_payload)"
    if req.send is not None and len(req.send) > max_payload:
        return f"sending {len(req.send)} bytes in one operation is over the limit of {max_payload} (max_payload)"
    return None


class Exchange(Generic[P, C, T]):
    """One I/O operation on a lease: send, then read, then reply (and maybe release)."""

    __slots__ = (
        "lease",
        "peer",
        "rid",
        "send",
        "read",
        "n",
        "delim",
        "scanned",
        "found",
        "release",
        "first",
        "poll",
        "poll_now",
        "started",
        "timer",
    )

    def __init__(
        self, lease: Lease[P, C, T], peer: bytes, req: Request, first: bool, max_payload: int, now: float
    ) -> None:
        self.lease = lease
        self.peer = peer
        self.rid = req.id
        self.send: memoryview | None = memoryview(req.send) if req.send else None
        self.read = req.read
        # Reads are bounded by max_payload: `any` and `until` are clamped to it.
        self.n = min(req.n, max_payload) if req.n is not None else max_payload
        self.delim = req.delim
        self.scanned = 0  # how far an `until` read has searched the buffer for its delimiter (`ready`: walked)
        self.found = 0  # `ready`: the ReadyForQuery messages walked past
        self.release = req.release
        self.first = first  # the exchange carried by a lease request: its reply carries the token
        # A poll: nothing read within io_timeout is an empty answer, not an error (pub/sub waits).
        self.poll = req.poll
        self.poll_now = req.poll and req.io_timeout == 0.0  # take only what is there already
        if req.read == READ_READY:  # (its walk starts past the rest of a message a last piece cut)
            self.scanned = lease.ready_from
        self.started = now
        self.timer: T | None = None

    def sent(self, count: int) -> memoryview | None:
        """`count` more bytes went out: what is left to send (None once all of it has)."""
        assert self.send is not None
        self.send = self.send[count:] if count < len(self.send) else None
        return self.send

    def send_beside(self, data: bytes, max_payload: int) -> str | None:
        """A write that came while this exchange runs (a socket written by one task while another
        reads it): it goes after what this exchange still has to send. Why it can't (its sends
        would then be over max_payload), or None."""
        pending = len(self.send) if self.send is not None else 0
        if pending + len(data) > max_payload:
            return f"this lease's running exchange has {pending} bytes to send; {len(data)} more is over {max_payload}"
        self.send = memoryview(bytes(self.send) + data) if self.send is not None else memoryview(data)
        return None

    def take(self, buf: bytearray, eof: bool) -> bytes | None:
        """The read's answer taken from the front of `buf`, or None while more must arrive. Raises
        ReadFailed when the read can never be satisfied."""
        lease = self.lease
        if self.read == READ_READY:
            data, self.scanned, self.found = take_ready(buf, eof, self.n, self.scanned, self.found)
            if data is not None:
                lease.ready_from = self.scanned  # (the rest of a message this piece cut)
            return data
        data, self.scanned = take(buf, eof, self.read or READ_ANY, self.n, self.delim, self.scanned)
        if data and lease is not None and lease.ready_from:
            lease.ready_from = max(0, lease.ready_from - len(data))
        return data


def take_ready(buf: bytearray, eof: bool, wanted: int, walked: int, found: int) -> tuple[bytes | None, int, int]:
    """PostgreSQL's messages from the front of `buf` up to and including the `wanted`-th
    ReadyForQuery, or a CopyInResponse or CopyBothResponse (the server then waits for the
    client); or what has come once READY_CHUNK bytes have; or (None, how far the walk got, the
    ReadyForQuery passed) while more must arrive. `walked` starts where the messages start (past
    what a last piece left of a message). With data, the second value is where the next walk
    starts in what is left of `buf`."""
    end = len(buf)
    while walked + 5 <= end:
        length = int.from_bytes(buf[walked + 1 : walked + 5], "big")
        if length < 4:
            raise ReadFailed(ErrorCode.UPSTREAM_ERROR, f"not PostgreSQL's protocol: a message of length {length}")
        if walked + 1 + length > end:
            break
        kind = buf[walked]
        walked += 1 + length
        if kind == READY:
            found += 1
        if (kind == READY and found >= wanted) or kind in (COPY_IN, COPY_BOTH):
            data = bytes(buf[:walked])
            del buf[:walked]
            return data, 0, 0
    if end >= READY_CHUNK or (eof and buf):
        # A large result goes in pieces, each cut where the buffer ends (a message header split
        # there waits for the next piece, whole): the next read's walk starts past the rest of the
        # message in progress, which the walk can't take for a message's start.
        cut = walked if walked < end < walked + 5 and not eof else end
        if walked + 5 <= end:
            rest = walked + 1 + int.from_bytes(buf[walked + 1 : walked + 5], "big") - cut
        else:
            rest = max(0, walked - cut)
        data = bytes(buf[:cut])
        del buf[:cut]
        return data, rest, 0
    return (b"", 0, 0) if eof else (None, walked, found)


def take(buf: bytearray, eof: bool, mode: str, n: int, delim: bytes | None, scanned: int) -> tuple[bytes | None, int]:
    """Take what a read asks for from the front of `buf`, or (None, how far a delimiter search got).

    `n`: any: the most to return; exactly: the count; until: the most to scan. `eof`: the upstream
    closed its side, so nothing more will come. Raises ReadFailed when the read can never be
    satisfied.
    """
    if mode == READ_ANY:
        if buf:
            data = bytes(buf[:n])
            del buf[:n]
            return data, 0
        return (b"", 0) if eof else (None, 0)
    if mode == READ_EXACTLY:
        if len(buf) >= n:
            data = bytes(buf[:n])
            del buf[:n]
            return data, 0
        if eof:
            raise ReadFailed(ErrorCode.UPSTREAM_ERROR, f"upstream closed after {len(buf)} of {n} bytes")
        return None, 0
    assert delim is not None
    # Resume the search where the last one stopped, less a delimiter's length that may straddle.
    found = buf.find(delim, max(0, scanned - len(delim) + 1), n)
    if found >= 0:
        end = found + len(delim)
        data = bytes(buf[:end])
        del buf[:end]
        return data, 0
    if len(buf) >= n:
        raise ReadFailed(ErrorCode.LIMIT_EXCEEDED, f"no delimiter {delim!r} within {n} bytes")
    if eof:
        raise ReadFailed(
            ErrorCode.UPSTREAM_ERROR, f"upstream closed before delimiter {delim!r} ({len(buf)} bytes read)"
        )
    return None, len(buf)
