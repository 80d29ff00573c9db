"""Driving upstream connections through their lives: connect (after a name lookup off the loop),
TLS, the pool's handshake, idle watch, probes and resets, close. Each connection's State says what
it waits for and what an event on it means (broker/connection.py); what the pool core decides is
handed to the server to carry out, and a leased connection's I/O belongs to the leasing driver."""

from __future__ import annotations

import logging
import select
import time
from typing import TYPE_CHECKING

from poolbroker.broker.decide.checks import NotReady, ProbeFailed
from poolbroker.broker.decide.connection import CHECKING, POLL, State, Wait
from poolbroker.broker.decide.protocols import postgres
from poolbroker.broker.drive import tls
from poolbroker.broker.drive.pools import PoolState
from poolbroker.broker.drive.resolver import AddrInfo
from poolbroker.broker.drive.upstream import ProbeRun, UpstreamConn
from poolbroker.wire.protocol import ErrorCode

if TYPE_CHECKING:
    from poolbroker.broker.drive.doors import UpstreamDoors

log = logging.getLogger("broker.server")  # (the operator's log lines keep the name they always had)

# Closes of a connection whose holder's work may still run on it: a PostgreSQL backend is asked to
# cancel first, so that its query (and the locks it holds) end now, not when it next writes.
CUT_SHORT = frozenset({"broken", "discarded", "out_of_sync", "reclaimed"})

EPOLL_FLAGS = {
    Wait.NOTHING: 0,
    Wait.READ: select.EPOLLIN,
    Wait.READ_ONCE: select.EPOLLIN | select.EPOLLONESHOT,
    Wait.WRITE: select.EPOLLOUT,
}
# A one-shot watch that has reported: still registered, waiting to be armed again.
SPENT = select.EPOLLONESHOT


