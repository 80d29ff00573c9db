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
import os
import select
import socket
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import msgpack
import zmq
import zmq.backend
from zmq.utils import monitor as zmq_monitor

from poolbroker.broker.decide.actions import Close, Grant, Open, Probe, Reject
from poolbroker.broker.decide.connection import State
from poolbroker.broker.decide.leases import Holder, LeaseTable
from poolbroker.broker.drive.leasing import Leasing
from poolbroker.broker.drive.lending import Lending, is_lending_peer
from poolbroker.broker.drive.pools import PoolState
from poolbroker.broker.drive.resolver import Resolver
from poolbroker.broker.drive.router import EVENTS, FD, NOBLOCK, POLLIN, RCVMORE, SNDMORE, int_option, make_router
from poolbroker.broker.drive.security import CurveKeys, peer_credentials, peer_is_admin, serve_curve
from poolbroker.broker.drive.tables import DriveHolder, DriveLeaseTable
from poolbroker.broker.drive.timers import Timers
from poolbroker.broker.drive.upstream import UpstreamConn
from poolbroker.broker.drive.upstreams import Upstreams
from poolbroker.broker.settings import BrokerConfig, ConfigError
from poolbroker.wire.endpoint import lending_path
from poolbroker.wire.protocol import (
    OP_ADMIN,
    OP_CANCEL,
    OP_IO,
    OP_LEASE,
    OP_RELEASE,
    BadRequest,
    ErrorCode,
    Request,
    error_reply,
    parse_request,
)

T = TypeVar("T")
log = logging.getLogger("broker.server")  # (the operator's log lines keep the name they always had)

