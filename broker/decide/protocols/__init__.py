"""What each upstream protocol means for a pool: its handshake, its reset, and what a holder may
leave on a connection. Pure: checks and verdicts, no sockets.

| protocol  | handshake (on each new connection)  | when a lease ends                                  |
|-----------|-------------------------------------|----------------------------------------------------|
| redis     | RESET (when the reset uses it),     | RESET + handshake if a command changed the session |
|           | AUTH, SELECT, CLIENT SETNAME (from  | closed if a command or reply was left half way     |
|           | username, password, db...), PING    |                                                    |
|           | (-LOADING or -BUSY: not ready yet)  |                                                    |
| http      | none                                | closed if a request or response was left half way  |
| memcached | none                                | as it is (memcached keeps no session)              |
| postgres  | StartupMessage and login (trust,     | session mode: ROLLBACK, then DISCARD ALL, always;  |
|           | password, md5, SCRAM-SHA-256;       | transaction mode: only if a transaction was left   |
|           | 57P03 starting up: not ready yet)   | open or the session changed; closed if a message   |
|           |                                     | was left half way or answers are owed              |
| tcp       | none                                | as it is: the broker can't see a session in bytes  |

A pool's own `on_connect` steps replace the handshake; its `reset` setting chooses: "auto" (the
protocol's reset, only when needed), "off", "discard", or steps run on every clean return.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from poolbroker.broker.decide.checks import Check, line_checks
from poolbroker.broker.decide.protocols import postgres, redis
from poolbroker.broker.settings import RESET_AUTO, RESET_DISCARD, RESET_OFF, PoolConfig
from poolbroker.sessions.http import HttpSession
from poolbroker.sessions.over import conversation_over
from poolbroker.sessions.postgres import PostgresSession
from poolbroker.sessions.redis import RedisSession
from poolbroker.sessions.verdict import CLEAN, OUT_OF_SYNC, RESET, Session
from poolbroker.wire.protocol import SESSION_CLEAN, SESSION_OUT_OF_SYNC

# What to do with a connection whose lease ended cleanly as far as its socket can tell.
KEEP = "keep"  # back to the idle queue
RUN_RESET = "reset"  # run the reset checks first; back only if they pass
CLOSE = "close"  # close it, for the reason given


@dataclass(frozen=True, slots=True)
class Return:
    action: str  # KEEP, RUN_RESET or CLOSE
    reason: str = ""  # CLOSE: the connections_closed_<reason> counter
    why: str = ""  # for the log line


@dataclass(frozen=True, slots=True)
class PoolProtocol:
    """A pool's protocol, with its settings applied."""

    name: str
    handshake: tuple[Check, ...]  # run on each new connection, pipelined when `pipelined`
    reset: tuple[Check, ...]  # run when a lease ends and the session needs it
    reset_mode: str  # auto, off, discard or steps
    new_session: Callable[[], Session] | None  # None: nothing to follow in the stream
    transaction_mode: bool = False  # postgres: a connection at rest between transactions needs no reset

    @property
    def pipelined(self) -> bool:
        """The steps may all go at once: Redis and PostgreSQL answer in order (one round trip)."""
        return self.name in ("redis", "postgres")

    @property
    def reset_always(self) -> bool:
        """The reset runs on every clean return: the pool's own steps, or PostgreSQL's in session
        mode (a SET inside a function is invisible in the stream: only a reset is sure)."""
        return self.reset_mode == "steps" or (
            self.name == "postgres" and self.reset_mode == RESET_AUTO and not self.transaction_mode
        )

    def before_tls(self) -> list[Check]:
        """What goes on the plain connection before the TLS handshake: PostgreSQL's SSLRequest."""
        return [postgres.SslRequest()] if self.name == "postgres" else []

    def handshake_run(self) -> list[Check]:
        """The handshake's checks for one new connection (a login keeps state: made anew)."""
        return [check.again() for check in self.handshake]

    def reset_run(self) -> list[Check]:
        return [check.again() for check in self.reset]

    @property
    def protects(self) -> bool:
        """A holder's session never reaches the next holder: memcached and http keep none, redis's
        is reset, a tcp pool's is unknown to the broker unless its own steps or discard handle it."""
        return self.reset_mode in (RESET_DISCARD, "steps") or (self.name != "tcp" and self.reset_mode != RESET_OFF)

    def conversation_over(self, session: Session | None) -> bool:
        """A lease asked to end "when done" ends now (poolbroker.sessions.over)."""
        return conversation_over(session)

    def on_return(self, session: Session | None) -> Return:
        """Decide what a clean return (no failed I/O, nothing unread) does with the connection."""
        outcome, why = session.verdict() if session is not None else (CLEAN, "")
        if outcome is OUT_OF_SYNC:
            return Return(CLOSE, "out_of_sync", why)
        if self.reset_mode == RESET_DISCARD:
            return Return(CLOSE, "reset", "the pool's reset is discard")
        if self.reset_always or (outcome is RESET and self.reset_mode == RESET_AUTO):
            return Return(RUN_RESET, why=why)
        return Return(KEEP)

    def on_lent_return(self, reported: str | None) -> Return:
        """Decide what a lent socket's clean return does: the broker saw none of its bytes, so it
        goes by what the holder's client reports of its session (None: nothing, so unknown)."""
        if reported == SESSION_OUT_OF_SYNC:
            return Return(CLOSE, "out_of_sync", "its holder reports it left mid-message or with answers owed")
        if self.reset_mode == RESET_DISCARD:
            return Return(CLOSE, "reset", "the pool's reset is discard")
        if reported == SESSION_CLEAN and not self.reset_always:
            return Return(KEEP)
        if self.reset:  # changed, or not known: the reset makes it as handed out, and proves it in sync
            why = "its holder reports a session change" if reported else "a lent socket's session is not known"
            return Return(RUN_RESET, why=why)
        if reported is None and self.name == "http":  # (no reset to prove a stream in step)
            return Return(CLOSE, "out_of_sync", "a lent http connection's place in its stream is not known")
        return Return(KEEP)  # nothing to reset: memcached, or a pool whose reset is off


# The protocols whose stream the broker follows, and how it follows each.
SESSIONS: dict[str, Callable[[], Session]] = {
    "redis": RedisSession,
    "http": HttpSession,
    "postgres": PostgresSession,
}


def pool_protocol(config: PoolConfig) -> PoolProtocol:
    """The protocol a pool's config names, with its handshake and reset built from its settings."""
    handshake: list[Check]
    if config.on_connect:
        handshake = line_checks(config.on_connect)
    elif config.protocol == "redis":
        handshake = redis.handshake(config)
    elif config.protocol == "postgres":
        handshake = [postgres.login(config)]
    else:
        handshake = []
    reset: list[Check] = []
    if isinstance(config.reset, tuple):
        reset, mode = line_checks(config.reset), "steps"
    else:
        mode = config.reset
        if config.protocol == "redis" and mode == RESET_AUTO:
            reset = redis.reset(handshake)
        elif config.protocol == "postgres" and mode == RESET_AUTO:
            reset = postgres.reset()
    if config.protocol == "redis":
        handshake = redis.on_connect(handshake, resets=mode == RESET_AUTO)
    return PoolProtocol(
        name=config.protocol,
        handshake=tuple(handshake),
        reset=tuple(reset),
        reset_mode=mode,
        new_session=SESSIONS.get(config.protocol),
        transaction_mode=config.protocol == "postgres" and config.pool_mode == "transaction",
    )


__all__ = ["CLOSE", "KEEP", "RUN_RESET", "PoolProtocol", "Return", "pool_protocol"]