class Upstreams:
    """Every upstream connection of the broker, by fd, and what happens to each."""

    def __init__(self, loop: UpstreamDoors) -> None:
        self.loop = loop
        self.conns: dict[int, UpstreamConn] = {}  # by fd

    def run_reset(self, conn: UpstreamConn, now: float) -> None:
        """The pool's reset on a returned connection; it rejoins the pool only once that answered."""
        protocol = conn.pool.protocol
        run = ProbeRun(
            "reset", protocol.reset_run(), self._reset_passed, self._reset_failed, pipelined=protocol.pipelined
        )
        self.run_checks(conn, State.RESETTING, run, "probe_timeout", now)

    def open(self, pool: PoolState, now: float) -> None:
        if time.monotonic() >= pool.core.limit_until:
            # A shared pool's share lapsed while this loop was stopped (frozen past its etcd lease,
            # with `now` read before): its connections may be fenced and its permits taken. The
            # clock is read here, at the last moment before the connect, not at the loop's turn.
            self.loop.carry_out(pool, pool.core.open_withdrawn(time.monotonic()), now)
            return
        config = pool.config
        conn = UpstreamConn(pool, now)
        # The deadline covers the name lookup too.
        conn.timer = self.loop.timers.call_at(now + config.connect_timeout, lambda t: self._connect_timed_out(conn, t))
        if pool.address is None:
            self.loop.resolver.lookup(conn, config.host, config.port)
        else:
            self.connect_to(conn, pool.address, now)

    def connect_to(self, conn: UpstreamConn, address: AddrInfo | OSError, now: float) -> None:
        try:
            if isinstance(address, OSError):
                raise address
            connected = conn.start_connect(*address)
        except OSError as exc:
            self._connect_failed(conn, exc, now)
            return
        self.conns[conn.fd] = conn
        if connected:
            self._connected(conn, now)
        else:
            self.watch(conn)

    def _connect_timed_out(self, conn: UpstreamConn, now: float) -> None:
        timeout = conn.pool.config.connect_timeout
        self._connect_failed(conn, TimeoutError(f"no answer within connect_timeout={timeout}s"), now)

    def _connect_failed(self, conn: UpstreamConn, exc: Exception, now: float) -> None:
        pool = conn.pool
        self._forget(conn)
        message = f"can't connect to {pool.config.address} for pool {pool.config.name!r}: {exc}"
        # Log the first failure of a run loudly; repeats would flood the log during an outage.
        log.log(logging.DEBUG if pool.core.failures else logging.WARNING, "%s", message)
        not_ready = isinstance(exc, NotReady)
        self.loop.carry_out(pool, pool.core.connect_failed(now, message, not_ready), now)

    def _connected(self, conn: UpstreamConn, now: float) -> None:
        if conn.pool.tls is None:
            self._transport_ready(conn, now)
            return
        asks = conn.pool.protocol.before_tls()  # (PostgreSQL: its SSLRequest first)
        if asks:
            run = ProbeRun("TLS request", asks, self._start_tls, self._handshake_failed)
            self.run_checks(conn, State.HANDSHAKE, run, None, now)
        else:
            self._start_tls(conn, now)

    def _start_tls(self, conn: UpstreamConn, now: float) -> None:
        """The TLS handshake, in this loop, within connect_timeout (counted from the connect)."""
        if conn.timer is None:  # (a run of checks before it ended the connect's timer: a new one)
            deadline = conn.opened_at + conn.pool.config.connect_timeout
            conn.timer = self.loop.timers.call_at(deadline, lambda t: self._connect_timed_out(conn, t))
        context = conn.pool.tls
        assert context is not None
        conn.move(State.TLS)
        try:
            conn.start_tls(context, tls.server_name(conn.pool.config))
        except OSError as exc:
            self._connect_failed(conn, exc, now)
            return
        self._advance_tls(conn, now)

    def _advance_tls(self, conn: UpstreamConn, now: float) -> None:
        try:
            waiting = conn.handshake()
        except OSError as exc:
            self._connect_failed(conn, OSError(f"TLS handshake failed: {exc}"), now)
            return
        if waiting:
            self.watch(conn)
        else:
            self._transport_ready(conn, now)

    def _transport_ready(self, conn: UpstreamConn, now: float) -> None:
        """Connected (over TLS if the pool says so): the on_connect steps, then into the pool."""
        protocol = conn.pool.protocol
        if protocol.handshake:  # it runs within connect_timeout: the connect's timer goes on
            checks = protocol.handshake_run()

            def handshaken(conn: UpstreamConn, now: float) -> None:
                login = postgres.announced(checks)  # (what a PostgreSQL login learned)
                if login is not None:
                    conn.backend_key = login.backend_key
                    conn.pool.server_parameters = login.parameters
                self._handshaken(conn, now)

            run = ProbeRun("on_connect", checks, handshaken, self._handshake_failed, pipelined=protocol.pipelined)
            self.run_checks(conn, State.HANDSHAKE, run, None, now)
        else:
            self._handshaken(conn, now)

    def close(self, conn: UpstreamConn, reason: str) -> None:
        level = logging.WARNING if reason in ("broken", "unread", "out_of_sync") else logging.DEBUG
        why = f": {conn.error}" if conn.error else ""
        log.log(level, "pool %r: closing a connection (%s%s)", conn.pool.config.name, reason, why)
        if reason in CUT_SHORT:  # (PostgreSQL: its backend may still run a query, holding locks)
            conn.cancel(conn.pool.config.connect_timeout)
        self._forget(conn)

    def _forget(self, conn: UpstreamConn) -> None:
        self.loop.timers.cancel(conn.timer)
        conn.timer = None
        if conn.watching:
            self.loop.epoll.unregister(conn.fd)
            conn.watching = 0
        if self.conns.get(conn.fd) is conn:
            del self.conns[conn.fd]
        conn.close()

    def watch(self, conn: UpstreamConn) -> None:
        """Poll `conn` for what its state needs (connection.POLL): an idle one for readability (a
        close by the upstream or stray bytes), a leased one only while an exchange sends or reads."""
        state = conn.state
        wait = POLL[state]
        if state is State.TLS:
            flags = conn.tls_wants
        else:
            if wait is None and state is State.LEASED:
                exchange = conn.lease.exchange if conn.lease is not None else None
                if exchange is None and conn.watching & select.EPOLLONESHOT:
                    # The idle watch stays: the lease's own bytes wake the loop once at most
                    # (and seldom), and its return finds it still armed, mostly. Two epoll_ctl
                    # calls a lease saved; a lent socket's lease is little more than those.
                    return
                wait = Wait.NOTHING if exchange is None else Wait.WRITE if exchange.send is not None else Wait.READ
            elif wait is None:  # a run of checks
                run = conn.checks
                wait = Wait.NOTHING if run is None else Wait.WRITE if run.send is not None else Wait.READ
            flags = EPOLL_FLAGS[wait]
        if flags != conn.watching:
            if not flags:
                self.loop.epoll.unregister(conn.fd)
            elif conn.watching:
                self.loop.epoll.modify(conn.fd, flags)
            else:
                self.loop.epoll.register(conn.fd, flags)
            conn.watching = flags

    def on_event(self, conn: UpstreamConn, now: float) -> None:
        """What an event means depends on the connection's state, and on nothing else."""
        if conn.watching & select.EPOLLONESHOT:
            conn.watching = SPENT  # (reported: the kernel disarmed it)
        state = conn.state
        if state is State.LEASED:
            exchange = conn.lease.exchange if conn.lease is not None else None
            if exchange is None:
                self.watch(conn)
                return
            if exchange.send is None:
                try:
                    conn.fill()
                except OSError as exc:
                    conn.fail(f"read from upstream failed: {exc}")
                    self.loop.leasing.finish_error(exchange, ErrorCode.UPSTREAM_ERROR, conn.error, now)
                    return
            self.loop.leasing.advance(exchange, now)
        elif state is State.IDLE:
            # Idle and readable: the upstream closed it, or sent bytes nobody asked for.
            reason = conn.unfit()
            if reason is None:  # nothing there: an event from the poll that saw the fd's former owner
                self.watch(conn)  # (armed again)
                return
            conn.error = "closed by the upstream while idle" if reason == "broken" else "unasked bytes while idle"
            self.loop.carry_out(conn.pool, conn.pool.core.lost(conn, now, reason), now)
        elif state in CHECKING:
            self._advance_probe(conn, now)
        elif state is State.CONNECTING:
            try:
                error = conn.connect_result()
            except BlockingIOError:
                return  # not yet: an event from the poll that saw the fd's former owner
            if error is None:
                self._connected(conn, now)
            else:
                self._connect_failed(conn, error, now)
        elif state is State.TLS:
            self._advance_tls(conn, now)

    # -- probes ----------------------------------------------------------------------------

    def start_probe(self, conn: UpstreamConn, now: float) -> None:
        pool = conn.pool
        if pool.fences:  # (the core lent this one for a fence: core.check_one)
            self._start_fence(conn, now)
            return
        if pool.probe is None:  # tcp: open and nothing unread, known without a round trip
            unfit = conn.unfit()
            if unfit is None:
                self.loop.carry_out(pool, pool.core.probe_ok(conn, now), now)
            else:
                why = "closed by the upstream" if unfit == "broken" else "unread bytes"
                self._probe_failed(conn, ProbeFailed(f"tcp probe: {why}"), now)
            return
        self.run_checks(
            conn,
            State.PROBING,
            ProbeRun(f"{pool.probe.name} probe", [pool.probe.new_check()], self._probe_passed, self._probe_failed),
            "probe_timeout",
            now,
        )

    def _start_fence(self, conn: UpstreamConn, now: float) -> None:
        """A fence on one of this pool's own connections (decide/fence.py): the Future has how many
        connections it ended, or the failure. The connection then goes back to the pool, or, if
        the fence failed, closes as after a failed probe (what it left unread is unknown)."""
        check, done = conn.pool.fences.popleft()

        def passed(conn: UpstreamConn, now: float) -> None:
            done.set_result(getattr(check, "ended", 0))
            self._probe_passed(conn, now)

        def failed(conn: UpstreamConn, failure: ProbeFailed, now: float) -> None:
            done.set_exception(failure)
            self._probe_failed(conn, failure, now)

        self.run_checks(conn, State.PROBING, ProbeRun("fence", [check], passed, failed), "io_timeout", now)

    def run_checks(self, conn: UpstreamConn, state: State, run: ProbeRun, limit: str | None, now: float) -> None:
        """Start `run` on `conn` (moving it into `state`), bounded by the pool's setting named
        `limit` (None: by the timer the connection already has)."""
        conn.move(state)
        conn.checks = run
        if limit is not None:
            timeout = getattr(conn.pool.config, limit)
            error = f"no answer within {limit}={timeout}s"
            conn.timer = self.loop.timers.call_at(
                now + timeout, lambda t: self._checks_failed(conn, ProbeFailed(error), t)
            )
        self._advance_probe(conn, now)

    def _advance_probe(self, conn: UpstreamConn, now: float) -> None:
        run = conn.checks
        assert run is not None
        try:
            while True:
                if run.send is not None:
                    sent = conn.send(run.send)
                    run.send = run.send[sent:] if sent < len(run.send) else None
                    if run.send is not None:
                        break  # the socket's buffer is full: wait until it is writable
                conn.fill()
                if conn.eof:
                    raise ProbeFailed("closed by the upstream")
                if not run.check.read(conn.rbuf):
                    answer = run.check.outgoing  # a dialogue's next word (a password, a SCRAM step)
                    if answer:
                        run.check.outgoing = b""
                        run.send = memoryview(answer)
                        continue
                    break  # the answer is not all there: wait until it is readable
                last = run.step + 1 == len(run.checks)
                if conn.rbuf and (last or not run.pipelined):  # (pipelined: the next answers may be here)
                    raise ProbeFailed("bytes after the answer: out of sync")
                if last:
                    self._end_probe(conn)
                    run.on_pass(conn, now)
                    return
                run.next_step()
        except ProbeFailed as exc:
            self._checks_failed(conn, exc, now)
            return
        except OSError as exc:
            self._checks_failed(conn, ProbeFailed(str(exc)), now)
            return
        self.watch(conn)

    def _checks_failed(self, conn: UpstreamConn, failure: ProbeFailed, now: float) -> None:
        run = conn.checks
        if run is None:
            return  # (already ended)
        self._end_probe(conn)
        run.on_fail(conn, type(failure)(f"{run.describe()}: {failure}"), now)  # (NotReady stays NotReady)

    def _end_probe(self, conn: UpstreamConn) -> None:
        conn.checks = None
        self.loop.timers.cancel(conn.timer)
        conn.timer = None
        self.watch(conn)

    def _probe_passed(self, conn: UpstreamConn, now: float) -> None:
        conn.move(State.IDLE)  # (the core then hands it to a waiter, or keeps it idle)
        self.loop.carry_out(conn.pool, conn.pool.core.probe_ok(conn, now), now)

    def _probe_failed(self, conn: UpstreamConn, failure: ProbeFailed, now: float) -> None:
        pool = conn.pool
        self._end_probe(conn)
        conn.error = str(failure)
        log.warning("pool %r: %s; checking its other idle connections", pool.config.name, failure)
        self.loop.carry_out(pool, pool.core.probe_failed(conn, now), now)

    # -- handshake and reset: the pool's on_connect and reset steps ----------------------------

    def _handshaken(self, conn: UpstreamConn, now: float) -> None:
        """Connected, and the on_connect steps (if any) passed: the connection joins the pool."""
        pool = conn.pool
        self.loop.timers.cancel(conn.timer)
        conn.timer = None
        if pool.core.failures:  # (the core counts failures in a row until this success)
            log.info("pool %r: upstream %s reachable again", pool.config.name, pool.config.address)
        conn.move(State.IDLE)
        self.loop.carry_out(pool, pool.core.connected(conn, now, conn.opened_at), now)
        self.watch(conn)

    def _handshake_failed(self, conn: UpstreamConn, failure: ProbeFailed, now: float) -> None:
        self._connect_failed(conn, failure, now)

    def _reset_passed(self, conn: UpstreamConn, now: float) -> None:
        conn.move(State.IDLE)
        self.loop.carry_out(conn.pool, conn.pool.core.release(conn, now), now)
        self.watch(conn)

    def _reset_failed(self, conn: UpstreamConn, failure: ProbeFailed, now: float) -> None:
        conn.fail(str(failure))
        self.loop.carry_out(conn.pool, conn.pool.core.release(conn, now, "broken"), now)
        self.watch(conn)
