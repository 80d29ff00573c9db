"""What a lease knows and decides, whether its calls block (Lease) or are awaited (AsyncLease):
the writes it holds, the request each exchange sends (from the channel's templates), and what
each reply means for the lease. The channel that carries them is the caller's."""

from __future__ import annotations

import os
from typing import Any, Protocol

from poolbroker.client._channel import HOSTNAME
from poolbroker.client._errors import LeaseLost, error_from_code
from poolbroker.wire.protocol import (
    OP_IO,
    OP_LEASE,
    OP_RELEASE,
    RELEASE_WHEN_DONE,
    ErrorCode,
    Template,
    add_exchange,
    lease_request,
)

DEFAULT_RECV = 65536
# A lease holds writes until its next read (so that a write and its answer are one round trip), or
# until this many bytes are held: then they go at once, in a round trip of their own.
HOLD_WRITES_UP_TO = 256 * 1024

# (io_timeout, until, exactly, max_bytes, release, poll, ready)
ExchangeSpec = tuple[float, bytes | None, int | None, int | None, str | None, bool, int | None]


class TemplateCache(Protocol):
    """What the templates need of a channel, sync or async."""

    pid: int
    templates: dict[tuple[Any, ...], Template]

    def remember(self, key: tuple[Any, ...], template: Template) -> Template: ...


def first_exchange(
    channel: TemplateCache, pool: str, timeout: float, tag: str | None, exchange: ExchangeSpec, sending: bool
) -> Template:
    """The template of a lease request that carries its first exchange (a lazy lease's first I/O,
    a one-shot cycle)."""
    key = (OP_LEASE, pool, timeout, tag, exchange, sending)
    template = channel.templates.get(key)
    if template is None:
        message = add_exchange(lease_request(pool, timeout, channel.pid, HOSTNAME, tag), None, *exchange)
        template = channel.remember(key, Template(message, ("send",) if sending else ()))
    return template


def next_exchange(channel: TemplateCache, exchange: ExchangeSpec, sending: bool) -> Template:
    """The template of an exchange on a lease already held."""
    key = (OP_IO, exchange, sending)
    template = channel.templates.get(key)
    if template is None:
        message = add_exchange({"op": OP_IO}, None, *exchange)
        template = channel.remember(key, Template(message, ("lease", "send") if sending else ("lease",)))
    return template


def reads(until: bytes | None, exactly: int | None, max_bytes: int | None, ready: int | None = None) -> bool:
    """Whether an exchange with these read fields reads anything."""
    return until is not None or exactly is not None or bool(max_bytes) or ready is not None


def release_template(channel: TemplateCache, mode: str) -> Template:
    key = (OP_RELEASE, mode)
    template = channel.templates.get(key)
    if template is None:
        template = channel.remember(key, Template({"op": OP_RELEASE, "release": mode, "noreply": True}, ("lease",)))
    return template


