"""What a check is: the unit of a probe, a handshake and a reset (pure).

`request` is the bytes to send, and `read(buf)` consumes the reply from the read buffer, returning
False while more is needed and True once a good reply is complete, or raising ProbeFailed. A check
that is a dialogue (a database's login) queues what it answers in `outgoing`, which the driver
sends before reading on. `again()` is the check for a new run: itself when it keeps no state.
"""

from __future__ import annotations

from typing import Protocol

MAX_REPLY = 64 * 1024  # a health reply larger than this is not a health reply


class ProbeFailed(Exception):
    """The check's answer says the connection is not fit to use; the message says why."""


class NotReady(ProbeFailed):
    """The server answered, but can't serve yet (Redis loading its data, PostgreSQL starting up):
    a connect that fails so is retried, and the requests waiting for it wait on."""


class Check(Protocol):
    request: bytes
    outgoing: bytes  # an answer to send before reading on (a dialogue's); taken by the driver

    def read(self, buf: bytearray) -> bool: ...

    def again(self) -> Check: ...


class LineCheck:
    """Send `request`; the answer is one line (up to b"\\n") that must start with `expect`. An
    answer starting with one of `not_ready` is NotReady; `hint` follows any other wrong answer."""

    outgoing = b""  # (one request, one answer: nothing more to say)

    def __init__(self, request: bytes, expect: bytes, not_ready: tuple[bytes, ...] = (), hint: str = "") -> None:
        self.request = request
        self.expect = expect
        self.not_ready = not_ready
        self.hint = hint

    def again(self) -> LineCheck:
        return self  # (it keeps no state between runs)

    def read(self, buf: bytearray) -> bool:
        end = buf.find(b"\n")
        if end < 0:
            if len(buf) > MAX_REPLY:
                raise ProbeFailed(f"no line end within {MAX_REPLY} bytes of the probe's answer")
            return False
        line = bytes(buf[: end + 1])
        del buf[: end + 1]
        if not line.startswith(self.expect):
            if self.not_ready and line.startswith(self.not_ready):
                raise NotReady(f"not ready: {line.strip()[:100].decode(errors='replace').lstrip('-')}")
            raise ProbeFailed(f"expected {self.expect!r}, got {line[:100]!r}{self.hint}")
        return True


def line_checks(steps: tuple[tuple[str, str], ...]) -> list[Check]:
    """A pool's on_connect or reset steps as checks: send the text, one line must start with expect."""
    return [LineCheck(send.encode(), expect.encode()) for send, expect in steps]
