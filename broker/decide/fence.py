"""Fencing a lost broker at the upstream (pure): its connections carry its name, and another
broker ends them before it takes over the permits the lost one held. Only then does the budget
hold at the upstream against a broker that is frozen, or cut off from etcd, but still connected.

A shared pool's connections are named `poolbroker.<broker>` (after the pool's own client_name
and a dot, if it has one): Redis's CLIENT SETNAME, PostgreSQL's application_name. Each pool's
reset sets the name again, so a holder that renamed its session leaves no unnamed connection.
The fence is a check (decide/checks.py) that runs on one of the fencing broker's own
connections, as a probe would:
- Redis: CLIENT LIST, then CLIENT KILL ID for each connection with that name;
- PostgreSQL: pg_terminate_backend(pid, 5000) for each backend with that application_name
  (it waits until they have ended; the pool's role may end its own backends).
memcached, HTTP and tcp upstreams name no connection: they can't be fenced (docs/guides/cluster.md).
"""

from __future__ import annotations

from poolbroker.broker.decide.checks import Check, ProbeFailed
from poolbroker.broker.settings import NAME_MARK, PoolConfig
from poolbroker.sessions.resp import encode_command
from poolbroker.wire.pgwire import Frames, query

MAX_LISTING = 16 * 1024 * 1024  # CLIENT LIST of a busy Redis: about 300 bytes a connection


def names_broker(name: str, broker: str) -> bool:
    mark = NAME_MARK + broker
    return name == mark or name.endswith("." + mark)


class RedisFence:
    """CLIENT LIST, then CLIENT KILL ID for each connection named for `broker`; `ended` counts them."""

    def __init__(self, broker: str) -> None:
        self.broker = broker
        self.request = encode_command("CLIENT", "LIST", "TYPE", "normal")
        self.outgoing = b""
        self.ended = 0
        self._owed: int | None = None  # CLIENT KILL answers still to read

    def again(self) -> RedisFence:
        return RedisFence(self.broker)

    def read(self, buf: bytearray) -> bool:
        if self._owed is None:
            listing = self._bulk(buf)
            if listing is None:
                return False
            ids = [
                fields["id"]
                for line in listing.decode(errors="replace").splitlines()
                if (fields := dict(field.partition("=")[::2] for field in line.split()))
                and names_broker(fields.get("name", ""), self.broker)
            ]
            self._owed = len(ids)
            self.outgoing = b"".join(encode_command("CLIENT", "KILL", "ID", conn_id) for conn_id in ids)
            if not ids:
                return True
        while self._owed:
            end = buf.find(b"\n")
            if end < 0:
                return False
            line = bytes(buf[: end + 1])
            del buf[: end + 1]
            if not line.startswith(b":"):  # (":0": it had gone already)
                raise ProbeFailed(f"CLIENT KILL: {line.strip()[:100]!r}")
            self.ended += int(line[1:])
            self._owed -= 1
        return True

    @staticmethod
    def _bulk(buf: bytearray) -> bytes | None:
        end = buf.find(b"\r\n")
        if end < 0:
            return None
        if buf[:1] != b"$":
            raise ProbeFailed(f"CLIENT LIST: {bytes(buf[:100]).strip()!r}")
        length = int(buf[1:end])
        if length > MAX_LISTING:
            raise ProbeFailed(f"CLIENT LIST: {length} bytes, over {MAX_LISTING}")
        stop = end + 2 + length + 2
        if len(buf) < stop:
            return None
        listing = bytes(buf[end + 2 : end + 2 + length])
        del buf[:stop]
        return listing


class PostgresFence:
    """Terminate each backend whose application_name names `broker`, waiting until each ended;
    `ended` counts them."""

    outgoing = b""

    def __init__(self, broker: str) -> None:
        self.broker = broker
        mark = NAME_MARK + broker  # (a name of letters, digits and ._-: nothing to quote)
        self.request = query(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
            f" WHERE pid <> pg_backend_pid() AND (application_name = '{mark}'"
            f" OR right(application_name, {len(mark) + 1}) = '.{mark}')"
        )
        self.ended = 0
        self._frames = Frames(keep=b"DE")
        self._error = ""

    def again(self) -> PostgresFence:
        return PostgresFence(self.broker)

    def read(self, buf: bytearray) -> bool:
        messages = self._frames.feed(bytes(buf))
        del buf[:]
        if self._frames.error:
            raise ProbeFailed(f"fence: {self._frames.error}")
        for kind, body in messages:
            if kind == ord("D"):  # one column: the count, as text
                self.ended = int(body[6:]) if len(body) > 6 else 0
            elif kind == ord("E"):
                self._error = body.replace(b"\0", b" ").decode(errors="replace").strip()
            elif kind == ord("Z"):
                if self._error:
                    raise ProbeFailed(f"fence: {self._error}")
                return True
        return False


def fence_check(config: PoolConfig, broker: str) -> Check | None:
    """The check that fences `broker` on `config`'s upstream, or None where none can."""
    if config.protocol == "redis":
        return RedisFence(broker)
    if config.protocol == "postgres":
        return PostgresFence(broker)
    return None
