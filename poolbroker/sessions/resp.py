"""RESP (the Redis protocol), read incrementally: where each value ends in a byte stream.

The broker sees every byte a holder sends and every byte it reads back. `RespReader` counts the
whole values in either stream without building them: bulk strings are skipped by their length, so
a 1 MiB SET costs what its header costs. On the request side it also keeps each command's name and
first argument (all that decides whether a command changes the session). Inline commands
(`PING\\r\\n`, as telnet or a line-based client sends them) are read on the request side too.
"""

from __future__ import annotations

MAX_LINE = 64 * 1024  # a RESP header or inline command longer than this is not RESP
MAX_HEAD = 64  # a command name or subcommand longer than this is kept as b"" (no such command)
_AGGREGATES = frozenset(b"*~>")  # array, set, push: n values follow
_PAIRS = frozenset(b"%|")  # map, attribute: n pairs follow
_BLOBS = frozenset(b"$=!")  # bulk string, verbatim string, blob error: n bytes follow
_LINES = frozenset(b"+-:_,#(")  # simple string, error, integer, null, double, boolean, big number
_OUT_OF_BAND = frozenset(b">|")  # push, attribute: values no command asked for
_CRLF = b"\r\n"


class RespError(Exception):
    """The stream is not RESP: nothing more can be said about where its values end."""


def encode_command(*args: str | bytes) -> bytes:
    """A command as a RESP array of bulk strings (safe for any bytes, spaces in a password too)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def value_end(buf: bytes | bytearray, at: int = 0, depth: int = 0) -> int | None:
    """Where the RESP value that starts at `at` ends, or None while it has not all arrived (for
    small answers read whole: a handshake's)."""
    end = buf.find(_CRLF, at)
    if end < 0:
        return None
    kind = buf[at]
    if kind in _LINES:
        return end + 2
    if kind in _BLOBS:
        length = int(buf[at + 1 : end])
        stop = end + 2 + (length + 2 if length >= 0 else 0)
        return stop if stop <= len(buf) else None
    if kind in _AGGREGATES or kind in _PAIRS:
        if depth >= 64:
            raise RespError("values nested over 64 deep")
        next_at: int | None = end + 2
        for _ in range(int(buf[at + 1 : end]) * (2 if kind in _PAIRS else 1)):
            next_at = value_end(buf, next_at, depth + 1)  # type: ignore[arg-type]
            if next_at is None:
                return None
        return next_at
    raise RespError(f"{chr(kind)!r} does not start a RESP value")


class RespReader:
    """Counts whole RESP values in a stream fed in pieces.

    `values` is how many have ended, RESP3's out-of-band values apart: a push (`>`: a pub/sub
    message, a tracking invalidation) or an attribute (`|`, which only precedes a reply) counts in
    `pushes` instead, since no command asked for it. On a request stream (`commands=True`), `heads` gets, for each
    command that ended, its name and first argument as sent (missing ones are b""); the caller
    takes them. `partial` says the stream stopped in the middle of a value. After a RespError the
    reader stays failed (`error` says why) and counts nothing more.
    """

    __slots__ = ("values", "pushes", "heads", "error", "_commands", "_pending", "_skip", "_stack", "_head", "_top")

    def __init__(self, *, commands: bool) -> None:
        self.values = 0
        self.pushes = 0
        self.heads: list[tuple[bytes, bytes]] = []
        self.error = ""
        self._commands = commands
        self._pending = b""  # the start of a line whose end has not arrived
        self._skip = 0  # bytes of a bulk string (and its CRLF) still to come
        self._stack: list[int] = []  # values still owed by each open aggregate, innermost last
        self._head: list[bytes] = []  # the current command's name and first argument so far
        self._top = 0  # the kind of the top-level value under way

    @property
    def partial(self) -> bool:
        return bool(self._pending or self._skip or self._stack)

    def feed(self, data: bytes | memoryview) -> None:
        if self.error:
            return
        if self._skip:  # the middle of a bulk string: skip what belongs to it without copying
            size = len(data)
            if size <= self._skip:
                self._skip -= size
                if not self._skip:
                    self._ended()
                return
            data = data[self._skip :]
            self._skip = 0
            self._ended()
        buf = self._pending + data if self._pending else bytes(data)
        self._pending = b""
        try:
            self._parse(buf)
        except (RespError, ValueError) as exc:  # ValueError: a length that is not a number
            self.error = str(exc) or "a malformed length"

    def _parse(self, buf: bytes) -> None:
        at, size = 0, len(buf)
        while at < size:
            kind = buf[at]
            if self._commands and not self._stack and kind != 0x2A:  # not "*": an inline command
                line_end = buf.find(b"\n", at)
                if line_end < 0:
                    self._keep(buf, at)
                    return
                words = buf[at:line_end].split()
                at = line_end + 1
                if words:  # (Redis skips blank lines)
                    self._head = [w if len(w) <= MAX_HEAD else b"" for w in words[:2]]
                    self._ended()
                continue
            end = buf.find(_CRLF, at)
            if end < 0:
                self._keep(buf, at)
                return
            if not self._stack:
                self._top = kind
            if kind in _BLOBS:
                length = int(buf[at + 1 : end])
                start, at = at, end + 2
                if length < 0:  # a null bulk string
                    self._ended()
                    continue
                if at + length + 2 > size:  # its bytes run past this piece
                    if self._head_wanted():
                        if length <= MAX_HEAD:  # a name: wait for all of it
                            self._keep(buf, start)
                            return
                        self._head.append(b"")  # (a name this long is no command we know)
                    self._skip = at + length + 2 - size  # skip them as they come, unkept
                    return
                if self._head_wanted():
                    self._head.append(buf[at : at + length] if length <= MAX_HEAD else b"")
                at += length + 2
                self._ended()
            elif kind in _AGGREGATES or kind in _PAIRS:
                count = int(buf[at + 1 : end]) * (2 if kind in _PAIRS else 1)
                at = end + 2
                if count <= 0:  # a null or empty aggregate is a whole value
                    self._ended()
                elif len(self._stack) >= 64:
                    raise RespError("values nested over 64 deep")
                else:
                    self._stack.append(count)
            elif kind in _LINES:
                at = end + 2
                self._ended()
            else:
                raise RespError(f"{chr(kind)!r} does not start a RESP value")

    def _keep(self, buf: bytes, at: int) -> None:
        if len(buf) - at > MAX_LINE:
            raise RespError(f"no line end within {MAX_LINE} bytes")
        self._pending = buf[at:]

    def _head_wanted(self) -> bool:
        return self._commands and len(self._stack) == 1 and len(self._head) < 2

    def _ended(self) -> None:
        """A value ended: it completes its aggregates, up to a whole top-level value."""
        stack = self._stack
        while stack:
            stack[-1] -= 1
            if stack[-1]:
                return
            stack.pop()
        if not self._commands and self._top in _OUT_OF_BAND:
            self.pushes += 1
            return
        self.values += 1
        if self._commands:
            head = self._head
            self.heads.append((head[0] if head else b"", head[1] if len(head) > 1 else b""))
            self._head = []
