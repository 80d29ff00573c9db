"""The poolbroker wire format, version 1: one msgpack map per message (see docs/protocol.md).

Both sides use what is here: the client builds requests with the `*_request` functions and reads
replies; the broker parses requests with `parse_request`, which type-checks every field so that
nothing a client sends can reach the broker's state unchecked, and answers with `ok_reply` and
`error_reply`, whose codes are `ErrorCode`s.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import msgpack

VERSION = 1

# Operations.
OP_PING = "ping"
OP_STATS = "stats"
OP_LEASE = "lease"
OP_IO = "io"
OP_RELEASE = "release"
OP_LEASES = "leases"  # who holds what
OP_ADMIN = "admin"  # administrators only
OP_CANCEL = "cancel"  # PostgreSQL: cancel what a lease's backend is running
OPS = frozenset({OP_PING, OP_STATS, OP_LEASES, OP_LEASE, OP_IO, OP_RELEASE, OP_ADMIN, OP_CANCEL})

# What an administrator may ask.
ADMIN_PAUSE = "pause"  # a pool hands nothing out: requests wait
ADMIN_RESUME = "resume"
ADMIN_RESIZE = "resize"  # a pool's max_size, live
ADMIN_DRAIN = "drain"  # close a pool's idle connections now, recycle the rest as they come back
ADMIN_RELOAD = "reload"  # reread the config file, as SIGHUP does
ADMIN_SHUTDOWN = "shutdown"  # as SIGTERM: stop granting, let active leases finish, exit
ADMIN_ACTIONS = frozenset({ADMIN_PAUSE, ADMIN_RESUME, ADMIN_RESIZE, ADMIN_DRAIN, ADMIN_RELOAD, ADMIN_SHUTDOWN})
ADMIN_POOL_ACTIONS = frozenset({ADMIN_PAUSE, ADMIN_RESUME, ADMIN_RESIZE, ADMIN_DRAIN})  # these name a pool
MAX_POOL_SIZE = 100_000

# How an I/O operation reads after sending.
READ_ANY = "any"  # whatever is available, at least 1 byte and at most n (b"" at end of stream)
READ_EXACTLY = "exactly"  # exactly n bytes
READ_UNTIL = "until"  # up to and including delim, scanning at most n bytes
READ_READY = "ready"  # PostgreSQL: up to and including the n-th ReadyForQuery (or a COPY's start)
READ_MODES = frozenset({READ_ANY, READ_EXACTLY, READ_UNTIL, READ_READY})

# What happens to the lease after an operation.
RELEASE_KEEP = "keep"  # back to the pool if the connection is clean
RELEASE_DISCARD = "discard"  # close the connection: its state is unknown
RELEASE_MODES = frozenset({RELEASE_KEEP, RELEASE_DISCARD})
# An exchange's only: end the lease after it (as keep) if the pool's protocol sees the conversation
# over (every command answered, the session as it was handed out); else the lease goes on.
RELEASE_WHEN_DONE = "when_done"
EXCHANGE_RELEASE_MODES = RELEASE_MODES | {RELEASE_WHEN_DONE}

# A lent socket's release says what its holder's session left, as the client's adapter followed it
# (the broker saw none of its bytes); a release that says nothing gets the pool's reset.
SESSION_CLEAN = "clean"  # as it was handed out: back as it is
SESSION_RESET = "reset"  # changed: the pool's reset first
SESSION_OUT_OF_SYNC = "out_of_sync"  # left mid-message or with answers owed: closed
SESSION_VERDICTS = frozenset({SESSION_CLEAN, SESSION_RESET, SESSION_OUT_OF_SYNC})


class ErrorCode(StrEnum):
    """Every error a reply may carry (docs/protocol.md, "Error codes"); each is one client exception."""

    BAD_REQUEST = "bad_request"  # malformed: not msgpack, a missing or mistyped field, extra frames
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_POOL = "unknown_pool"
    LEASE_BUSY = "lease_busy"  # an exchange is already running on the lease
    POOL_TIMEOUT = "pool_timeout"  # no connection within the acquire timeout
    POOL_FULL = "pool_full"  # max_waiting requests already wait
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"  # the upstream can't be reached
    UPSTREAM_ERROR = "upstream_error"  # an I/O on the connection failed
    UPSTREAM_TIMEOUT = "upstream_timeout"  # the exchange did not finish within its io_timeout
    LEASE_LOST = "lease_lost"  # unknown token: released, reclaimed, another client's
    LIMIT_EXCEEDED = "limit_exceeded"  # over a broker limit; the message names it
    NOT_LENT = "not_lent"  # a socket asked of a pool that does not lend (TLS, lend_sockets = false)
    NOT_AUTHORIZED = "not_authorized"  # an admin request from a peer that may not administer
    RELOAD_FAILED = "reload_failed"  # the config file does not load; nothing changed
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"  # a broker bug; logged, and the broker goes on


TOKEN_BYTES = 16  # a lease token: 128 random bits
MAX_ID = 2**63 - 1
MAX_NAME = 128  # pool names, hosts
MAX_TAG = 256


class BadRequest(Exception):
    """A request that can't be served; the broker answers it with this code and message."""

    def __init__(self, code: ErrorCode, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass(slots=True)
class Request:
    """A parsed, type-checked request. Fields an operation does not use stay None."""

    op: str
    id: int
    noreply: bool = False
    pool: str | None = None
    lease: bytes | None = None
    timeout: float | None = None  # lease: the acquire timeout
    tag: str | None = None
    pid: int | None = None
    host: str | None = None
    # An exchange (lease or io): send, then read.
    send: bytes | None = None
    read: str | None = None
    n: int | None = None
    delim: bytes | None = None
    io_timeout: float | None = None
    release: str | None = None  # after the exchange: keep, discard, or when_done
    poll: bool = False  # read any: nothing within io_timeout (0: none at all) is an empty answer
    session: str | None = None  # release of a lent socket: what its holder's session left
    action: str | None = None  # admin: what to do
    max_size: int | None = None  # admin resize: the new bound

    @property
    def has_exchange(self) -> bool:
        return self.send is not None or self.read is not None

    @property
    def ends_lease(self) -> bool:
        """The exchange ends its lease whatever it finds (a one-shot cycle, when it is the first)."""
        return self.release in RELEASE_MODES


def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], rid: int | None) -> Any:
    value = body.get(name)
    if value is None or type(value) is kind:  # (absent, or exactly the type asked: the usual case)
        return value
    # bool is an int in Python: never accept it where a number is asked for.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise BadRequest(ErrorCode.BAD_REQUEST, f"field {name!r} has the wrong type", rid)
    return value


