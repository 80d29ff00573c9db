"""Driving leases: lease requests and their limits, grants (a token, and the first exchange a
request may carry), each exchange's send and read on the leased connection, the lease's time
limits, and its end, where the pool's protocol says whether the connection goes back as it is, is
reset first, or is closed. Tables and decisions are pure (leases.py, exchange.py, protocols/);
this carries them out with the server's sockets and timers."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from poolbroker.broker.decide.connection import State
from poolbroker.broker.decide.exchange import Exchange, ReadFailed, over_limits
from poolbroker.broker.decide.lease_rules import Verdict, acquire_deadline, admit, exchange_deadline
from poolbroker.broker.decide.leases import Lease, Waiter
from poolbroker.broker.decide.protocols import CLOSE, RUN_RESET
from poolbroker.broker.drive.pools import PoolState, unknown_pool
from poolbroker.broker.drive.upstream import UpstreamConn
from poolbroker.wire.protocol import (
    READ_ANY,
    READ_READY,
    RELEASE_DISCARD,
    RELEASE_KEEP,
    RELEASE_MODES,
    RELEASE_WHEN_DONE,
    TOKEN_BYTES,
    ErrorCode,
    Request,
    error_reply,
    ok_reply,
)

if TYPE_CHECKING:
    from poolbroker.broker.drive.doors import LeasingDoors
    from poolbroker.broker.drive.tables import DriveExchange, DriveHolder, DriveLease, DriveWaiter

log = logging.getLogger("broker.server")  # (the operator's log lines keep the name they always had)

TOKEN_BATCH = 256  # lease tokens drawn from the OS's random source per read (one syscall, not one each)


class Leasing:
    """Every lease's life, from its request to its end."""

    def __init__(self, loop: LeasingDoors) -> None:
        self.loop = loop
        self._tokens = b""  # random bytes drawn ahead for lease tokens
        self._token_at = 0

    def on_lease(self, peer: bytes, req: Request, now: float) -> None:
        assert req.pool is not None  # parse_request guarantees it
        pool = self.loop.pools.get(req.pool)
        if pool is None:
            self.loop.reply(peer, unknown_pool(self.loop.pools, req))
            return
        if req.has_exchange and not self._exchange_fits(peer, req):
            return
        holder = self.loop.table.holders[peer]
        if holder.lends and not pool.config.lends:
            why = "its TLS lives in the broker" if pool.config.tls else "lend_sockets = false"
            message = f"pool {req.pool!r} does not lend its sockets ({why}): lease through the broker's endpoint"
            self.loop.reply(peer, error_reply(req.id, ErrorCode.NOT_LENT, message))
            return
        waiter = Waiter(holder, req, pool, acquire_deadline(pool.config, req, now))
        refusal = admit(
            pool.config,
            taken_by_process=self.loop.table.taken_by(holder.process, pool),
            payload=waiter.payload,
            waiting_payload=self.loop.table.waiting_payload,
            max_waiting_payload=self.loop.config.max_waiting_payload,
        )
        if refusal is not None:
            self.loop.reply(peer, error_reply(req.id, refusal.code, refusal.message))
            return
        self.loop.table.queue(waiter)
        self.loop.carry_out(pool, pool.core.request(waiter, now, waiter.deadline), now)

    def holder_gone(self, holder: DriveHolder, now: float, why: str) -> None:
        """A holder's connection closed: its waiters leave the line and its leases are reclaimed
        (their connections closed: what the holder left in them is unknown)."""
        self.loop.table.remove_holder(holder)
        for waiter in list(holder.waiters):
            waiter.pool.core.cancel(waiter)
            self.loop.table.leaves_line(waiter)
        for lease in list(holder.leases):
            log.warning("pool %r: reclaiming a %s: %s", lease.pool.config.name, lease.describe(now), why)
            self.end_lease(lease, now, keep=False, reason="reclaimed")

    def on_io(self, peer: bytes, req: Request, now: float) -> None:
        lease = self._lease_of(peer, req)
        if lease is None:
            return
        if lease.exchange is not None:
            if req.send is not None and req.read is None and req.release is None:
                self._send_beside(lease.exchange, peer, req, now)
            else:
                message = "an I/O operation is already in progress on this lease (only a send may join it)"
                self.loop.reply(peer, error_reply(req.id, ErrorCode.LEASE_BUSY, message))
            return
        if self._exchange_fits(peer, req):
            self._start_exchange(lease, peer, req, now, first=False)

    def _send_beside(self, exchange: DriveExchange, peer: bytes, req: Request, now: float) -> None:
        """A send while an exchange runs joins its send, under its deadline, and is answered at
        once: a failure to send it is that exchange's error (an asyncio task subscribes while
        another waits in a pub/sub read)."""
        assert req.send is not None
        problem = exchange.send_beside(req.send, self.loop.config.max_payload)
        if problem is not None:
            self.loop.reply(peer, error_reply(req.id, ErrorCode.LIMIT_EXCEEDED, problem))
            return
        self.loop.reply(peer, ok_reply(req.id))
        self.advance(exchange, now)

    def on_release(self, peer: bytes, req: Request, now: float) -> None:
        lease = self._lease_of(peer, req)
        if lease is None:
            return
        if not req.noreply:  # the answer first: a reset that follows is no business of the client's
            self.loop.reply(peer, ok_reply(req.id))
        self.end_lease(lease, now, keep=req.release == RELEASE_KEEP, reported=req.session)

    def on_cancel(self, peer: bytes, req: Request, now: float) -> None:
        """PostgreSQL's cancel, for the lease the token names. Any socket may ask: the token is the
        secret, as the backend's key is in PostgreSQL's CancelRequest (the worker's bridge asks
        from the thread that hears libpq's cancel, not the one holding the lease)."""
        assert req.lease is not None
        lease = self.loop.table.leases.get(req.lease)
        if lease is None:
            self.loop.reply(peer, error_reply(req.id, ErrorCode.LEASE_LOST, "no such lease (it may have ended)"))
        elif not lease.conn.cancel(lease.pool.config.connect_timeout):
            message = "nothing to cancel: only a postgres pool's connection has a backend to cancel"
            self.loop.reply(peer, error_reply(req.id, ErrorCode.BAD_REQUEST, message))
        else:
            self.loop.reply(peer, ok_reply(req.id))

    def _lease_of(self, peer: bytes, req: Request) -> DriveLease | None:
        assert req.lease is not None
        lease = self.loop.table.lease_of(peer, req.lease)
        if lease is None:
            if not req.noreply:
                self.loop.reply(
                    peer, error_reply(req.id, ErrorCode.LEASE_LOST, "no such lease (released, reclaimed, or not yours)")
                )
            return None
        return lease

    def _exchange_fits(self, peer: bytes, req: Request) -> bool:
        problem = over_limits(req, self.loop.config.max_payload)
        if problem is not None:
            self.loop.reply(peer, error_reply(req.id, ErrorCode.LIMIT_EXCEEDED, problem))
        return problem is None

    def grant(self, waiter: DriveWaiter, conn: UpstreamConn, now: float) -> None:
        holder = waiter.holder
        self.loop.table.leaves_line(waiter)
        token = self._new_token()
        # (a lent socket's bytes are never seen: nothing to follow)
        new_session = None if holder.lends else waiter.pool.protocol.new_session
        lease = Lease(token, conn, waiter, new_session() if new_session is not None else None, now)
        self.loop.table.add(lease)
        conn.move(State.LEASED)
        conn.lease = lease
        if holder.gone:  # (cancelled waiters are never granted; this is the one place to be sure)
            self.end_lease(lease, now, keep=True)
            return
        req = waiter.req
        if req.has_exchange:
            self._start_exchange(lease, waiter.peer, req, now, first=True)
        else:
            self.loop.upstreams.watch(conn)
            # (a postgres connection's backend pid: a driver shows it as its connection's own)
            known = {"backend_pid": conn.backend_key[0]} if conn.backend_key is not None else {}
            reply = ok_reply(req.id, lease=token, **known)
            if not (self.loop.lend(waiter.peer, reply, conn) if lease.lent else self.loop.reply(waiter.peer, reply)):
                # The requester left (timed out, gave up, died): the connection goes back at once.
                self.end_lease(lease, now, keep=True)
        # A one-shot cycle (its first exchange carries the release) ends with that exchange, whose
        # own deadline bounds it: it needs no watch of its own.
        if self.loop.table.active(lease) and not (req.ends_lease and lease.exchange is not None):
            pool = waiter.pool
            pool.leases.add(lease)
            if pool.lease_timer is None:  # (else it is due no later than this lease's first limit)
                self.look_at_leases_later(pool, now)

    def _new_token(self) -> bytes:
        """128 bits from the OS's random source (as secrets.token_bytes), drawn TOKEN_BATCH at a time."""
        at = self._token_at
        if at >= len(self._tokens):
            self._tokens = os.urandom(TOKEN_BYTES * TOKEN_BATCH)
            at = 0
        self._token_at = at + TOKEN_BYTES
        return self._tokens[at : at + TOKEN_BYTES]

    def look_at_leases_later(self, pool: PoolState, now: float) -> None:
        """Time the pool's next look at its leases' limits (again, when its settings change)."""
        self.loop.timers.cancel(pool.lease_timer)
        due = pool.leases.next_due(pool.config, now)
        pool.lease_timer = None
        if due is not None:
            pool.lease_timer = self.loop.timers.call_at(due, lambda t: self._look_at_leases(pool, t))

    def _look_at_leases(self, pool: PoolState, now: float) -> None:
        pool.lease_timer = None
        name = pool.config.name
        for lease, check in pool.leases.due(pool.config, now).items():
            if check.verdict is Verdict.RECLAIM:
                log.warning("pool %r: reclaiming a %s: %s", name, lease.describe(now), check.why)
                self.end_lease(lease, now, keep=False, reason="reclaimed")
            else:
                log.warning("pool %r: possible leak: a %s", name, lease.describe(now))
        self.look_at_leases_later(pool, now)

    def _start_exchange(self, lease: DriveLease, peer: bytes, req: Request, now: float, first: bool) -> None:
        exchange = Exchange(lease, peer, req, first, self.loop.config.max_payload, now)
        lease.exchange = exchange
        lease.ops += 1
        lease.last_io = now
        lease.pool.leases.io_started(lease)
        if exchange.poll and exchange.send is None:
            try:  # what arrived while nobody read (a leased socket is polled only during an exchange)
                lease.conn.fill()
            except OSError as exc:
                lease.conn.fail(f"read from upstream failed: {exc}")
                self.finish_error(exchange, ErrorCode.UPSTREAM_ERROR, lease.conn.error, now)
                return
        self.advance(exchange, now)
        if lease.exchange is exchange:  # still running: bound it in time
            deadline = exchange_deadline(lease.pool.config, req, first=first, now=now)
            exchange.timer = self.loop.timers.call_at(deadline, lambda t: self._exchange_timed_out(exchange, t))

    def advance(self, exchange: DriveExchange, now: float) -> None:
        """Move an exchange on as far as the socket allows: send, then read, then reply."""
        lease = exchange.lease
        conn = lease.conn
        if exchange.send is not None:
            try:
                sent = conn.send(exchange.send)
            except OSError as exc:
                conn.fail(f"send to upstream failed: {exc}")
                self.finish_error(exchange, ErrorCode.UPSTREAM_ERROR, conn.error, now)
                return
            lease.bytes_sent += sent
            if lease.session is not None:
                lease.session.sent(exchange.send[:sent])
            if exchange.sent(sent) is not None:
                self.loop.upstreams.watch(conn)
                return
        if exchange.read is None:
            self._finish_ok(exchange, None, now)
            return
        try:
            data = exchange.take(conn.rbuf, conn.eof)
        except ReadFailed as exc:
            if exc.code == ErrorCode.UPSTREAM_ERROR:
                conn.fail(exc.message)
            self.finish_error(exchange, exc.code, exc.message, now)
            return
        if data is None:
            if exchange.poll_now:  # a poll with no time to wait: nothing there now
                self._finish_ok(exchange, b"", now)
                return
            self.loop.upstreams.watch(conn)
            return
        lease.bytes_received += len(data)
        if lease.session is not None:
            lease.session.received(data)
        self._finish_ok(exchange, data, now)

    def _exchange_timed_out(self, exchange: DriveExchange, now: float) -> None:
        exchange.timer = None
        if exchange.send is not None:
            # Part of a message may have gone out: the upstream's view of the stream is unknown.
            message = "send to upstream timed out"
            exchange.lease.conn.fail(message)
        elif exchange.poll:
            self._finish_ok(exchange, b"", now)  # nothing came: the empty answer a poll asked for
            return
        else:
            message = "no answer from upstream in time (bytes already read stay buffered)"
        self.finish_error(exchange, ErrorCode.UPSTREAM_TIMEOUT, message, now)

    def _finish_ok(self, exchange: DriveExchange, data: bytes | None, now: float) -> None:
        release = exchange.release
        lease = exchange.lease
        # "when_done": the lease ends here only if the conversation is over (every command
        # answered, nothing left on the session); else the holder goes on with it.
        releasing = release in RELEASE_MODES or (
            release == RELEASE_WHEN_DONE and bool(data) and lease.pool.protocol.conversation_over(lease.session)
        )
        self._end_exchange(exchange, now, lease_ends=releasing)
        reply = ok_reply(exchange.rid)
        if exchange.first:
            reply["lease"] = lease.token
        if data is not None:
            reply["data"] = data
            if not data and exchange.read in (READ_ANY, READ_READY) and lease.conn.eof:
                reply["eof"] = True
        if releasing:
            reply["released"] = True
        # The answer goes first; the lease ends after (a reset it needs is no wait of the client's).
        delivered = self.loop.reply(exchange.peer, reply)
        if releasing:
            self.end_lease(lease, now, keep=release != RELEASE_DISCARD)
        elif not delivered and self.loop.table.active(lease):
            self._holder_lost(lease, now)

    def finish_error(self, exchange: DriveExchange, code: ErrorCode, message: str, now: float) -> None:
        # A failed exchange that was to end the lease, or that opened it (its requester has no
        # token yet), ends it; an unfinished exchange leaves the connection in an unknown state.
        ends = exchange.release in RELEASE_MODES or exchange.first
        lease = self._end_exchange(exchange, now, lease_ends=ends)
        reply = error_reply(exchange.rid, code, message)
        if ends:
            reply["released"] = True
        delivered = self.loop.reply(exchange.peer, reply)
        if not delivered and self.loop.table.active(lease):
            self._holder_lost(lease, now)
        elif ends and self.loop.table.active(lease):
            self.end_lease(lease, now, keep=False)

    def _holder_lost(self, lease: DriveLease, now: float) -> None:
        """An answer could not reach the lease's holder: it is gone (died, or stopped reading)
        before the broker heard of its connection's end. Its lease is reclaimed, as then."""
        log.warning(
            "pool %r: reclaiming a %s: its answer could not be delivered", lease.pool.config.name, lease.describe(now)
        )
        self.end_lease(lease, now, keep=False, reason="reclaimed")

    def _end_exchange(self, exchange: DriveExchange, now: float, *, lease_ends: bool) -> DriveLease:
        lease = exchange.lease
        self.loop.timers.cancel(exchange.timer)
        exchange.timer = None
        lease.exchange = None
        lease.last_io = now
        lease.busy += now - exchange.started
        if not lease_ends:  # (else _end_lease sets what to watch, once)
            lease.pool.leases.io_ended(lease)
            self.loop.upstreams.watch(lease.conn)
        return lease

    def end_lease(
        self, lease: DriveLease, now: float, *, keep: bool, reason: str | None = None, reported: str | None = None
    ) -> None:
        """The lease is over: its connection goes back to the pool if kept and clean, else closes.
        (`reported`: what a lent socket's holder says its session left.)"""
        self.loop.table.remove(lease)
        lease.pool.leases.remove(lease)
        conn = lease.conn
        if lease.lent and not keep:  # (cut, so that no copy the holder has goes on using it)
            conn.cut()
        exchange = lease.exchange
        if exchange is not None:
            # Ended mid-operation (a release racing an I/O, or shutdown): the stream is cut short.
            self._end_exchange(exchange, now, lease_ends=True)
            conn.fail("the lease ended during an I/O operation")
            self.loop.reply(
                exchange.peer, error_reply(exchange.rid, ErrorCode.LEASE_LOST, "the lease ended during this operation")
            )
        conn.lease = None
        if reason is None:  # (an I/O that failed says more than the holder's discard)
            reason = "broken" if conn.broken else conn.unfit() if keep else "discarded"
        pool = lease.pool
        if reason is None:  # clean, as far as its socket tells: what did the holder leave on it?
            protocol = pool.protocol
            decision = protocol.on_lent_return(reported) if lease.lent else protocol.on_return(lease.session)
            if decision.action == RUN_RESET:  # back to the pool only once the reset has answered
                log.debug("pool %r: resetting a returned connection: %s", pool.config.name, decision.why)
                self.loop.upstreams.run_reset(conn, now)
                return
            if decision.action == CLOSE:
                reason = decision.reason
                conn.error = decision.why
        conn.move(State.IDLE)  # (back in the pool's hands: the core keeps it, hands it on or closes it)
        self.loop.carry_out(pool, pool.core.release(conn, now, reason), now)
        self.loop.upstreams.watch(conn)