class LeaseCore:
    """A lease's state and decisions; the subclasses carry its requests (and wait for them)."""

    def __init__(
        self,
        channel: Any,
        generation: int,
        pool: str,
        token: bytes | None,
        io_timeout: float,
        broker_timeout: float,
        *,
        timeout: float = 0.0,
        tag: str | None = None,
        when_done: bool = False,
    ) -> None:
        self.pool = pool
        self.io_timeout = io_timeout
        self.tag = tag
        self._channel = channel
        self._generation = generation
        self._broker_timeout = broker_timeout
        self._token = token  # None: a lazy lease, requested with its first exchange
        self._acquire_timeout = timeout  # (a lazy lease's: how long its first exchange may wait for a grant)
        self._when_done = when_done  # each read may end the lease, once the broker sees the conversation over
        self._done = False
        self._held = bytearray()  # writes not yet sent: they go with the next read
        self._default_io_timeout = io_timeout
        self._timeout: float | None = io_timeout  # as settimeout() set it: None blocks, 0 polls
        self._shut = False  # shutdown() was called: close() discards
        self._used = False  # an I/O operation went to the broker
        self.eof = False  # the upstream closed its side

    def __repr__(self) -> str:
        state = "released" if self._done else "active" if self._token is not None else "not yet granted"
        token = f" {self._token[:4].hex()}.." if self._token is not None else ""
        return f"<{type(self).__name__} {self.pool}{token} {state}>"

    def settimeout(self, timeout: float | None) -> None:
        """As a socket's: seconds each I/O operation may take; 0: `recv` does not wait; None: `recv`
        waits as long as it takes. The other operations take the lease's default io_timeout then."""
        if timeout is not None and not 0 <= timeout <= 86400:
            raise ValueError("a lease's timeout is in [0, 86400] seconds, or None")
        self._timeout = None if timeout is None else float(timeout)
        self.io_timeout = self._timeout if self._timeout else self._default_io_timeout

    def gettimeout(self) -> float | None:
        return self._timeout

    @property
    def token(self) -> bytes | None:
        """The broker's token for this lease (None until a lazy lease is granted, and once over)."""
        return None if self._done else self._token

    @property
    def fresh(self) -> bool:
        """Nothing was sent or read yet: the connection is as the broker handed it out (clean, with
        nothing to read), which a caller may know without asking."""
        return not self._used and not self._held

    @property
    def released(self) -> bool:
        return self._done

    @property
    def channel(self) -> Any:
        """The broker socket that carries this lease's exchanges."""
        return self._channel

    def _hold(self, data: bytes) -> bool:
        """Hold `data` for the next exchange; True when so much is held that it should go now."""
        self._check_usable()
        if data:
            self._held += data
        return len(self._held) > HOLD_WRITES_UP_TO

    def _take_held(self, keep_tail: bool) -> tuple[list[bytes], bytes]:
        """The held writes to send at once, in chunks of HOLD_WRITES_UP_TO, and (with `keep_tail`)
        what is left under a chunk, to hold again once the chunks are sent."""
        held = bytes(self._held)
        self._held.clear()
        end = len(held) - len(held) % HOLD_WRITES_UP_TO if keep_tail else len(held)
        return [held[start : start + HOLD_WRITES_UP_TO] for start in range(0, end, HOLD_WRITES_UP_TO)], held[end:]

    def _prepare(
        self,
        send: bytes | None,
        until: bytes | None,
        exactly: int | None,
        max_bytes: int | None,
        release: str | None,
        poll: bool,
        io_timeout: float | None,
        ready: int | None = None,
    ) -> tuple[Template, tuple[bytes, ...], float, bytes | None]:
        """The request for one exchange (held writes first): its template, the values of its
        varying fields, how long to wait for its answer, and the token it was made with."""
        self._check_usable()
        if self._held:  # the held writes go first, in the same exchange
            if send:
                self._held += send
            send = bytes(self._held)
            self._held.clear()
        self._used = True
        io_timeout = self.io_timeout if io_timeout is None else io_timeout
        if release is None and self._when_done and reads(until, exactly, max_bytes, ready):
            release = RELEASE_WHEN_DONE
        exchange = (io_timeout, until, exactly, max_bytes, release, poll, ready)
        channel = self._channel
        token = self._token
        wait = io_timeout + self._broker_timeout
        if token is None:  # a lazy lease: the lease request goes with its first exchange
            template = first_exchange(channel, self.pool, self._acquire_timeout, self.tag, exchange, bool(send))
            return template, ((send,) if send else ()), wait + self._acquire_timeout, None
        template = next_exchange(channel, exchange, bool(send))
        return template, ((token, send) if send else (token,)), wait, token

    def _conclude(self, reply: dict[str, Any], token: bytes | None) -> bytes:
        """What an exchange's reply means: its data, or its error raised; the lease ended or not."""
        if reply.get("ok") is True:
            if token is None:
                self._token = reply["lease"]
            if reply.get("released"):
                self._done = True
            if reply.get("eof"):
                self.eof = True
            return reply.get("data", b"")  # type: ignore[no-any-return]
        # A lazy lease whose first exchange fails is over (never granted, or ended with it).
        if token is None or reply.get("released") or reply.get("error") == ErrorCode.LEASE_LOST:
            self._done = True
        raise error_from_code(str(reply.get("error")), str(reply.get("message", "")))

    def _check_usable(self) -> None:
        if self._done:
            raise LeaseLost("this lease has been released")
        if self._channel.pid != os.getpid():
            raise LeaseLost("this lease belongs to the parent process; lease again after fork")
        if self._channel.generation != self._generation:
            self._done = True
            raise LeaseLost("the connection to the broker was reset since this lease was taken")

    def _ending(self, mode: str) -> tuple[Template, tuple[bytes]] | None:
        """The one-way release to send to end the lease, or None: a lease already lost, or a
        parent's, or a lazy one never granted, is left alone. Held writes are dropped."""
        self._held.clear()
        channel = self._channel
        token = self._token
        done = self._done
        self._done = True
        if done or token is None or channel.pid != os.getpid() or channel.generation != self._generation:
            return None
        return release_template(channel, mode), (token,)