def _positive_seconds(body: dict[str, Any], name: str, rid: int | None) -> float | None:
    value = _field(body, name, (int, float), rid)
    if value is None:
        return None
    if not 0 < value <= 86400:
        raise BadRequest(ErrorCode.BAD_REQUEST, f"field {name!r} must be in (0, 86400] seconds", rid)
    return float(value)


def _short_str(body: dict[str, Any], name: str, limit: int, rid: int | None) -> str | None:
    value = _field(body, name, str, rid)
    if value is not None and len(value) > limit:
        raise BadRequest(ErrorCode.BAD_REQUEST, f"field {name!r} is longer than {limit}", rid)
    return value  # type: ignore[no-any-return]


def parse_request(frame: bytes) -> Request:
    """Decode and check one request body; raise BadRequest with the request id when known."""
    try:
        body = msgpack.unpackb(frame, raw=False)
    except Exception as exc:  # msgpack raises several types for bad input
        raise BadRequest(ErrorCode.BAD_REQUEST, f"not a msgpack message: {type(exc).__name__}") from None
    if not isinstance(body, dict):
        raise BadRequest(ErrorCode.BAD_REQUEST, "a request is a msgpack map")
    rid = body.get("id")
    if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid <= MAX_ID:
        raise BadRequest(ErrorCode.BAD_REQUEST, "field 'id' must be an integer in [0, 2**63)")
    version = body.get("v")
    if version != VERSION:
        raise BadRequest(
            ErrorCode.UNSUPPORTED_VERSION, f"protocol version {version!r}; this broker speaks {VERSION}", rid
        )
    op = body.get("op")
    if not isinstance(op, str) or op not in OPS:  # a list here would not even hash
        raise BadRequest(ErrorCode.BAD_REQUEST, f"unknown operation {op!r}", rid)
    req = Request(op=op, id=rid, noreply=_field(body, "noreply", bool, rid) or False)
    if op == OP_LEASE:
        req.pool = _short_str(body, "pool", MAX_NAME, rid)
        if not req.pool:
            raise BadRequest(ErrorCode.BAD_REQUEST, "lease needs a 'pool'", rid)
        req.timeout = _positive_seconds(body, "timeout", rid)
        req.tag = _short_str(body, "tag", MAX_TAG, rid)
        req.pid = _field(body, "pid", int, rid)
        req.host = _short_str(body, "host", MAX_NAME, rid)
        if not EXCHANGE_FIELDS.isdisjoint(body):  # (a plain lease request has none: skip their checks)
            _parse_exchange(body, req)
    elif op in (OP_IO, OP_RELEASE, OP_CANCEL):
        token = _field(body, "lease", bytes, rid)
        if token is None or len(token) != TOKEN_BYTES:
            raise BadRequest(ErrorCode.BAD_REQUEST, f"{op} needs a {TOKEN_BYTES}-byte 'lease'", rid)
        req.lease = token
        if op == OP_IO:
            _parse_exchange(body, req)
        elif op == OP_RELEASE:
            req.release = _release_mode(body, rid) or RELEASE_KEEP
            req.session = _field(body, "session", str, rid)
            if req.session is not None and req.session not in SESSION_VERDICTS:
                raise BadRequest(ErrorCode.BAD_REQUEST, f"'session' must be one of {sorted(SESSION_VERDICTS)}", rid)
    elif op in (OP_STATS, OP_LEASES):
        req.pool = _short_str(body, "pool", MAX_NAME, rid)
    elif op == OP_ADMIN:
        _parse_admin(body, req)
    if req.noreply and op != OP_RELEASE:
        raise BadRequest(ErrorCode.BAD_REQUEST, "only release may be one-way (noreply)", rid)
    return req


