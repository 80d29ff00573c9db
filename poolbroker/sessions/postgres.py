"""PostgreSQL: what a holder's messages leave on a connection.

A lease's `PostgresSession` follows both streams: the frontend messages the holder sends (Query,
Parse, Sync...) and the backend's answers (ReadyForQuery and its transaction status). When the
lease ends it says whether the connection is at rest (every ReadyForQuery owed has been read, no
transaction open, nothing the broker saw changed the session), needs the reset (a transaction left
open or failed, a SET, a temporary table, a named prepared statement, a session advisory lock,
LISTEN...), or must be closed (a message half sent or half read, answers still owed).

What it reads in SQL is what a statement says on its face: a SET run inside a function, or a
function that takes a session lock, is invisible to it. A pool in session mode runs the reset on
every return for that reason; transaction mode trusts this tracker (docs/guides/postgresql-modes.md).
"""

from __future__ import annotations

import re

from poolbroker.sessions.verdict import CLEAN, RESET, Verdict, out_of_sync
from poolbroker.wire.pgwire import ANSWERED_BY_READY, SHARED_STATEMENT, Frames

QUERY, PARSE, BIND, EXECUTE, TERMINATE, READY = (ord(kind) for kind in "QPBEXZ")

# Statements whose effect outlives their transaction. Statement-initial keywords are looked for
# after a start or a semicolon (and comments); SET LOCAL, SET TRANSACTION and SET CONSTRAINTS last
# only as long as the transaction.
_START = r"(?:^|;)(?:\s|--[^\n]*\n|/\*.*?\*/)*"
SESSION_SQL = re.compile(
    rb"(?P<keyword>" + _START.encode() + rb"(?:SET(?!\s+(?:LOCAL|TRANSACTION|CONSTRAINTS)\b)|RESET|PREPARE|LISTEN"
    rb"|LOAD|DECLARE\b[^;]*?\bWITH\s+HOLD)\b)"
    rb"|(?P<temporary>\bCREATE\s+(?:(?:GLOBAL|LOCAL)\s+)?(?:TEMP|TEMPORARY)\b)"
    rb"|(?P<lock>\bpg_(?:try_)?advisory_lock(?:_shared)?\s*\()"
    rb"|(?P<setting>\bset_config\s*\()",
    re.IGNORECASE | re.DOTALL,
)


def session_change(sql: bytes) -> str:
    """What in `sql` outlives its transaction, for the log line; "" if the broker sees nothing."""
    found = SESSION_SQL.search(sql)
    if found is None:
        return ""
    words = found.group(0).decode(errors="replace").lstrip(";").split()
    return " ".join(w for w in words if not w.startswith(("--", "/*")))[:40] or "a session statement"


class PostgresSession:
    """What one lease's messages did to its connection's session (see the module's docstring)."""

    __slots__ = ("_sent", "_received", "owed", "status", "changed", "terminated", "unfinished")

    def __init__(self) -> None:
        self._sent = Frames(keep=b"QP")
        self._received = Frames(keep=b"Z")
        self.owed = 0  # ReadyForQuery messages the server still owes
        self.status = b"I"  # the last ReadyForQuery's: I idle, T in a transaction, E failed one
        self.changed = ""  # the first statement seen that outlives its transaction
        self.terminated = False  # the holder sent Terminate: the server closes the session
        # An unnamed statement parsed and not yet bound, or a portal bound and not yet executed:
        # pg8000 sends Parse, Sync; Describe, Sync, Bind, Flush; then Execute, Sync, each after
        # the last one's answer. They live on this backend only: the lease must not end between.
        self.unfinished = False

    def sent(self, data: bytes | memoryview) -> None:
        for kind, body in self._sent.feed(data):
            if kind in ANSWERED_BY_READY:
                self.owed += 1
            elif kind == TERMINATE:
                self.terminated = True
            elif kind == BIND:
                self.unfinished = True  # (until its Execute)
            elif kind == EXECUTE:
                self.unfinished = False
            if kind == PARSE:
                self.unfinished = body[:1] == b"\0"  # (a named one outlives the lease: a change, below)
            if self.changed:
                continue  # (the first is enough: the reset undoes them all)
            if kind == QUERY:
                self.changed = session_change(body)
            elif kind == PARSE:
                name, _, sql = body.partition(b"\0")
                if not name:
                    self.changed = session_change(sql)
                elif not name.startswith(SHARED_STATEMENT):  # (those change nothing a holder relies on)
                    self.changed = "a named prepared statement"
            if self._sent.cut and not self.changed:
                self.changed = "a statement too long to read"

    def received(self, data: bytes) -> None:
        for kind, body in self._received.feed(data):
            if kind == READY:
                self.owed -= 1
                self.status = body[:1]

    def at_rest(self) -> bool:
        """Between transactions, in step, no statement waiting for its Bind or Execute: a lease asked
        to end "when done" may end here (the reset, if the session changed, runs on return)."""
        return self.status == b"I" and not self.unfinished and self._in_step() == ""

    def _in_step(self) -> str:
        """Why the stream can't be trusted, or ""."""
        sent, received = self._sent, self._received
        if sent.error or received.error:
            return f"not PostgreSQL's protocol: {sent.error or received.error}"
        if self.terminated:
            return "the holder sent Terminate"
        if sent.partial:
            return "a message was left half sent"
        if received.partial:
            return "a message was left half read"
        if self.owed:
            return f"{self.owed} ReadyForQuery owed" if self.owed > 0 else "more ReadyForQuery than asked for"
        return ""

    def verdict(self) -> Verdict:
        why = self._in_step()
        if why:
            return out_of_sync(why)
        if self.status == b"T":
            return RESET, "a transaction left open"
        if self.status == b"E":
            return RESET, "a failed transaction left open"
        if self.changed:
            return RESET, f"it ran {self.changed}"
        return CLEAN, ""
