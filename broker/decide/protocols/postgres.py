"""PostgreSQL's wire protocol (version 3.0), as the broker needs it: the startup and login of an
upstream connection, and a query run to its end. Pure: messages in, messages out, no sockets.

A check here is a dialogue: `read(buf)` consumes the server's messages and may queue an answer in
`outgoing` (a password, a SCRAM step), which the driver sends before reading again.

    Login: StartupMessage -> AuthenticationOk | CleartextPassword | MD5Password | SASL...
           -> ParameterStatus*, BackendKeyData -> ReadyForQuery
    Query: Query(sql) -> (RowDescription, DataRow*, CommandComplete | EmptyQueryResponse)*
           -> ReadyForQuery(status)
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator, Sequence

from scramp import ScramClient, ScramException

from poolbroker.broker.decide.checks import Check, NotReady, ProbeFailed
from poolbroker.broker.settings import PoolConfig
from poolbroker.wire.pgwire import PROTOCOL_VERSION, SSL_REQUEST_CODE, message, query

SSL_REQUEST = struct.pack("!ii", 8, SSL_REQUEST_CODE)  # answered by one byte: S (TLS follows) or N
MAX_MESSAGE = 1 << 20  # a login or probe message larger than this is not one

# Authentication request codes (the 'R' message's first int).
AUTH_OK, AUTH_CLEARTEXT, AUTH_MD5, AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL = 0, 3, 5, 10, 11, 12


def startup_message(user: str, database: str, parameters: dict[str, str] | None = None) -> bytes:
    """The StartupMessage: protocol 3.0, the user, the database and startup parameters."""
    pairs = {"user": user, "database": database, **(parameters or {})}
    body = struct.pack("!i", PROTOCOL_VERSION)
    for key, value in pairs.items():
        body += key.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


def take_messages(buf: bytearray) -> Iterator[tuple[bytes, bytes]]:
    """The complete backend messages at the front of `buf`, removed as they are taken."""
    while len(buf) >= 5:
        (length,) = struct.unpack_from("!i", buf, 1)
        if length < 4 or length > MAX_MESSAGE:
            raise ProbeFailed(f"not PostgreSQL's protocol: a message of length {length}")
        if len(buf) < length + 1:
            return
        kind, payload = bytes(buf[:1]), bytes(buf[5 : length + 1])
        del buf[: length + 1]
        yield kind, payload


# SQLSTATEs of a server that is up but can't take sessions yet: starting up, or (a hot standby)
# not yet accepting connections. A login refused so is retried; waiters wait on.
NOT_READY = frozenset({"57P03"})


def error_fields(payload: bytes) -> dict[bytes, str]:
    """An ErrorResponse's fields by their one-byte code (S severity, C SQLSTATE, M message...)."""
    return {field[:1]: field[1:].decode(errors="replace") for field in payload.split(b"\0") if field}


def error_text(payload: bytes) -> str:
    """An ErrorResponse's severity, code and message: what an operator needs to read."""
    fields = error_fields(payload)
    return f"{fields.get(b'S', 'ERROR')} {fields.get(b'C', '')}: {fields.get(b'M', '')}".strip()


class SslRequest:
    """PostgreSQL's request for TLS, on the plain connection before the TLS handshake: the server
    answers one byte, S (go on with TLS) or N (it does not speak TLS)."""

    request = SSL_REQUEST
    outgoing = b""

    def again(self) -> SslRequest:
        return self  # (it keeps no state)

    def read(self, buf: bytearray) -> bool:
        if not buf:
            return False
        answer = bytes(buf[:1])
        del buf[:1]
        if answer == b"N":
            raise ProbeFailed("the server does not accept TLS (it answered N to the SSLRequest)")
        if answer != b"S":
            raise ProbeFailed(f"not PostgreSQL's answer to an SSLRequest: {answer!r}")
        if buf:  # bytes before the TLS handshake could be anyone's: refuse them (CVE-2021-23222)
            raise ProbeFailed("bytes after the server's S, before TLS: refused")
        return True


