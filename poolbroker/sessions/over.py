"""When a conversation is over: what ends a lease asked to end "when done", on the relay (the
broker follows the stream) and on a socket lease (its client does)."""

from __future__ import annotations

from poolbroker.sessions.postgres import PostgresSession
from poolbroker.sessions.verdict import CLEAN, Session


def conversation_over(session: Session | None) -> bool:
    """Every command has its answer and the session is as it was handed out (PostgreSQL: between
    transactions, whatever the reset must undo). A stream nobody follows (tcp, memcached: None)
    can't tell, and never ends one early."""
    if isinstance(session, PostgresSession):
        return session.at_rest()
    return session is not None and session.verdict()[0] is CLEAN
