"""Health probes: what to send on an upstream connection, and how to judge the answer (pure; what
a check is: checks.py). The server loop does the sending, reading and timing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import h11

from poolbroker.broker.decide.checks import MAX_REPLY, Check, LineCheck, ProbeFailed, line_checks
from poolbroker.broker.decide.protocols.postgres import QueryCheck
from poolbroker.broker.settings import PoolConfig

__all__ = ["MAX_REPLY", "Check", "HttpCheck", "LineCheck", "ProbeFailed", "ProbeSpec", "line_checks", "probe_spec"]


class HttpCheck:
    """One HTTP/1.1 request on the kept-alive connection; the whole response is read (h11 parses
    it: lengths, chunks, HEAD). Healthy: a status starting with `expect`, or below 500 if none, and
    a connection the server keeps open."""

    outgoing = b""

    def __init__(self, method: str, target: str, host: str, expect: str) -> None:
        self._args = (method, target, host, expect)
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

    def again(self) -> HttpCheck:
        return HttpCheck(*self._args)

    def _judge(self, status: int) -> None:
        healthy = str(status).startswith(self._expect) if self._expect else status < 500
        if not healthy:
            wanted = f"a status starting with {self._expect}" if self._expect else "a status below 500"
            raise ProbeFailed(f"the probe got HTTP status {status}, expected {wanted}")


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
    if kind == "postgres":
        return ProbeSpec("postgres", lambda: QueryCheck(""))  # an empty query, to its ReadyForQuery
    if kind == "redis":
        check = LineCheck(b"PING\r\n", b"+PONG")
    elif kind == "memcached":
        check = LineCheck(b"version\r\n", b"VERSION ")
    else:
        check = LineCheck(config.probe_send.encode(), config.probe_expect.encode())
    return ProbeSpec(kind, lambda: check)  # a line check keeps no state between runs
