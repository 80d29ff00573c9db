"""Redis: the handshake built from a pool's settings, the reset, and what a holder's commands leave.

A lease's `RedisSession` reads the commands the holder sends and the replies it reads back. When
the lease ends it says whether the connection can go straight back (nothing sent changed the
session), needs the reset (`RESET`, then the handshake again), or must be closed (a command half
sent, a reply not read: the stream is out of step, and no reset can be trusted on it).
"""

from __future__ import annotations

from poolbroker.broker.decide.checks import MAX_REPLY, Check, LineCheck, ProbeFailed
from poolbroker.broker.decide.protocols.resp import RespError, RespReader, encode_command, value_end
from poolbroker.broker.decide.protocols.session import CLEAN, RESET, Verdict, out_of_sync
from poolbroker.broker.settings import PoolConfig

# Commands after which the connection's session is no longer the pool's: the reset must run.
SESSION_COMMANDS = frozenset(
    {
        b"AUTH",  # another user
        b"HELLO",  # RESP3, another user, a name
        b"SELECT",  # another database
        b"SUBSCRIBE",  # subscribed: only pub/sub commands are allowed
        b"PSUBSCRIBE",
        b"SSUBSCRIBE",
        b"UNSUBSCRIBE",
        b"PUNSUBSCRIBE",
        b"SUNSUBSCRIBE",
        b"MONITOR",  # every command of the server streams to it
        b"READONLY",  # cluster: reads from a replica
        b"READWRITE",
        b"ASKING",
        b"RESET",
        b"SYNC",  # the connection becomes a replication stream
        b"PSYNC",
        b"REPLCONF",
    }
)
SUBSCRIBING = frozenset({b"SUBSCRIBE", b"PSUBSCRIBE", b"SSUBSCRIBE", b"MONITOR", b"SYNC", b"PSYNC"})
# CLIENT subcommands that leave the session as it was; every other one (SETNAME, SETINFO, TRACKING,
# CACHING, REPLY, NO-EVICT, NO-TOUCH, and any new one) calls for the reset.
CLIENT_HARMLESS = frozenset(
    {b"ID", b"INFO", b"LIST", b"GETNAME", b"GETREDIR", b"TRACKINGINFO", b"HELP", b"KILL", b"PAUSE", b"UNPAUSE"}
)


class RedisSession:
    """What one lease's commands did to its connection's session (see the module's docstring)."""

    __slots__ = ("_commands", "_replies", "changed", "multi", "watching", "subscribed")

    def __init__(self) -> None:
        self._commands = RespReader(commands=True)
        self._replies = RespReader(commands=False)
        self.changed = b""  # the first command sent that changes the session
        self.multi = False  # a MULTI without its EXEC or DISCARD
        self.watching = False  # a WATCH without EXEC, DISCARD or UNWATCH
        self.subscribed = False  # replies may come without commands (pub/sub messages, MONITOR)

    def sent(self, data: bytes | memoryview) -> None:
        commands = self._commands
        commands.feed(data)
        if commands.heads:
            for name, first in commands.heads:
                self._command(name.upper(), first)
            commands.heads.clear()

    def received(self, data: bytes) -> None:
        self._replies.feed(data)

    def _command(self, name: bytes, first: bytes) -> None:
        if name in SESSION_COMMANDS:
            self.changed = self.changed or name
            self.subscribed = self.subscribed or name in SUBSCRIBING
        elif name == b"CLIENT":
            if first.upper() not in CLIENT_HARMLESS:
                self.changed = self.changed or b"CLIENT " + first.upper()
        elif name == b"MULTI":
            self.multi = True
        elif name in (b"EXEC", b"DISCARD"):
            self.multi = self.watching = False
        elif name == b"WATCH":
            self.watching = True
        elif name == b"UNWATCH":
            self.watching = False

    def verdict(self) -> Verdict:
        commands, replies = self._commands, self._replies
        if commands.error or replies.error:
            return out_of_sync(f"not Redis protocol: {commands.error or replies.error}")
        if commands.partial:
            return out_of_sync("a command was left half sent")
        if replies.partial:
            return out_of_sync("a reply was left half read")
        if not self.subscribed and replies.values != commands.values:
            unread = commands.values - replies.values
            return out_of_sync(f"{unread} of {commands.values} replies not read")
        if self.changed:
            return RESET, f"it sent {self.changed.decode(errors='replace')}"
        if self.multi:
            return RESET, "a MULTI without EXEC or DISCARD"
        if self.watching:
            return RESET, "a WATCH still in force"
        return CLEAN, ""


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