class Login:
    """The StartupMessage and the server's authentication, to ReadyForQuery: trust, cleartext,
    md5 and SCRAM-SHA-256 (scramp's). What the server announces is kept: `parameters`
    (ParameterStatus) and `backend_key` (BackendKeyData: pid and secret, for CancelRequest)."""

    def __init__(self, user: str, database: str, password: str | None, parameters: dict[str, str] | None = None):
        self._args = (user, database, password, parameters)
        self.request = startup_message(user, database, parameters)
        self.outgoing = b""  # an answer to send before reading on
        self.parameters: dict[str, str] = {}
        self.backend_key: tuple[int, int] | None = None
        self._user = user
        self._password = password
        self._scram: ScramClient | None = None

    def again(self) -> Login:
        return Login(*self._args)

    def __repr__(self) -> str:
        return f"<Login {self._user}>"  # (never the password)

    def read(self, buf: bytearray) -> bool:
        for kind, payload in take_messages(buf):
            if kind == b"R":
                self._authenticate(payload)
            elif kind == b"S":
                name, value, _ = payload.split(b"\0", 2)
                self.parameters[name.decode()] = value.decode(errors="replace")
            elif kind == b"K":
                self.backend_key = struct.unpack("!ii", payload[:8])
            elif kind == b"E":
                if error_fields(payload).get(b"C") in NOT_READY:
                    raise NotReady(f"not ready: {error_text(payload)}")
                raise ProbeFailed(f"login refused: {error_text(payload)}")
            elif kind == b"Z":
                return True
            # (NoticeResponse and NegotiateProtocolVersion: nothing to do)
        return False

    def _authenticate(self, payload: bytes) -> None:
        (code,) = struct.unpack_from("!i", payload)
        if code == AUTH_OK:
            return
        password = self._password
        if password is None:
            raise ProbeFailed(f"the server asks for a password (authentication request {code}) and the pool has none")
        if code == AUTH_CLEARTEXT:
            self.outgoing += message(b"p", password.encode() + b"\0")
        elif code == AUTH_MD5:
            inner = hashlib.md5(password.encode() + self._user.encode()).hexdigest().encode()
            outer = b"md5" + hashlib.md5(inner + payload[4:8]).hexdigest().encode()
            self.outgoing += message(b"p", outer + b"\0")
        elif code == AUTH_SASL:
            mechanisms = [name.decode() for name in payload[4:].split(b"\0") if name]
            if "SCRAM-SHA-256" not in mechanisms:
                raise ProbeFailed(f"the server offers only SASL {mechanisms}; the pool speaks SCRAM-SHA-256")
            self._scram = ScramClient(["SCRAM-SHA-256"], self._user, password)
            first = self._scram.get_client_first().encode()
            self.outgoing += message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first)
        elif code == AUTH_SASL_CONTINUE and self._scram is not None:
            try:
                self._scram.set_server_first(payload[4:].decode())
            except ScramException as exc:
                raise ProbeFailed(f"SCRAM: {exc}") from None
            self.outgoing += message(b"p", self._scram.get_client_final().encode())
        elif code == AUTH_SASL_FINAL and self._scram is not None:
            try:
                self._scram.set_server_final(payload[4:].decode())  # (the server proves it knows the password)
            except ScramException as exc:
                raise ProbeFailed(f"SCRAM: the server's proof does not verify: {exc}") from None
        else:
            raise ProbeFailed(f"unsupported authentication request {code} (trust, password, md5, SCRAM-SHA-256)")


class QueryCheck:
    """Run `sql` (a simple Query) to its ReadyForQuery. An ErrorResponse fails the check; so does
    a connection that is not idle afterwards when `idle` says it must be (a reset must leave no
    transaction open). `status` is ReadyForQuery's: I (idle), T (in a transaction), E (failed)."""

    def __init__(self, sql: str, *, idle: bool = True) -> None:
        self._sql = sql
        self.request = query(sql)
        self.outgoing = b""
        self.status = b""
        self._idle = idle
        self._error = ""

    def again(self) -> QueryCheck:
        return QueryCheck(self._sql, idle=self._idle)

    def read(self, buf: bytearray) -> bool:
        for kind, payload in take_messages(buf):
            if kind == b"E":
                self._error = self._error or error_text(payload)  # (ReadyForQuery still follows)
            elif kind == b"Z":
                self.status = payload[:1]
                if self._error:
                    raise ProbeFailed(self._error)
                if self._idle and self.status != b"I":
                    raise ProbeFailed(f"the connection is not idle after the query (status {self.status!r})")
                return True
        return False


def announced(checks: Sequence[Check]) -> Login | None:
    """The login among a handshake's checks (which keeps what the server announced), if any."""
    return next((check for check in checks if isinstance(check, Login)), None)


def login(config: PoolConfig) -> Login:
    """A pool's login: its user, its database (default: the user's name), its password, and its
    client_name as application_name."""
    parameters = {"application_name": config.client_name} if config.client_name else None
    return Login(config.username, config.database or config.username, config.password or None, parameters)


def reset() -> list[Check]:
    """What a returned connection runs before the next holder gets it: ROLLBACK (a transaction
    left open or failed is over; without one, only a warning) and DISCARD ALL (settings,
    temporary tables, prepared statements, advisory locks, LISTEN...: the session as new)."""
    return [QueryCheck("ROLLBACK"), QueryCheck("DISCARD ALL")]
