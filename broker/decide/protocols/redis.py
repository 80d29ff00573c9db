"""Redis: the handshake built from a pool's settings, and the reset. (What a holder's commands
leave on the session is poolbroker.sessions.redis's, shared with the clients' socket leases.)"""

from __future__ import annotations

from poolbroker.broker.decide.checks import MAX_REPLY, Check, LineCheck, ProbeFailed
from poolbroker.broker.settings import PoolConfig
from poolbroker.sessions.resp import RespError, encode_command, value_end


class Hello3:
    """HELLO 3: the connection speaks RESP3 from here on. Its answer, a map (server, version,
    proto...), is read whole; an error fails the connect (Redis before 6.0 has no HELLO)."""

    outgoing = b""
    request = encode_command("HELLO", "3")

    def again(self) -> Hello3:
        return self  # (it keeps no state between runs)

    def read(self, buf: bytearray) -> bool:
        if bytes(buf[:1]) in (b"-", b"!"):
            line = bytes(buf[: buf.find(b"\n") + 1 or 100])
            raise ProbeFailed(f"HELLO 3 refused ({line.strip()[:100]!r}): the server speaks RESP2 only: set resp = 2")
        try:
            end = value_end(buf)
        except (RespError, ValueError) as exc:
            raise ProbeFailed(f"HELLO 3: not RESP: {exc}") from None
        if end is None:
            if len(buf) > MAX_REPLY:
                raise ProbeFailed(f"HELLO 3: no whole answer within {MAX_REPLY} bytes")
            return False
        if bytes(buf[:1]) != b"%":
            raise ProbeFailed(f"HELLO 3: expected a map, got {bytes(buf[:40])!r}")
        del buf[:end]
        return True


def handshake(config: PoolConfig) -> list[Check]:
    """AUTH, HELLO 3 (a RESP3 pool), SELECT and CLIENT SETNAME from the pool's settings, as the
    pool asks for them."""
    checks: list[Check] = []
    if config.password:
        user = (config.username,) if config.username else ()
        checks.append(LineCheck(encode_command("AUTH", *user, config.password), b"+OK"))
    if config.resp == 3:  # (after AUTH: a server with a password refuses HELLO before it)
        checks.append(Hello3())
    if config.db:
        checks.append(LineCheck(encode_command("SELECT", str(config.db)), b"+OK"))
    if config.client_name:
        checks.append(LineCheck(encode_command("CLIENT", "SETNAME", config.client_name), b"+OK"))
    return checks


# RESET arrived in Redis 6.2: an older server answers "-ERR unknown command".
NEEDS_RESET = (
    " (a redis pool resets sessions with RESET, which needs Redis 6.2 or later: upgrade the server,"
    ' or set the pool\'s reset = "discard", or reset steps of its own)'
)


def on_connect(handshake: list[Check], resets: bool) -> list[Check]:
    """What a new connection runs, pipelined in one round trip: RESET first when the pool's reset
    will use it (so a server without it fails at its first connection, saying so; on a new
    connection it changes nothing), the handshake, then PING: a Redis still loading its data
    answers -LOADING, and the connection is not handed out until it answers +PONG."""
    first = [LineCheck(encode_command("RESET"), b"+RESET", hint=NEEDS_RESET)] if resets else []
    return [*first, *handshake, LineCheck(encode_command("PING"), b"+PONG", not_ready=(b"-LOADING", b"-BUSY"))]


def reset(handshake: list[Check]) -> list[Check]:
    """RESET (out of MULTI, WATCH, pub/sub, tracking; back to db 0, the default user, no name),
    then the pool's handshake again."""
    return [LineCheck(encode_command("RESET"), b"+RESET"), *handshake]
