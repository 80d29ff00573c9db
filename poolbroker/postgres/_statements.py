"""Named prepared statements across the backends of a transaction-mode link (`Statements`).

In transaction mode each transaction may run on another backend, so a statement the driver
prepared (psycopg does after prepare_threshold uses) may not exist where its next Bind goes. As
PgBouncer 1.21+ does, the link follows the driver's statements at the protocol level and prepares
each again where needed:

- A named Parse is renamed after its content (`pb_` and a hash of its query and parameter types),
  so the same name means the same statement on every backend, from any process. It is sent after a
  Close of that name: the backend may have it already (from another holder), and a Parse of a name
  that exists is an error, while a Close of one that doesn't is not. The broker lets such a
  statement stay on a connection without a reset: whoever uses it next prepares it again first.
- A Bind or Describe of a statement not prepared on this lease's backend is preceded by that Close
  and the statement's Parse, and its name is changed to the server's.
- The server's answers to what the link added (CloseComplete, ParseComplete) are taken out of the
  stream: the driver sees the answers to what it sent, in order.

So a prepared statement costs a parse once per transaction that uses it, rather than once per
connection. Pure: bytes in, bytes out.
"""

from __future__ import annotations

import hashlib
import re
from collections import deque

from poolbroker.wire.pgwire import ANSWERED_BY_READY, SHARED_STATEMENT, message

PARSE, BIND, DESCRIBE, CLOSE, QUERY = (ord(c) for c in "PBDCQ")
PARSE_COMPLETE, CLOSE_COMPLETE, READY = (ord(c) for c in "13Z")
EDITED = frozenset(b"PBDCQ")  # the driver's messages the link may change or add to
# A Query after which the backend has no prepared statements (psycopg forgets its own then, too).
FORGETS_STATEMENTS = re.compile(rb"\s*(?:DEALLOCATE|DISCARD)\b", re.IGNORECASE)


def _name_and_rest(body: bytes, at: int = 0) -> tuple[bytes, int]:
    end = body.index(b"\0", at)
    return body[at:end], end + 1


class Statements:
    """One driver connection's named statements, in transaction mode (see the module docstring).
    `sent` takes each whole message the driver sends and returns what goes to the server in its
    place; `new_backend` says the next message starts a lease; `answered` says whether each
    answer the server sends is one the driver must not see."""

    def __init__(self) -> None:
        self.parses: dict[bytes, tuple[bytes, bytes]] = {}  # the driver's name: the server's, its Parse
        self.here: set[bytes] = set()  # server names this lease's backend has answered ParseComplete to
        self._sending: set[bytes] = set()  # server names parsed in the group being sent
        # The Parse and Close messages sent whose answers are still to come, in order: the group
        # (the Sync or Query that ends it), whether the driver is not to see the answer, and for a
        # Parse, the server's name for its statement.
        self._parses: deque[tuple[int, bool, bytes]] = deque()
        self._closes: deque[tuple[int, bool, bytes]] = deque()
        self._sent_groups = 0
        self._answered_groups = 0
        self.hidden = 0  # answers still to come that the driver must not see (so: cut out)

    def new_backend(self) -> None:
        self.here.clear()
        self._sending.clear()

    # -- what the driver sends -----------------------------------------------------------------

    def sent(self, kind: int, whole: bytes) -> bytes:
        """What goes to the server for the driver's message `whole` (of type `kind`)."""
        if kind in ANSWERED_BY_READY:
            if kind == QUERY and FORGETS_STATEMENTS.match(whole, 5):
                self.new_backend()
            self._sent_groups += 1
            self._sending.clear()
            return whole
        body = whole[5:]
        if kind == PARSE:
            return self._parse(body, whole)
        if kind == BIND:
            portal_end = body.index(b"\0") + 1
            name, after = _name_and_rest(body, portal_end)
            server, added = self._prepared(name)
            if server is None:
                return whole
            return added + message(b"B", body[:portal_end] + server + body[after - 1 :])
        if kind == DESCRIBE and body[:1] == b"S":
            server, added = self._prepared(_name_and_rest(body, 1)[0])
            return whole if server is None else added + self._message(b"D", server)
        if kind == CLOSE:
            self._expect(self._closes, hidden=False)
            if body[:1] == b"S" and (known := self.parses.pop(_name_and_rest(body, 1)[0], None)):
                self.here.discard(known[0])
                self._sending.discard(known[0])
                return self._message(b"C", known[0])
        return whole

    def _parse(self, body: bytes, whole: bytes) -> bytes:
        name, after = _name_and_rest(body)
        if not name:
            self._expect(self._parses, hidden=False)
            return whole
        server = SHARED_STATEMENT + hashlib.blake2b(body[after:], digest_size=12).hexdigest().encode()
        parse = message(b"P", server + b"\0" + body[after:])
        self.parses[name] = (server, parse)
        self._sending.add(server)
        self._expect(self._closes, hidden=True)
        self._expect(self._parses, hidden=False, server=server)
        return self._message(b"C", server) + parse

    def _prepared(self, name: bytes) -> tuple[bytes | None, bytes]:
        """The server's name for the driver's statement `name` (None: the unnamed statement, or one
        the server will say it doesn't know), and what must go first for this backend to have it:
        its Close and Parse, unless the backend said it has it, or it goes in this same group."""
        known = self.parses.get(name) if name else None
        if known is None:
            return None, b""
        server, parse = known
        if server in self.here or server in self._sending:
            return server, b""
        self._sending.add(server)
        self._expect(self._closes, hidden=True)
        self._expect(self._parses, hidden=True, server=server)
        return server, self._message(b"C", server) + parse

    @staticmethod
    def _message(kind: bytes, statement: bytes) -> bytes:
        """A Describe or Close of a statement."""
        return message(kind, b"S" + statement + b"\0")

    def _expect(self, answers: deque[tuple[int, bool, bytes]], *, hidden: bool, server: bytes = b"") -> None:
        answers.append((self._sent_groups, hidden, server))
        self.hidden += hidden

    # -- what the server answers ---------------------------------------------------------------

    def answered(self, kind: int) -> bool:
        """The server sent a message of type `kind`: True if the driver must not see it."""
        if kind == PARSE_COMPLETE:
            return self._take(self._parses)
        if kind == CLOSE_COMPLETE:
            return self._take(self._closes)
        if kind == READY:
            self._answered_groups += 1
            self._forget_skipped()
        return False

    def counting(self) -> bool:
        """Answers are still to come that the link must see one by one (a Parse's or a Close's)."""
        return bool(self._parses or self._closes)

    def all_answered(self) -> None:
        """Every group sent has its ReadyForQuery (read whole without a look at each message,
        which is fine only when not `counting()`)."""
        self._answered_groups = self._sent_groups

    def _take(self, answers: deque[tuple[int, bool, bytes]]) -> bool:
        self._forget_skipped()
        if not answers:
            return False  # (not one the link counted: let the driver judge it)
        _, hidden, server = answers.popleft()
        if server:
            self.here.add(server)
        self.hidden -= hidden
        return hidden

    def _forget_skipped(self) -> None:
        """Answers of groups already ended never come (an error skipped those messages)."""
        for answers in (self._parses, self._closes):
            while answers and answers[0][0] < self._answered_groups:
                self.hidden -= answers.popleft()[1]