def _parse_admin(body: dict[str, Any], req: Request) -> None:
    rid = req.id
    req.action = _field(body, "action", str, rid)
    if req.action not in ADMIN_ACTIONS:
        raise BadRequest(ErrorCode.BAD_REQUEST, f"'action' must be one of {sorted(ADMIN_ACTIONS)}", rid)
    if req.action in ADMIN_POOL_ACTIONS:
        req.pool = _short_str(body, "pool", MAX_NAME, rid)
        if not req.pool:
            raise BadRequest(ErrorCode.BAD_REQUEST, f"{req.action} needs a 'pool'", rid)
    if req.action == ADMIN_RESIZE:
        req.max_size = _field(body, "max_size", int, rid)
        if req.max_size is None or not 1 <= req.max_size <= MAX_POOL_SIZE:
            raise BadRequest(ErrorCode.BAD_REQUEST, f"resize needs a 'max_size' in [1, {MAX_POOL_SIZE}]", rid)


def _release_mode(body: dict[str, Any], rid: int, modes: frozenset[str] = RELEASE_MODES) -> str | None:
    mode = _field(body, "release", str, rid)
    if mode is not None and mode not in modes:
        raise BadRequest(ErrorCode.BAD_REQUEST, f"'release' must be one of {sorted(modes)}", rid)
    return mode  # type: ignore[no-any-return]


EXCHANGE_FIELDS = frozenset({"send", "read", "n", "delim", "poll", "io_timeout", "release"})


def _parse_exchange(body: dict[str, Any], req: Request) -> None:
    rid = req.id
    req.send = _field(body, "send", bytes, rid)
    req.read = _field(body, "read", str, rid)
    req.n = _field(body, "n", int, rid)
    req.delim = _field(body, "delim", bytes, rid)
    req.poll = _field(body, "poll", bool, rid) or False
    if req.poll and type(body.get("io_timeout")) in (int, float) and body["io_timeout"] == 0:  # what is there now
        req.io_timeout = 0.0
    else:
        req.io_timeout = _positive_seconds(body, "io_timeout", rid)
    req.release = _release_mode(body, rid, EXCHANGE_RELEASE_MODES)
    if req.poll and req.read not in (READ_ANY, READ_READY):
        raise BadRequest(ErrorCode.BAD_REQUEST, "'poll' is for read 'any' or 'ready'", rid)
    if req.read is None:
        if req.n is not None or req.delim is not None:
            raise BadRequest(ErrorCode.BAD_REQUEST, "'n' and 'delim' need a 'read' mode", rid)
        return
    if req.read not in READ_MODES:
        raise BadRequest(ErrorCode.BAD_REQUEST, f"'read' must be one of {sorted(READ_MODES)}", rid)
    if req.n is not None and req.n < 0:
        raise BadRequest(ErrorCode.BAD_REQUEST, "'n' must not be negative", rid)
    if req.read == READ_ANY and not req.n:
        raise BadRequest(ErrorCode.BAD_REQUEST, "read 'any' needs 'n' >= 1 (the most bytes to return)", rid)
    if req.read == READ_READY and not req.n:
        raise BadRequest(ErrorCode.BAD_REQUEST, "read 'ready' needs 'n' >= 1 (ReadyForQuery messages to wait for)", rid)
    if req.read == READ_EXACTLY and req.n is None:
        raise BadRequest(ErrorCode.BAD_REQUEST, "read 'exactly' needs 'n'", rid)
    if req.read == READ_UNTIL and not req.delim:
        raise BadRequest(ErrorCode.BAD_REQUEST, "read 'until' needs a non-empty 'delim'", rid)


