"""Health probes: what to send on an upstream connection, and how to judge the answer.

A check is pure: `request` is the bytes to send, and `read(buf)` consumes the reply from the read
buffer, returning False while more is needed and True once a good reply is complete, or raising
ProbeFailed. A check that is a dialogue (a database's login) queues what it answers in
`outgoing`, sent before reading on. The server loop does the sending, reading and timing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import h11

from poolbroker.broker.config import PoolConfig

MAX_REPLY = 64 * 1024  # a health reply larger than this is not a health reply


class ProbeFailed(Exception):
    """The probe's answer says the connection is not fit to use; the message says why."""


class Check(Protocol):
    request: bytes
    outgoing: bytes  # an answer to send before reading on (a dialogue's); taken by the driver

    def read(self, buf: bytearray) -> bool: ...


class LineCheck:
    """Send `request`; the answer is one line (up to b"\\n") that must start with `expect`."""

    outgoing = b""  # (one request, one answer: nothing more to say)

    def __init__(self, request: bytes, expect: bytes) -> None:
        self.request = request
        self.expect = expect

    def read(self, buf: bytearray) -> bool:
        end = buf.find(b"\n")
        if end < 0:
            if len(buf) > MAX_REPLY:
                raise ProbeFailed(f"no line end within {MAX_REPLY} bytes of the probe's answer")
            return False
        line = bytes(buf[: end + 1])
        del buf[: end + 1]
        if not line.startswith(self.expect):
            raise ProbeFailed(f"expected {self.expect!r}, got {line[:100]!r}")
        return True


class HttpCheck:
    """One HTTP/1.1 request on the kept-alive connection; the whole response is read (h11 parses
    it: lengths, chunks, HEAD). Healthy: a status starting with `expect`, or below 500 if none, and
    a connection the server keeps open."""

    outgoing = b""

    def __init__(self, method: str, target: str, host: str, expect: str) -> None:
        self._h11 = h11.Connection(h11.CLIENT)
        headers = [("Host", host), ("User-Agent", "poolbroker-probe")]
        self.request = self._h11.send(h11.Request(method=method, target=target, headers=headers)) or b""
        self.request += self._h11.send(h11.EndOfMessage()) or b""
        self._expect = expect
        self._size = 0

    def read(self, buf: bytearray) -> bool:
        self._size += len(buf)
        if self._size > MAX_REPLY:
            raise ProbeFailed(f"the probe's HTTP response is over {MAX_REPLY} bytes")
        if not buf:
            return False  # (to h11, empty data means the peer closed)
        self._h11.receive_data(bytes(buf))
        del buf[:]
        try:
            while True:
                event = self._h11.next_event()
                if event is h11.NEED_DATA:
                    return False
                if isinstance(event, h11.Response):
                    self._judge(event.status_code)
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise ProbeFailed("the server closed the connection during the probe")
        except h11.RemoteProtocolError as exc:
            raise ProbeFailed(f"the probe's HTTP response is malformed: {exc}") from None
        if self._h11.their_state is not h11.DONE:  # MUST_CLOSE: "Connection: close" or HTTP/1.0
            raise ProbeFailed("the server does not keep the connection open after a response")
        if self._h11.trailing_data[0]:
            raise ProbeFailed("bytes after the probe's HTTP response: out of sync")
        return True

    def _judge(self, status: int) -> None:
        healthy = str(status).startswith(self._expect) if self._expect else status < 500
        if not healthy:
            wanted = f"a status starting with {self._expect}" if self._expect else "a status below 500"
            raise ProbeFailed(f"the probe got HTTP status {status}, expected {wanted}")


def line_checks(steps: tuple[tuple[str, str], ...]) -> list[Check]:
    """A pool's on_connect or reset steps as checks: send the text, one line must start with expect."""
    return [LineCheck(send.encode(), expect.encode()) for send, expect in steps]


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    """A pool's probe: its name for logs, and a fresh check for each run."""

    name: str
    new_check: Callable[[], Check]


def probe_spec(config: PoolConfig) -> ProbeSpec | None:
    """The pool's send/expect probe, or None for `tcp` (open and nothing unread, seen at once)."""
    kind = config.probe
    if kind == "tcp":
        return None
    if kind == "http":
        method, target, *_ = (config.probe_send or "HEAD / HTTP/1.1").split()
        host = config.host if config.port == 80 else config.address
        return ProbeSpec(f"http {method} {target}", lambda: HttpCheck(method, target, host, config.probe_expect))
    if kind == "redis":
        check = LineCheck(b"PING\r\n", b"+PONG")
    elif kind == "memcached":
        check = LineCheck(b"version\r\n", b"VERSION ")
    else:
        check = LineCheck(config.probe_send.encode(), config.probe_expect.encode())
    return ProbeSpec(kind, lambda: check)  # a line check keeps no state between runs
