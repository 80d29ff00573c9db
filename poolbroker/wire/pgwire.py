"""PostgreSQL's wire protocol (3.0) as both sides of poolbroker follow it: the broker's session
tracker and the worker's bridge split a stream into messages with `Frames`. Pure: bytes in,
messages out, no sockets.

Every message after the startup is a type byte, a 4-byte length (itself included), a body.
"""

from __future__ import annotations

import struct

PROTOCOL_VERSION = 196608  # 3.0
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

# A `ready` read (the broker's, for PostgreSQL pools) answers with what has come once this much
# has, whole messages or not: a large result goes to the client in pieces rather than all buffered.
READY_CHUNK = 256 * 1024
READY_HEAD = b"Z\0\0\0\x05"  # a ReadyForQuery's type and length: its status byte follows

# Frontend messages that the server answers with a ReadyForQuery: a simple Query, a Sync that ends
# an extended-protocol batch, a FunctionCall.
ANSWERED_BY_READY = frozenset(b"QSF")


# The prefix of the names the worker's link gives the statements a driver prepares in transaction
# mode (poolbroker/postgres/_statements.py): named after their content, and prepared again by the link
# before use on any backend, so one left on a connection changes nothing for the next holder.
SHARED_STATEMENT = b"pb_"


def message(kind: bytes, payload: bytes) -> bytes:
    """A message: its type byte, its length (itself included), its payload."""
    return kind + struct.pack("!i", len(payload) + 4) + payload


def query(sql: str) -> bytes:
    return message(b"Q", sql.encode() + b"\0")


def cancel_request(pid: int, secret: int) -> bytes:
    """The CancelRequest a new connection sends instead of a StartupMessage, then closes."""
    return struct.pack("!iiii", 16, CANCEL_REQUEST_CODE, pid, secret)


class Frames:
    """One direction of a stream, split into messages as its bytes arrive, in pieces of any size.
    `feed` returns each completed message's type (an int) and, for the types in `keep`, its body
    (up to `limit` bytes: `cut` turns true when one was longer); other bodies are skipped, never
    buffered. Given `ends`, it appends where in `data` each of those messages ended. `partial` is
    true in the middle of a message; `error` says why the bytes are not PostgreSQL's (and nothing
    more is taken)."""

    __slots__ = ("keep", "limit", "cut", "error", "_head", "_kind", "_left", "_body")

    def __init__(self, keep: bytes = b"", limit: int = 1 << 16) -> None:
        self.keep = frozenset(keep)
        self.limit = limit
        self.cut = False
        self.error = ""
        self._head = bytearray()  # a header that arrived in pieces
        self._kind = 0
        self._left = 0  # body bytes still to come
        self._body: bytearray | None = None

    @property
    def partial(self) -> bool:
        return bool(self._head) or self._left > 0

    def feed(self, data: bytes | memoryview, ends: list[int] | None = None) -> list[tuple[int, bytes]]:
        done: list[tuple[int, bytes]] = []
        if self.error:
            return done
        view = memoryview(data)
        at, end = 0, len(view)
        keep, limit = self.keep, self.limit
        while at < end:
            if not self._left and not self._head and end - at >= 5:
                # A whole header at hand (the common case): whole messages go by without copies.
                kind, length = view[at], int.from_bytes(view[at + 1 : at + 5], "big")
                if length < 4:
                    self.error = f"a message of length {length}"
                    break
                stop = at + 1 + length
                if stop <= end:
                    if kind in keep:
                        self.cut = self.cut or length - 4 > limit
                        done.append((kind, bytes(view[at + 5 : min(stop, at + 5 + limit)])))
                    else:
                        done.append((kind, b""))
                    at = stop
                    if ends is not None:
                        ends.append(at)
                    continue
                self._kind, self._left = kind, length - 4
                self._body = bytearray() if kind in keep else None
                at += 5
                continue
            if self._left:
                take = min(self._left, end - at)
                body = self._body
                if body is not None:
                    room = limit - len(body)
                    body += view[at : at + min(take, room)]
                    self.cut = self.cut or take > room
                at += take
                self._left -= take
                if not self._left:
                    done.append((self._kind, bytes(body) if body is not None else b""))
                    self._body = None
                    if ends is not None:
                        ends.append(at)
                continue
            take = min(5 - len(self._head), end - at)
            self._head += view[at : at + take]
            at += take
            if len(self._head) < 5:
                break
            kind, length = self._head[0], int.from_bytes(self._head[1:5], "big")
            self._head.clear()
            if length < 4:
                self.error = f"a message of length {length}"
                break
            self._kind, self._left = kind, length - 4
            self._body = bytearray() if kind in keep else None
            if not self._left:
                done.append((kind, b""))
                self._body = None
                if ends is not None:
                    ends.append(at)
        return done
