"""The broker's server loop: one thread, one epoll over the ROUTER socket and every upstream
socket, and a timer heap for deadlines. It decodes requests, asks each pool's core what to do, and
performs the actions. Nothing here blocks: connects, sends and reads are all non-blocking.

The loop waits in a plain epoll rather than zmq.Poller: the upstream sockets stay registered from
one wait to the next (zmq_poll rebuilds its whole list on every call), and a wake-up of the
ROUTER's ZMQ_FD costs one getsockopt(EVENTS), not a pass over every socket.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import select
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import msgpack
import zmq
import zmq.backend
from zmq.utils import monitor as zmq_monitor

from broker import tls
from broker.config import BrokerConfig, ConfigError
from broker.connection import CHECKING, POLL, State
from broker.exchange import Exchange, ReadFailed, over_limits
from broker.leases import Holder, Lease, LeaseTable, Waiter
from broker.operations import Operations, unknown_pool
from broker.pool import Close, Grant, Open, Probe, Reject
from broker.pools import PoolState
from broker.probes import ProbeFailed
from broker.protocols import CLOSE, RUN_RESET
from broker.resolver import AddrInfo, Resolver
from broker.security import CurveKeys, peer_credentials, peer_is_admin, serve_curve
from broker.timers import Timers
from broker.upstream import ProbeRun, UpstreamConn
from client.protocol import (
    OP_ADMIN,
    OP_IO,
    OP_LEASE,
    OP_RELEASE,
    READ_ANY,
    RELEASE_KEEP,
    TOKEN_BYTES,
    BadRequest,
    ErrorCode,
    Request,
    error_reply,
    ok_reply,
    parse_request,
)

log = logging.getLogger(__name__)

ROUTER_BATCH = 256  # messages taken per wake-up before looking at upstream sockets again
REPLIES_QUEUED_PER_CLIENT = 100  # then replies to that client are dropped (ZeroMQ SNDHWM)
TOKEN_BATCH = 256  # lease tokens drawn from the OS's random source per read (one syscall, not one each)
# ZMTP heartbeats: a client whose process is frozen (SIGSTOP, a hung host) stops answering them and
# its connection is dropped, which reclaims its leases. A stuck Python thread still answers (libzmq
# answers without the GIL): lease_idle_timeout and max_lease_time bound that case.
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 5000


# The hot path calls pyzmq's compiled socket methods directly, with plain ints: the Python layer
# over them (routing-id checks, results turned into enum.Flag values) cost about 1 us a call.
EVENTS, FD, RCVMORE = int(zmq.EVENTS), int(zmq.FD), int(zmq.RCVMORE)
POLLIN = int(zmq.POLLIN)
NOBLOCK, SNDMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE)


def _int_option(sock: zmq.Socket[Any]) -> Callable[[int], int]:
    """`sock.getsockopt`, for the options that are ints (FD, EVENTS, RCVMORE)."""
    return cast(Callable[[int], int], functools.partial(zmq.backend.Socket.get, sock))


class Server:
    """The broker: bind(), then serve() until stop() is called (from a signal handler or thread)."""

    def __init__(
        self,
        config: BrokerConfig,
        ctx: zmq.Context[Any] | None = None,
        curve: CurveKeys | None = None,
        reload_config: Callable[[], BrokerConfig] | None = None,
    ) -> None:
        self.config = config
        self.reload_config = reload_config  # reads the config file again (SIGHUP, admin reload)
        self._reload_requested = False
        self.ctx = ctx or zmq.Context()
        self.pools = {pool.name: PoolState(pool) for pool in config.pools}
        self.table = LeaseTable()  # holders, waiters and leases
        self.leases = self.table.leases  # (by token: the table's own dict)
        self.conns: dict[int, UpstreamConn] = {}  # by fd
        self.timers = Timers()
        self.packer = msgpack.Packer(use_bin_type=True)
        self.curve = curve
        self.bad_requests = 0
        self.requests_received = 0  # every message: a one-shot lease cycle is one
        self.endpoint = ""
        self.ipc_path: str | None = None
        self.router = self.ctx.socket(zmq.ROUTER)
        # A reply to a peer that is gone raises EHOSTUNREACH instead of vanishing: that is how an
        # unclaimed grant goes back to the pool.
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.MAXMSGSIZE, config.max_message_size)
        # Replies a client leaves unread queue here; a well-behaved client has a few in flight at
        # most, so a short queue bounds what one that never reads can make the broker hold.
        self.router.setsockopt(zmq.SNDHWM, REPLIES_QUEUED_PER_CLIENT)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        self.router.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        # CURVE: a client gets in only with a listed key (the check runs in pyzmq's ZAP thread).
        self.authenticator = serve_curve(self.ctx, self.router, curve) if curve is not None else None
        # Disconnect events name the fd of a connection that closed: the first message of each
        # holder carries its fd (SRCFD), so the broker knows whose leases to reclaim.
        self.monitor = self.router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.holders = self.table.holders  # (by routing id: the table's own dict)
        self.epoll = select.epoll()
        self.epoll.register(_int_option(self.router)(FD), select.EPOLLIN)
        self.epoll.register(_int_option(self.monitor)(FD), select.EPOLLIN)
        # stop() writes a byte here: the one wake-up that works from a signal handler.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.epoll.register(self._wake_r.fileno(), select.EPOLLIN)
        # A zmq socket's FD turns readable once when its state may have changed: a send or recv on
        # the socket may take in that signal (the message is then queued, the FD quiet). So after
        # using the ROUTER, ask EVENTS (or recv to EAGAIN) before waiting; asking costs a syscall,
        # so only then.
        self._router_used = False
        self._router_get = _int_option(self.router)
        self._router_send = functools.partial(zmq.backend.Socket.send, self.router)
        self._tokens = b""  # random bytes drawn ahead for lease tokens
        self._token_at = 0
        self.resolver: Resolver[UpstreamConn] = Resolver(self._wake)
        self._outbox: deque[tuple[PoolState, Any]] = deque()  # pool actions decided, not yet carried out
        self._carrying_out = False
        self._stop_requests = 0  # a second one ends the shutdown grace at once
        self._drain_until: float | None = None  # set once shutting down: when leases are cut short
        self._handlers: dict[str, Callable[[bytes, Request, float], None]] = {
            OP_LEASE: self._on_lease,
            OP_IO: self._on_io,
            OP_RELEASE: self._on_release,
        }
        # Requests that look at or change the broker rather than lease from it.
        self.operations = Operations(self)
        self._handlers.update(self.operations.handlers())

    # -- lifecycle -------------------------------------------------------------------------

    def bind(self, endpoint: str) -> str:
        """Bind the ROUTER socket; returns the endpoint actually bound (tcp port resolved)."""
        if endpoint.startswith("ipc://"):
            # The socket file is created 0777 & ~umask: make it 0600 (owner only).
            old = os.umask(0o177)
            try:
                self.router.bind(endpoint)
            finally:
                os.umask(old)
            self.ipc_path = endpoint[len("ipc://") :]  # ours to remove at close
        else:
            self.router.bind(endpoint)
        self.endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.endpoint

    @property
    def shutting_down(self) -> bool:
        return self._drain_until is not None

    @property
    def wakeup_fd(self) -> int:
        """Writing to this fd wakes the loop (for signal.set_wakeup_fd)."""
        return self._wake_w.fileno()

    def stop(self) -> None:
        """Ask the loop to end: active leases get shutdown_grace to finish; a second call ends them
        at once. Safe from a signal handler or another thread."""
        self._stop_requests += 1
        self._wake()

    def request_reload(self) -> None:
        """Reread the config file soon, in the loop (safe from a signal handler: SIGHUP)."""
        self._reload_requested = True
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # the wake-up pipe is full: the loop is waking anyway

    def serve(self) -> None:
        """Run until stop(): then grant no more, answer waiters, let active leases finish for up to
        shutdown_grace, close every upstream connection and return."""
        wait = self.epoll.poll
        router_events = self._router_get
        router_fd = router_events(FD)
        monitor_fd = _int_option(self.monitor)(FD)
        wake_fd = self._wake_r.fileno()
        conns = self.conns
        for pool in self.pools.values():
            self.log_opened(pool)
        self._run_due(time.monotonic(), start=True)  # warm up to min_idle
        while not self._done_serving(time.monotonic()):
            deadline = self._next_deadline()
            requests = self._router_used and bool(router_events(EVENTS) & POLLIN)
            self._router_used = False
            timeout = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            events = wait(0.0 if requests else timeout)
            now = time.monotonic()
            monitor = False
            for fd, _ in events:
                conn = conns.get(fd)
                if conn is not None:
                    try:
                        self._on_upstream_event(conn, now)
                    except Exception:
                        # A bug of ours on one connection must not end every client's pool.
                        log.exception("failed to handle an event on %r", conn)
                elif fd == router_fd:
                    requests = True
                elif fd == monitor_fd:
                    monitor = True
                elif fd == wake_fd:
                    self._drain_wake(now)
            if monitor:
                self._drain_monitor(now)
            # Requests last: a close by the upstream that arrived with them is seen before a
            # request could be granted that connection.
            if requests or self._router_used:
                self._drain_router(now)
            if deadline is not None and deadline <= time.monotonic():
                self._run_due(time.monotonic())
        now = time.monotonic()
        for lease in list(self.leases.values()):
            log.warning("pool %r: shutdown grace is over: ending a %s", lease.pool.config.name, lease.describe(now))
            self._end_lease(lease, now, keep=False, reason="shutdown")

    def close(self) -> None:
        """Release the sockets and remove the ipc socket file."""
        for conn in list(self.conns.values()):
            conn.close()
        self.conns.clear()
        self.resolver.close()
        self.router.disable_monitor()
        self.monitor.close(linger=0)
        # Give error replies to waiters a moment to leave, bounded.
        self.router.close(linger=200)
        if self.authenticator is not None:
            self.authenticator.stop()
        self._wake_r.close()
        self._wake_w.close()
        self.epoll.close()
        if self.ipc_path:
            try:
                os.unlink(self.ipc_path)
            except FileNotFoundError:
                pass

    def _done_serving(self, now: float) -> bool:
        if not self._stop_requests:
            return False
        if self._drain_until is None:
            grace = self.config.shutdown_grace
            log.info(
                "shutting down: %d waiting answered; %d leases active, given up to %.1fs to finish",
                self._waiting(),
                len(self.leases),
                grace,
            )
            for pool in self.pools.values():
                self.carry_out(pool, pool.core.shutdown(), now)
            self._drain_until = now + grace
            self.timers.call_at(self._drain_until, lambda t: None)  # wake the loop then
        return not self.leases or now >= self._drain_until or self._stop_requests > 1

    def _waiting(self) -> int:
        return sum(pool.core.waiting for pool in self.pools.values())

    def _drain_wake(self, now: float) -> None:
        try:
            while self._wake_r.recv(512):
                pass
        except BlockingIOError:
            pass
        for conn, answer in self.resolver.results():
            if conn.state is not State.CLOSED:  # else its connect timed out while the lookup ran
                self._connect_to(conn, answer, now)
        if self._reload_requested:
            self._reload_requested = False
            try:
                self.operations.reload(now)
            except ConfigError as exc:
                log.error("reload failed, nothing changed: %s", exc)

    def _drain_monitor(self, now: float, *, requests_first: bool = True) -> None:
        gone = []
        while True:
            try:
                event = zmq_monitor.parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            if event["event"] == zmq.EVENT_DISCONNECTED:
                holder = self.table.by_fd.pop(int(event["value"]), None)
                if holder is not None:
                    gone.append(holder)
        if gone and requests_first:
            # What a holder sent before its connection closed (a release, say) is already queued,
            # since libzmq reports the close after delivering what came before it: take it first.
            self._drain_router(now, batch=None)
        for holder in gone:
            if not holder.gone:
                self._holder_gone(holder, now, "its connection closed")

    def _holder_of(self, peer: bytes, frame: zmq.Frame | None, now: float) -> Holder:
        """The Holder for a lease request's sender, known by its fd from its first request on."""
        holder = self.holders.get(peer)
        if holder is not None:
            return holder
        assert frame is not None  # (an unknown peer's message is always received as a Frame)
        fd = frame.get(zmq.SRCFD)
        pid = peer_credentials(frame)[1] if self.ipc_path else None
        process = ("pid", pid) if pid is not None else peer
        holder = Holder(peer, fd, process, self._is_admin(peer, frame))
        if fd >= 0:
            # The fd may have served an earlier connection. libzmq reports that one's disconnect
            # before it closes the fd, so before this connection could have it: read those reports
            # first, or a late one would be taken for this connection's.
            self._drain_monitor(now, requests_first=False)
        previous = self.table.add_holder(holder)
        if previous is not None:  # (never seen: a disconnect report always comes first)
            self._holder_gone(previous, now, "its connection closed (its fd was reused)")
        return holder

    def _holder_gone(self, holder: Holder, now: float, why: str) -> None:
        """A holder's connection closed: its waiters leave the line and its leases are reclaimed
        (their connections closed: what the holder left in them is unknown)."""
        self.table.remove_holder(holder)
        for waiter in list(holder.waiters):
            waiter.pool.core.cancel(waiter)
            self.table.leaves_line(waiter)
        for lease in list(holder.leases):
            log.warning("pool %r: reclaiming a %s: %s", lease.pool.config.name, lease.describe(now), why)
            self._end_lease(lease, now, keep=False, reason="reclaimed")

    def _next_deadline(self) -> float | None:
        deadline = self.timers.next_deadline()
        for pool in self.pools.values():
            pool_deadline = pool.core.next_deadline()
            if pool_deadline is not None and (deadline is None or pool_deadline < deadline):
                deadline = pool_deadline
        return deadline

    def _run_due(self, now: float, start: bool = False) -> None:
        self.timers.run_due(now)
        for pool in self.pools.values():
            deadline = pool.core.next_deadline()
            if start or (deadline is not None and deadline <= now):
                self.carry_out(pool, pool.core.tick(now), now)

    # -- requests --------------------------------------------------------------------------

    def _drain_router(self, now: float, batch: int | None = ROUTER_BATCH) -> None:
        """Handle the requests that have arrived: up to `batch` of them, or all (None)."""
        recv = self.router.recv
        option = self._router_get
        holders = self.holders
        for _ in range(batch) if batch is not None else itertools.count():
            try:
                peer = recv(NOBLOCK)  # a ROUTER gives the sender's routing id first, then what it sent
            except zmq.Again:
                self._router_used = False  # (an EAGAIN puts the FD and the queue back in step)
                return
            # A holder's first request comes as a Frame, which carries the fd of its connection.
            frame = None if peer in holders else recv(NOBLOCK, copy=False)
            data = frame.bytes if frame is not None else recv(NOBLOCK)
            self.requests_received += 1
            if option(RCVMORE):
                while option(RCVMORE):
                    recv(NOBLOCK)
                self.bad_requests += 1
                self.reply(peer, error_reply(None, ErrorCode.BAD_REQUEST, "a request is exactly one frame"))
                continue
            self._on_message(peer, data, frame, now)
        self._router_used = True  # the batch ran out: ask again before waiting

    def _on_message(self, peer: bytes, data: bytes, frame: zmq.Frame | None, now: float) -> None:
        try:
            req = parse_request(data)
        except BadRequest as exc:
            self.bad_requests += 1
            self.reply(peer, error_reply(exc.request_id, exc.code, exc.message))
            return
        except Exception:
            # A parser bug must cost one request, never the broker.
            log.exception("failed to parse a request")
            self.bad_requests += 1
            self.reply(peer, error_reply(None, ErrorCode.BAD_REQUEST, "malformed request"))
            return
        try:
            if req.op == OP_LEASE:
                self._holder_of(peer, frame, now)  # the sender's fd, while its frame is at hand
            elif req.op == OP_ADMIN and not self._is_admin(peer, frame):
                self.reply(
                    peer, error_reply(req.id, ErrorCode.NOT_AUTHORIZED, f"{req.action!r} is for administrators only")
                )
                return
            self._handlers[req.op](peer, req, now)
        except Exception:
            # A bug of ours must not end the broker, nor leave the client without an answer.
            log.exception("failed to handle %s request %d", req.op, req.id)
            self.reply(peer, error_reply(req.id, ErrorCode.INTERNAL, "internal broker error; see the broker's log"))

    def _is_admin(self, peer: bytes, frame: zmq.Frame | None) -> bool:
        if frame is None:  # a known holder: decided on its first request
            return self.holders[peer].admin
        return peer_is_admin(frame, self.ipc_path is not None, self.curve)

    def log_opened(self, pool: PoolState) -> None:
        c = pool.config
        log.info("pool %r opened: upstream %s, max_size %d, min_idle %d", c.name, c.address, c.max_size, c.min_idle)

    def _on_lease(self, peer: bytes, req: Request, now: float) -> None:
        assert req.pool is not None  # parse_request guarantees it
        pool = self.pools.get(req.pool)
        if pool is None:
            self.reply(peer, unknown_pool(self.pools, req))
            return
        if req.has_exchange and not self._exchange_fits(peer, req):
            return
        holder = self.holders[peer]
        limit = pool.config.max_leases_per_client
        if limit and self.table.taken_by(holder.process, pool) >= limit:
            message = f"this process holds or waits for {limit} leases of pool {req.pool!r} (max_leases_per_client)"
            self.reply(peer, error_reply(req.id, ErrorCode.LIMIT_EXCEEDED, message))
            return
        waiter = Waiter(holder, req, pool)
        waiting = self.table.waiting_payload
        if waiter.payload and waiting + waiter.payload > self.config.max_waiting_payload:
            limit = self.config.max_waiting_payload
            message = f"lease requests in line already carry {waiting} bytes (max_waiting_payload={limit})"
            self.reply(peer, error_reply(req.id, ErrorCode.LIMIT_EXCEEDED, message))
            return
        self.table.queue(waiter)
        timeout = req.timeout if req.timeout is not None else pool.config.acquire_timeout
        self.carry_out(pool, pool.core.request(waiter, now, now + timeout), now)

    def _on_io(self, peer: bytes, req: Request, now: float) -> None:
        lease = self._lease_of(peer, req)
        if lease is None:
            return
        if lease.exchange is not None:
            self.reply(
                peer, error_reply(req.id, ErrorCode.LEASE_BUSY, "an I/O operation is already in progress on this lease")
            )
            return
        if self._exchange_fits(peer, req):
            self._start_exchange(lease, peer, req, now, first=False)

    def _on_release(self, peer: bytes, req: Request, now: float) -> None:
        lease = self._lease_of(peer, req)
        if lease is None:
            return
        if not req.noreply:  # the answer first: a reset that follows is no business of the client's
            self.reply(peer, ok_reply(req.id))
        self._end_lease(lease, now, keep=req.release == RELEASE_KEEP)

    def _lease_of(self, peer: bytes, req: Request) -> Lease | None:
        assert req.lease is not None
        lease = self.table.lease_of(peer, req.lease)
        if lease is None:
            if not req.noreply:
                self.reply(
                    peer, error_reply(req.id, ErrorCode.LEASE_LOST, "no such lease (released, reclaimed, or not yours)")
                )
            return None
        return lease

    def _exchange_fits(self, peer: bytes, req: Request) -> bool:
        problem = over_limits(req, self.config.max_payload)
        if problem is not None:
            self.reply(peer, error_reply(req.id, ErrorCode.LIMIT_EXCEEDED, problem))
        return problem is None

    def reply(self, peer: bytes, reply: dict[str, Any]) -> bool:
        """Send a reply; False when the peer is gone or not reading (never blocks the loop)."""
        self._router_used = True
        try:
            # (the ROUTER takes the routing id and refuses, with MANDATORY, at the first frame)
            self._router_send(peer, NOBLOCK | SNDMORE)
            self._router_send(self.packer.pack(reply), NOBLOCK)
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: disconnected; EAGAIN: its queue is full. Either way it won't hear us.
            log.debug("reply %s to a peer that is gone: %s", reply.get("id"), exc)
            return False
        return True

    # -- pool actions ----------------------------------------------------------------------

    def carry_out(self, pool: PoolState, actions: list[Any], now: float) -> None:
        """Carry out what a pool core decided, in order, in this one place. Actions that carrying
        out one of them leads to (a release that grants the next waiter, say) join the back of the
        queue: each action runs to its end before the next begins, never from inside another."""
        self._outbox.extend((pool, action) for action in actions)
        if self._carrying_out:
            return
        self._carrying_out = True
        try:
            while self._outbox:
                pool, action = self._outbox.popleft()
                try:
                    self._carry_out(pool, action, now)
                except Exception:
                    # A bug of ours in one action must not strand those queued behind it.
                    log.exception("pool %r: failed to carry out %r", pool.config.name, action)
        finally:
            self._carrying_out = False

    def _carry_out(self, pool: PoolState, action: Any, now: float) -> None:
        kind = type(action)
        if kind is Grant:
            self._grant(action.request, action.conn, now)
        elif kind is Open:
            self._open(pool, now)
        elif kind is Probe:
            self._start_probe(action.conn, now)
        elif kind is Close:
            self._close_conn(action.conn, action.reason)
        elif kind is Reject:
            waiter = action.request
            self.table.leaves_line(waiter)
            self.reply(waiter.peer, error_reply(waiter.req.id, action.code, action.message))

    def _grant(self, waiter: Waiter, conn: UpstreamConn, now: float) -> None:
        holder = waiter.holder
        self.table.leaves_line(waiter)
        token = self._new_token()
        new_session = waiter.pool.protocol.new_session
        lease = Lease(token, conn, waiter, new_session() if new_session is not None else None, now)
        self.table.add(lease)
        conn.move(State.LEASED)
        conn.lease = lease
        if holder.gone:  # (cancelled waiters are never granted; this is the one place to be sure)
            self._end_lease(lease, now, keep=True)
            return
        req = waiter.req
        if req.has_exchange:
            self._start_exchange(lease, waiter.peer, req, now, first=True)
        else:
            self._watch(conn)
            if not self.reply(waiter.peer, ok_reply(req.id, lease=token)):
                # The requester left (timed out, gave up, died): the connection goes back at once.
                self._end_lease(lease, now, keep=True)
        # A one-shot cycle (its first exchange carries the release) ends with that exchange, whose
        # own deadline bounds it: it needs no watch of its own.
        if self.table.active(lease) and not (req.release is not None and lease.exchange is not None):
            self._schedule_lease_check(lease, now)

    def _new_token(self) -> bytes:
        """128 bits from the OS's random source (as secrets.token_bytes), drawn TOKEN_BATCH at a time."""
        at = self._token_at
        if at >= len(self._tokens):
            self._tokens = os.urandom(TOKEN_BYTES * TOKEN_BATCH)
            at = 0
        self._token_at = at + TOKEN_BYTES
        return self._tokens[at : at + TOKEN_BYTES]

    def _open(self, pool: PoolState, now: float) -> None:
        config = pool.config
        conn = UpstreamConn(pool, now)
        # The deadline covers the name lookup too.
        conn.timer = self.timers.call_at(now + config.connect_timeout, lambda t: self._connect_timed_out(conn, t))
        if pool.address is None:
            self.resolver.lookup(conn, config.host, config.port)
        else:
            self._connect_to(conn, pool.address, now)

    def _connect_to(self, conn: UpstreamConn, address: AddrInfo | OSError, now: float) -> None:
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
            self._watch(conn)

    def _connect_timed_out(self, conn: UpstreamConn, now: float) -> None:
        timeout = conn.pool.config.connect_timeout
        self._connect_failed(conn, TimeoutError(f"no answer within connect_timeout={timeout}s"), now)

    def _connect_failed(self, conn: UpstreamConn, exc: Exception, now: float) -> None:
        pool = conn.pool
        self._forget(conn)
        message = f"can't connect to {pool.config.address} for pool {pool.config.name!r}: {exc}"
        # Log the first failure of a run loudly; repeats would flood the log during an outage.
        log.log(logging.DEBUG if pool.core.failures else logging.WARNING, "%s", message)
        self.carry_out(pool, pool.core.connect_failed(now, message), now)

    def _connected(self, conn: UpstreamConn, now: float) -> None:
        context = conn.pool.tls
        if context is not None:  # the TLS handshake, in this loop, within connect_timeout
            conn.move(State.TLS)
            try:
                conn.start_tls(context, tls.server_name(conn.pool.config))
            except OSError as exc:
                self._connect_failed(conn, exc, now)
                return
            self._advance_tls(conn, now)
            return
        self._transport_ready(conn, now)

    def _advance_tls(self, conn: UpstreamConn, now: float) -> None:
        try:
            waiting = conn.handshake()
        except OSError as exc:
            self._connect_failed(conn, OSError(f"TLS handshake failed: {exc}"), now)
            return
        if waiting:
            self._watch(conn)
        else:
            self._transport_ready(conn, now)

    def _transport_ready(self, conn: UpstreamConn, now: float) -> None:
        """Connected (over TLS if the pool says so): the on_connect steps, then into the pool."""
        protocol = conn.pool.protocol
        if protocol.handshake:  # it runs within connect_timeout: the connect's timer goes on
            run = ProbeRun(
                "on_connect", protocol.handshake, self._handshaken, self._handshake_failed, pipelined=protocol.pipelined
            )
            self._run_checks(conn, State.HANDSHAKE, run, None, now)
        else:
            self._handshaken(conn, now)

    def _close_conn(self, conn: UpstreamConn, reason: str) -> None:
        level = logging.WARNING if reason in ("broken", "unread", "out_of_sync") else logging.DEBUG
        why = f": {conn.error}" if conn.error else ""
        log.log(level, "pool %r: closing a connection (%s%s)", conn.pool.config.name, reason, why)
        self._forget(conn)

    def _forget(self, conn: UpstreamConn) -> None:
        self.timers.cancel(conn.timer)
        conn.timer = None
        if conn.watching:
            self.epoll.unregister(conn.fd)
            conn.watching = 0
        if self.conns.get(conn.fd) is conn:
            del self.conns[conn.fd]
        conn.close()

    def _watch(self, conn: UpstreamConn) -> None:
        """Poll `conn` for what its state needs (connection.POLL): an idle one for readability (a
        close by the upstream or stray bytes), a leased one only while an exchange sends or reads."""
        state = conn.state
        flags = POLL[state]
        if flags is None:
            if state is State.TLS:
                flags = conn.tls_wants
            elif state is State.LEASED:
                exchange = conn.lease.exchange if conn.lease is not None else None
                flags = 0 if exchange is None else select.EPOLLOUT if exchange.send is not None else select.EPOLLIN
            else:  # a run of checks
                run = conn.checks
                flags = 0 if run is None else select.EPOLLOUT if run.send is not None else select.EPOLLIN
        if flags != conn.watching:
            if not flags:
                self.epoll.unregister(conn.fd)
            elif conn.watching:
                self.epoll.modify(conn.fd, flags)
            else:
                self.epoll.register(conn.fd, flags)
            conn.watching = flags

    def _on_upstream_event(self, conn: UpstreamConn, now: float) -> None:
        """What an event means depends on the connection's state, and on nothing else."""
        state = conn.state
        if state is State.LEASED:
            exchange = conn.lease.exchange if conn.lease is not None else None
            if exchange is None:
                self._watch(conn)
                return
            if exchange.send is None:
                try:
                    conn.fill()
                except OSError as exc:
                    conn.fail(f"read from upstream failed: {exc}")
                    self._finish_error(exchange, ErrorCode.UPSTREAM_ERROR, conn.error, now)
                    return
            self._advance(exchange, now)
        elif state is State.IDLE:
            # Idle and readable: the upstream closed it, or sent bytes nobody asked for.
            reason = conn.unfit()
            if reason is None:
                return  # nothing there: an event from the poll that saw the fd's former owner
            conn.error = "closed by the upstream while idle" if reason == "broken" else "unasked bytes while idle"
            self.carry_out(conn.pool, conn.pool.core.lost(conn, now, reason), now)
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

    def _start_probe(self, conn: UpstreamConn, now: float) -> None:
        pool = conn.pool
        if pool.probe is None:  # tcp: open and nothing unread, known without a round trip
            unfit = conn.unfit()
            if unfit is None:
                self.carry_out(pool, pool.core.probe_ok(conn, now), now)
            else:
                why = "closed by the upstream" if unfit == "broken" else "unread bytes"
                self._probe_failed(conn, f"tcp probe: {why}", now)
            return
        self._run_checks(
            conn,
            State.PROBING,
            ProbeRun(f"{pool.probe.name} probe", [pool.probe.new_check()], self._probe_passed, self._probe_failed),
            "probe_timeout",
            now,
        )

    def _run_checks(self, conn: UpstreamConn, state: State, run: ProbeRun, limit: str | None, now: float) -> None:
        """Start `run` on `conn` (moving it into `state`), bounded by the pool's setting named
        `limit` (None: by the timer the connection already has)."""
        conn.move(state)
        conn.checks = run
        if limit is not None:
            timeout = getattr(conn.pool.config, limit)
            error = f"no answer within {limit}={timeout}s"
            conn.timer = self.timers.call_at(now + timeout, lambda t: self._checks_failed(conn, error, t))
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
                    break  # the answer is not all there: wait until it is readable
                last = run.step + 1 == len(run.checks)
                if conn.rbuf and (last or not run.pipelined):  # (pipelined: the next answers may be here)
                    raise ProbeFailed("bytes after the answer: out of sync")
                if last:
                    self._end_probe(conn)
                    run.on_pass(conn, now)
                    return
                run.next_step()
        except (OSError, ProbeFailed) as exc:
            self._checks_failed(conn, str(exc), now)
            return
        self._watch(conn)

    def _checks_failed(self, conn: UpstreamConn, error: str, now: float) -> None:
        run = conn.checks
        if run is None:
            return  # (already ended)
        self._end_probe(conn)
        run.on_fail(conn, f"{run.describe()}: {error}", now)

    def _end_probe(self, conn: UpstreamConn) -> None:
        conn.checks = None
        self.timers.cancel(conn.timer)
        conn.timer = None
        self._watch(conn)

    def _probe_passed(self, conn: UpstreamConn, now: float) -> None:
        conn.move(State.IDLE)  # (the core then hands it to a waiter, or keeps it idle)
        self.carry_out(conn.pool, conn.pool.core.probe_ok(conn, now), now)

    def _probe_failed(self, conn: UpstreamConn, error: str, now: float) -> None:
        pool = conn.pool
        self._end_probe(conn)
        conn.error = error
        log.warning("pool %r: %s; checking its other idle connections", pool.config.name, error)
        self.carry_out(pool, pool.core.probe_failed(conn, now), now)

    # -- handshake and reset: the pool's on_connect and reset steps ----------------------------

    def _handshaken(self, conn: UpstreamConn, now: float) -> None:
        """Connected, and the on_connect steps (if any) passed: the connection joins the pool."""
        pool = conn.pool
        self.timers.cancel(conn.timer)
        conn.timer = None
        if pool.core.failures:  # (the core counts failures in a row until this success)
            log.info("pool %r: upstream %s reachable again", pool.config.name, pool.config.address)
        conn.move(State.IDLE)
        self.carry_out(pool, pool.core.connected(conn, now, conn.opened_at), now)
        self._watch(conn)

    def _handshake_failed(self, conn: UpstreamConn, error: str, now: float) -> None:
        self._connect_failed(conn, ProbeFailed(error), now)

    def _reset_passed(self, conn: UpstreamConn, now: float) -> None:
        conn.move(State.IDLE)
        self.carry_out(conn.pool, conn.pool.core.release(conn, now), now)
        self._watch(conn)

    def _reset_failed(self, conn: UpstreamConn, error: str, now: float) -> None:
        conn.fail(error)
        self.carry_out(conn.pool, conn.pool.core.release(conn, now, "broken"), now)
        self._watch(conn)

    # -- leases and exchanges --------------------------------------------------------------

    def _schedule_lease_check(self, lease: Lease, now: float) -> None:
        """Look at the lease again when it may next be due for the leak warning or reclaiming."""
        config = lease.pool.config
        due = math.inf
        if config.leak_warning_after and not lease.warned:
            due = lease.since + config.leak_warning_after
        if config.lease_idle_timeout:
            # An exchange in progress is not idleness: look again a whole timeout from now.
            last_io = now if lease.exchange is not None else lease.last_io
            due = min(due, last_io + config.lease_idle_timeout)
        if config.max_lease_time:
            due = min(due, lease.since + config.max_lease_time)
        if due != math.inf:
            lease.timer = self.timers.call_at(max(due, now), lambda t: self._check_lease(lease, t))

    def _check_lease(self, lease: Lease, now: float) -> None:
        lease.timer = None
        config = lease.pool.config
        name = config.name
        if config.max_lease_time and now - lease.since >= config.max_lease_time:
            log.warning(
                "pool %r: reclaiming a %s: over max_lease_time=%ss", name, lease.describe(now), config.max_lease_time
            )
            self._end_lease(lease, now, keep=False, reason="reclaimed")
            return
        idle = lease.exchange is None and now - lease.last_io >= config.lease_idle_timeout
        if config.lease_idle_timeout and idle:
            log.warning(
                "pool %r: reclaiming a %s: no I/O for lease_idle_timeout=%ss",
                name,
                lease.describe(now),
                config.lease_idle_timeout,
            )
            self._end_lease(lease, now, keep=False, reason="reclaimed")
            return
        if config.leak_warning_after and not lease.warned and now - lease.since >= config.leak_warning_after:
            lease.warned = True
            log.warning("pool %r: possible leak: a %s", name, lease.describe(now))
        self._schedule_lease_check(lease, now)

    def _start_exchange(self, lease: Lease, peer: bytes, req: Request, now: float, first: bool) -> None:
        exchange = Exchange(lease, peer, req, first, self.config.max_payload, now)
        lease.exchange = exchange
        lease.ops += 1
        lease.last_io = now
        if exchange.poll and exchange.send is None:
            try:  # what arrived while nobody read (a leased socket is polled only during an exchange)
                lease.conn.fill()
            except OSError as exc:
                lease.conn.fail(f"read from upstream failed: {exc}")
                self._finish_error(exchange, ErrorCode.UPSTREAM_ERROR, lease.conn.error, now)
                return
        self._advance(exchange, now)
        if lease.exchange is exchange:  # still running: bound it in time
            config = lease.pool.config
            io_timeout = req.io_timeout if req.io_timeout is not None else config.io_timeout
            if first and req.release is not None and config.max_lease_time:
                io_timeout = min(io_timeout, config.max_lease_time)  # a one-shot cycle is all one lease
            exchange.timer = self.timers.call_at(now + io_timeout, lambda t: self._exchange_timed_out(exchange, t))

    def _advance(self, exchange: Exchange, now: float) -> None:
        """Move an exchange on as far as the socket allows: send, then read, then reply."""
        lease = exchange.lease
        conn = lease.conn
        if exchange.send is not None:
            try:
                sent = conn.send(exchange.send)
            except OSError as exc:
                conn.fail(f"send to upstream failed: {exc}")
                self._finish_error(exchange, ErrorCode.UPSTREAM_ERROR, conn.error, now)
                return
            lease.bytes_sent += sent
            if lease.session is not None:
                lease.session.sent(exchange.send[:sent])
            if exchange.sent(sent) is not None:
                self._watch(conn)
                return
        if exchange.read is None:
            self._finish_ok(exchange, None, now)
            return
        try:
            data = exchange.take(conn.rbuf, conn.eof)
        except ReadFailed as exc:
            if exc.code == ErrorCode.UPSTREAM_ERROR:
                conn.fail(exc.message)
            self._finish_error(exchange, exc.code, exc.message, now)
            return
        if data is None:
            if exchange.poll_now:  # a poll with no time to wait: nothing there now
                self._finish_ok(exchange, b"", now)
                return
            self._watch(conn)
            return
        lease.bytes_received += len(data)
        if lease.session is not None:
            lease.session.received(data)
        self._finish_ok(exchange, data, now)

    def _exchange_timed_out(self, exchange: Exchange, now: float) -> None:
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
        self._finish_error(exchange, ErrorCode.UPSTREAM_TIMEOUT, message, now)

    def _finish_ok(self, exchange: Exchange, data: bytes | None, now: float) -> None:
        releasing = exchange.release is not None
        lease = self._end_exchange(exchange, now, lease_ends=releasing)
        reply = ok_reply(exchange.rid)
        if exchange.first:
            reply["lease"] = lease.token
        if data is not None:
            reply["data"] = data
            if not data and exchange.read == READ_ANY and lease.conn.eof:
                reply["eof"] = True
        if releasing:
            reply["released"] = True
        # The answer goes first; the lease ends after (a reset it needs is no wait of the client's).
        delivered = self.reply(exchange.peer, reply)
        if releasing:
            self._end_lease(lease, now, keep=exchange.release == RELEASE_KEEP)
        elif not delivered and self.table.active(lease):
            # The holder is gone mid-conversation: the connection's state is unknown.
            self._end_lease(lease, now, keep=False)

    def _finish_error(self, exchange: Exchange, code: ErrorCode, message: str, now: float) -> None:
        # A failed exchange that was to end the lease, or that opened it (its requester has no
        # token yet), ends it; an unfinished exchange leaves the connection in an unknown state.
        ends = exchange.release is not None or exchange.first
        lease = self._end_exchange(exchange, now, lease_ends=ends)
        reply = error_reply(exchange.rid, code, message)
        if ends:
            reply["released"] = True
        delivered = self.reply(exchange.peer, reply)
        if (ends or not delivered) and self.table.active(lease):
            self._end_lease(lease, now, keep=False)

    def _end_exchange(self, exchange: Exchange, now: float, *, lease_ends: bool) -> Lease:
        lease = exchange.lease
        self.timers.cancel(exchange.timer)
        exchange.timer = None
        lease.exchange = None
        lease.last_io = now
        lease.busy += now - exchange.started
        if not lease_ends:  # (else _end_lease sets what to watch, once)
            self._watch(lease.conn)
        return lease

    def _end_lease(self, lease: Lease, now: float, *, keep: bool, reason: str | None = None) -> None:
        """The lease is over: its connection goes back to the pool if kept and clean, else closes."""
        self.table.remove(lease)
        self.timers.cancel(lease.timer)
        lease.timer = None
        conn = lease.conn
        exchange = lease.exchange
        if exchange is not None:
            # Ended mid-operation (a release racing an I/O, or shutdown): the stream is cut short.
            self._end_exchange(exchange, now, lease_ends=True)
            conn.fail("the lease ended during an I/O operation")
            self.reply(
                exchange.peer, error_reply(exchange.rid, ErrorCode.LEASE_LOST, "the lease ended during this operation")
            )
        conn.lease = None
        if reason is None:  # (an I/O that failed says more than the holder's discard)
            reason = "broken" if conn.broken else conn.unfit() if keep else "discarded"
        pool = lease.pool
        if reason is None:  # clean, as far as its socket tells: what did the holder leave on it?
            decision = pool.protocol.on_return(lease.session)
            if decision.action == RUN_RESET:  # back to the pool only once the reset has answered
                log.debug("pool %r: resetting a returned connection: %s", pool.config.name, decision.why)
                run = ProbeRun(
                    "reset",
                    pool.protocol.reset,
                    self._reset_passed,
                    self._reset_failed,
                    pipelined=pool.protocol.pipelined,
                )
                self._run_checks(conn, State.RESETTING, run, "probe_timeout", now)
                return
            if decision.action == CLOSE:
                reason = decision.reason
                conn.error = decision.why
        conn.move(State.IDLE)  # (back in the pool's hands: the core keeps it, hands it on or closes it)
        self.carry_out(pool, pool.core.release(conn, now, reason), now)
        self._watch(conn)
