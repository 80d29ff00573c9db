"""Lending the upstream socket itself to a same-host client: the lending socket, a Unix
SOCK_SEQPACKET socket beside the ipc endpoint (`broker.sock.lend`, same directory, mode 0600).

Its messages are the wire's (a msgpack map each, one per packet): a lease request, answered by a
grant that carries the upstream socket's descriptor (SCM_RIGHTS), and a release, which says what
the holder's session left. The bytes then go from the worker straight to the upstream; the broker
keeps the bound, the line, the checks, the limits and the return. Each client connection is a
holder: when it closes (the process died), its leases end and their connections close, cut first
(shutdown) so that no copy of the socket goes on. Only the broker's own user may connect: the
peer's uid is checked (SO_PEERCRED) on accept.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import socket
import struct
from typing import TYPE_CHECKING, Any

import msgpack

from poolbroker.broker.decide.leases import Holder
from poolbroker.wire.protocol import (
    OP_LEASE,
    OP_RELEASE,
    BadRequest,
    ErrorCode,
    Request,
    error_reply,
    parse_request,
)

if TYPE_CHECKING:
    from poolbroker.broker.drive.doors import Poller
    from poolbroker.broker.drive.leasing import Leasing
    from poolbroker.broker.drive.tables import DriveLeaseTable

log = logging.getLogger("broker.lending")

# A lending holder's peer id: a zero byte first, which no ZeroMQ client may give its routing id,
# and a length libzmq's own ids (5 bytes) never have. So it never names a ZeroMQ peer.
PEER_PREFIX = b"\x00lend"
MAX_PACKET = 4096  # a lease request or a release is a few hundred bytes (a bigger buffer costs every recv)
LISTEN_BACKLOG = 512
CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


def is_lending_peer(peer: bytes) -> bool:
    return peer[:5] == PEER_PREFIX


class Lending:
    """The lending socket and its client connections, driven by the server's loop."""

    def __init__(
        self, path: str, epoll: Poller, table: DriveLeaseTable, leasing: Leasing, packer: msgpack.Packer
    ) -> None:
        self.path = path
        self.epoll = epoll
        self.table = table
        self.leasing = leasing
        self.packer = packer
        self.uid = os.getuid()
        self.clients: dict[int, tuple[socket.socket, bytes]] = {}  # by fd: the socket, its peer id
        self.peers: dict[bytes, socket.socket] = {}
        self._ids = itertools.count(1)
        self.requests_received = 0  # (the broker's stats add these to the ZeroMQ socket's)
        self.bad_requests = 0
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.setblocking(False)
        try:
            os.unlink(path)  # (left by a broker that died: the ipc bind already proved none listens)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)  # the socket file 0600: its owner only, as the ipc endpoint's
        try:
            self.listener.bind(path)
        finally:
            os.umask(old)
        self.listener.listen(LISTEN_BACKLOG)
        self.epoll.register(self.listener.fileno(), select.EPOLLIN)

    def owns(self, fd: int) -> bool:
        return fd == self.listener.fileno() or fd in self.clients

    def on_event(self, fd: int, now: float) -> None:
        if fd == self.listener.fileno():
            self._accept(now)
        else:
            self._read(fd, now)

    def _accept(self, now: float) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # (out of descriptors: the client's connect fails, we go on)
                log.warning("lending socket: accept failed: %s", exc)
                return
            pid, uid, _ = CREDENTIALS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, CREDENTIALS.size))
            if uid != self.uid:  # (the file's mode keeps others out; root is refused here too)
                log.warning("lending socket: refused pid %d of uid %d: only uid %d may lease", pid, uid, self.uid)
                message = f"only the broker's user (uid {self.uid}) may lease sockets"
                self._send(sock, error_reply(None, ErrorCode.NOT_AUTHORIZED, message))
                sock.close()
                continue
            sock.setblocking(False)
            peer = PEER_PREFIX + next(self._ids).to_bytes(8, "big")
            self.clients[sock.fileno()] = (sock, peer)
            self.peers[peer] = sock
            # (fd -1: its close is ours to see, not a ZeroMQ disconnect report's)
            self.table.add_holder(Holder(peer, -1, ("pid", pid), admin=False, lends=True))
            self.epoll.register(sock.fileno(), select.EPOLLIN)

    def _read(self, fd: int, now: float) -> None:
        sock, peer = self.clients[fd]
        reset = False
        while True:
            try:
                data = sock.recv(MAX_PACKET)
            except BlockingIOError:
                return
            except ConnectionResetError as exc:
                # It closed with a reply of ours unread (a grant its exit cut short): what it sent
                # before, a release among them, is still to be read, then its end (reported once).
                if reset:
                    self._gone(fd, now, f"its lending connection failed: {exc}")
                    return
                reset = True
                continue
            except OSError as exc:
                self._gone(fd, now, f"its lending connection failed: {exc}")
                return
            if not data:
                self._gone(fd, now, "its lending connection closed")
                return
            self._on_message(peer, data, now)
            if not reset or fd not in self.clients:  # (gone: a reply it could not take ended it)
                # One message an event: the poll is level-triggered, and reports the next one
                # (a read to learn there is none would cost a syscall, most times for nothing).
                return

    def _on_message(self, peer: bytes, data: bytes, now: float) -> None:
        self.requests_received += 1
        try:
            req = parse_request(data)
        except BadRequest as exc:
            self.bad_requests += 1
            self.reply(peer, error_reply(exc.request_id, exc.code, exc.message))
            return
        problem = self._refusal(req)
        if problem is not None:
            self.bad_requests += 1
            self.reply(peer, error_reply(req.id, ErrorCode.BAD_REQUEST, problem))
        elif req.op == OP_LEASE:
            self.leasing.on_lease(peer, req, now)
        else:
            self.leasing.on_release(peer, req, now)

    def _refusal(self, req: Request) -> str | None:
        if req.op not in (OP_LEASE, OP_RELEASE):
            return f"the lending socket takes lease and release, not {req.op} (use the broker's endpoint)"
        if req.has_exchange:
            return "a lent socket carries its own I/O: a lease request here has no exchange"
        return None

    def reply(self, peer: bytes, reply: dict[str, Any], lend: socket.socket | None = None) -> bool:
        """Send a reply (a grant with the socket to lend); False when the holder is gone."""
        sock = self.peers.get(peer)
        return sock is not None and self._send(sock, reply, lend)

    def _send(self, sock: socket.socket, reply: dict[str, Any], lend: socket.socket | None = None) -> bool:
        data = self.packer.pack(reply)
        try:
            if lend is None:
                sock.send(data)
            else:
                fds = struct.pack("i", lend.fileno())
                sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        except OSError as exc:  # (gone, or not reading: its buffer is full)
            log.debug("lending: reply %s not delivered: %s", reply.get("id"), exc)
            return False
        return True

    def _gone(self, fd: int, now: float, why: str) -> None:
        sock, peer = self.clients.pop(fd)
        del self.peers[peer]
        self.epoll.unregister(fd)
        sock.close()
        holder = self.table.holders.get(peer)
        if holder is not None and not holder.gone:
            self.leasing.holder_gone(holder, now, why)

    def close(self) -> None:
        for sock, _ in self.clients.values():
            sock.close()
        self.clients.clear()
        self.peers.clear()
        self.listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
