"""What a Redis holder's commands leave on its connection's session.

A lease's `RedisSession` reads the commands the holder sends and the replies it reads back. When
the lease ends it says whether the connection can go straight back (nothing sent changed the
session), needs the reset (`RESET`, then the handshake again), or must be closed (a command half
sent, a reply not read: the stream is out of step, and no reset can be trusted on it).
"""

from __future__ import annotations

from poolbroker.sessions.resp import RespReader
from poolbroker.sessions.verdict import CLEAN, RESET, Verdict, out_of_sync

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