# -- replies (the broker builds them) -----------------------------------------------------------


def ok_reply(rid: int, **fields: Any) -> dict[str, Any]:
    return {"v": VERSION, "id": rid, "ok": True, **fields}


def error_reply(rid: int | None, code: ErrorCode, message: str) -> dict[str, Any]:
    return {"v": VERSION, "id": rid, "ok": False, "error": code, "message": message}


# -- requests (the client builds them; the channel adds "v" and "id") ----------------------------


def ping_request() -> dict[str, Any]:
    return {"op": OP_PING}


def stats_request(pool: str | None = None) -> dict[str, Any]:
    return {"op": OP_STATS} if pool is None else {"op": OP_STATS, "pool": pool}


def leases_request(pool: str | None = None) -> dict[str, Any]:
    return {"op": OP_LEASES} if pool is None else {"op": OP_LEASES, "pool": pool}


def admin_request(action: str, **fields: Any) -> dict[str, Any]:
    return {"op": OP_ADMIN, "action": action, **fields}


def lease_request(pool: str, timeout: float, pid: int, host: str, tag: str | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"op": OP_LEASE, "pool": pool, "timeout": timeout, "pid": pid, "host": host}
    if tag is not None:
        message["tag"] = tag
    return message


def release_request(token: bytes, mode: str = RELEASE_KEEP) -> dict[str, Any]:
    return {"op": OP_RELEASE, "lease": token, "release": mode}


def cancel_request(token: bytes) -> dict[str, Any]:
    return {"op": OP_CANCEL, "lease": token}


class Template:
    """A request's fixed fields packed once; each use packs only what varies (the id, a token, the
    payload) and joins the pieces, as a msgpack map is its header and then its pairs in a row.
    Under load a client process runs cold, and every Python step shows: building and packing a
    dozen fields per call cost about 30 us a cycle with 100 client processes, this costs a few."""

    __slots__ = ("_head", "_keys")

    def __init__(self, fixed: dict[str, Any], varying: tuple[str, ...] = ()) -> None:
        fixed = {"v": VERSION, **fixed}
        packer = msgpack.Packer(use_bin_type=True)  # (made once per kind of request: no need to share)
        pairs = packer.pack(fixed)[len(packer.pack_map_header(len(fixed))) :]
        self._head = packer.pack_map_header(len(fixed) + len(varying) + 1) + pairs
        self._keys = tuple(packer.pack(key) for key in (*varying, "id"))

    def pack(self, pack: Any, rid: int, values: tuple[Any, ...] = ()) -> bytes:
        """The whole request: `values` for the varying fields in their order, then `rid`; `pack` is
        the caller's msgpack Packer.pack (a Packer is not shared between threads)."""
        keys = self._keys
        if len(values) == 1:  # (the usual cases, spelled out: a payload, or a token)
            return b"".join((self._head, keys[0], pack(values[0]), keys[1], pack(rid)))
        parts = [self._head]
        for key, value in zip(keys, (*values, rid), strict=True):
            parts.append(key)
            parts.append(pack(value))
        return b"".join(parts)


def add_exchange(
    message: dict[str, Any],
    send: bytes | None,
    io_timeout: float,
    until: bytes | None = None,
    exactly: int | None = None,
    max_bytes: int | None = None,
    release: str | None = None,
    poll: bool = False,
    ready: int | None = None,
) -> dict[str, Any]:
    """Add an exchange to a lease or io request: send `send`, then read up to and including
    `until`, or `exactly` bytes, or up to the `ready`-th PostgreSQL ReadyForQuery, or whatever
    arrives first (at most `max_bytes`); none of them: no read. `release` ends the lease after it.
    `poll`: nothing read within io_timeout (which may then be 0) is an empty answer rather than
    upstream_timeout."""
    if send:
        message["send"] = send
    if until is not None:
        if exactly is not None:
            raise ValueError("give until= or exactly=, not both")
        message["read"] = READ_UNTIL
        message["delim"] = until
    elif exactly is not None:
        message["read"] = READ_EXACTLY
        message["n"] = exactly
    elif ready is not None:
        message["read"] = READ_READY
        message["n"] = ready
    elif max_bytes is not None:
        message["read"] = READ_ANY
        message["n"] = max_bytes
    message["io_timeout"] = io_timeout
    if release is not None:
        message["release"] = release
    if poll:
        message["poll"] = True
    return message