ROUTER_BATCH = 256  # messages taken per wake-up before looking at upstream sockets again


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
        self._calls: deque[tuple[Callable[[float], Any], Future[Any]]] = deque()  # call_soon_threadsafe's
        self.ctx = ctx or zmq.Context()
        self.pools = {pool.name: PoolState(pool) for pool in config.pools}
        self.table: DriveLeaseTable = LeaseTable()  # holders, waiters and leases
        self.leases = self.table.leases  # (by token: the table's own dict)
        self.timers = Timers()
        self.packer = msgpack.Packer(use_bin_type=True)
        self.curve = curve
        self.bad_requests = 0
        self.requests_received = 0  # every message: a one-shot lease cycle is one
        self.endpoint = ""
        self.ipc_path: str | None = None
        self.lending: Lending | None = None  # beside an ipc endpoint: its sockets lent (bind makes it)
        self.router = make_router(self.ctx, config)
        # CURVE: a client gets in only with a listed key (the check runs in pyzmq's ZAP thread).
        self.authenticator = serve_curve(self.ctx, self.router, curve) if curve is not None else None
        # Disconnect events name the fd of a connection that closed: the first message of each
        # holder carries its fd (SRCFD), so the broker knows whose leases to reclaim.
        self.monitor = self.router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.holders = self.table.holders  # (by routing id: the table's own dict)
        self.epoll = select.epoll()
        self.epoll.register(int_option(self.router)(FD), select.EPOLLIN)
        self.epoll.register(int_option(self.monitor)(FD), select.EPOLLIN)
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
        self._router_get = int_option(self.router)
        self._router_send = functools.partial(zmq.backend.Socket.send, self.router)
        self.resolver: Resolver[UpstreamConn] = Resolver(self._wake)
        self._outbox: deque[tuple[PoolState, Any]] = deque()  # pool actions decided, not yet carried out
        self._carrying_out = False
        self._stop_requests = 0  # a second one ends the shutdown grace at once
        self._drain_until: float | None = None  # set once shutting down: when leases are cut short
        self.leasing = Leasing(self)  # lease requests, grants, exchanges, the end of each lease
        self._handlers: dict[str, Callable[[bytes, Request, float], None]] = {
            OP_LEASE: self.leasing.on_lease,
            OP_IO: self.leasing.on_io,
            OP_RELEASE: self.leasing.on_release,
            OP_CANCEL: self.leasing.on_cancel,
        }
        self.upstreams = Upstreams(self)  # every upstream connection, through its life
        self.conns = self.upstreams.conns  # (by fd: its own dict)
        # SIGHUP's reload, once the operations layer installs it (add_operations).
        self.on_reload: Callable[[float], object] | None = None

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
        path = lending_path(self.endpoint)
        if path is not None and any(pool.lends for pool in self.config.pools):
            try:
                self.lending = Lending(path, self.epoll, self.table, self.leasing, self.packer)
            except OSError as exc:  # (a path too long for a Unix socket, say: the relay still serves)
                log.warning("no socket lending at %s (leases go through the relay): %s", path, exc)
        return self.endpoint

    def add_operations(
        self, handlers: dict[str, Callable[[bytes, Request, float], None]], reload: Callable[[float], object]
    ) -> None:
        """Requests that look at or change the broker rather than lease from it (the operations
        layer's: ping, stats, leases, admin), and what SIGHUP does."""
        self._handlers.update(handlers)
        self.on_reload = reload

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

    def call_soon_threadsafe(self, call: Callable[[float], T]) -> Future[T]:
        """Run call(now) in the loop, from another thread; the Future has what it returned."""
        done: Future[T] = Future()
        self._calls.append((call, done))
        self._wake()
        return done

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
        monitor_fd = int_option(self.monitor)(FD)
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
                        self.upstreams.on_event(conn, now)
                    except Exception:
                        # A bug of ours on one connection must not end every client's pool.
                        log.exception("failed to handle an event on %r", conn)
                elif fd == router_fd:
                    requests = True
                elif fd == monitor_fd:
                    monitor = True
                elif fd == wake_fd:
                    self._drain_wake(now)
                elif self.lending is not None and self.lending.owns(fd):
                    self.lending.on_event(fd, now)
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
            self.leasing.end_lease(lease, now, keep=False, reason="shutdown")

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
        if self.lending is not None:
            self.lending.close()
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
        while self._calls:
            call, done = self._calls.popleft()
            try:
                done.set_result(call(now))
            except Exception as exc:  # (the caller's to see)
                done.set_exception(exc)
        for conn, answer in self.resolver.results():
            if conn.state is not State.CLOSED:  # else its connect timed out while the lookup ran
                self.upstreams.connect_to(conn, answer, now)
        if self._reload_requested:
            self._reload_requested = False
            try:
                if self.on_reload is None:
                    raise ConfigError("this broker has no reload installed")
                self.on_reload(now)
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
                self.leasing.holder_gone(holder, now, "its connection closed")

    def _holder_of(self, peer: bytes, frame: zmq.Frame | None, now: float) -> DriveHolder:
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
            self.leasing.holder_gone(previous, now, "its connection closed (its fd was reused)")
        return holder

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

    def lend(self, peer: bytes, grant: dict[str, Any], conn: UpstreamConn) -> bool:
        assert self.lending is not None and conn.sock is not None  # (only the lending socket's holders)
        grant["family"] = conn.family  # (so that the holder need not ask the socket)
        return self.lending.reply(peer, grant, conn.sock)

    def reply(self, peer: bytes, reply: dict[str, Any]) -> bool:
        """Send a reply; False when the peer is gone or not reading (never blocks the loop)."""
        if is_lending_peer(peer):
            return self.lending is not None and self.lending.reply(peer, reply)
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
        outbox = self._outbox
        for action in actions:
            outbox.append((pool, action))
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
            self.leasing.grant(action.request, action.conn, now)
        elif kind is Open:
            self.upstreams.open(pool, now)
        elif kind is Probe:
            self.upstreams.start_probe(action.conn, now)
        elif kind is Close:
            self.upstreams.close(action.conn, action.reason)
        elif kind is Reject:
            waiter = action.request
            self.table.leaves_line(waiter)
            self.reply(waiter.peer, error_reply(waiter.req.id, action.code, action.message))
