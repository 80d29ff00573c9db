"""One DEALER socket to the broker and the calls made over it: a request and its reply within a
deadline, or a one-way message; CURVE keys for a broker beyond loopback."""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

import msgpack
import zmq
import zmq.backend

from poolbroker.client._errors import BrokerUnavailable, LimitExceeded, ProtocolError, error_from_code
from poolbroker.wire.keys import CLIENT_KEY_ENV, SERVER_KEY_ENV, load_key_pair, load_public_key
from poolbroker.wire.protocol import RELEASE_DISCARD, RELEASE_KEEP, VERSION, Template, release_request

CLOSE_LINGER_MS = 500
# The broker's default max_message_size: it drops the connection of a client that sends more,
# without a word, so the client refuses to send such a request and says why.
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
MAX_TEMPLATES = 256
NOBLOCK = int(zmq.NOBLOCK)
_send = zmq.backend.Socket.send
HOSTNAME = socket.gethostname()  # (a lease request names its holder: pid and host)


class Curve:
    """The keys of a CURVE connection: the broker's public key and this client's key pair."""

    def __init__(self, server_key: bytes, public: bytes, secret: bytes) -> None:
        self.server_key = server_key
        self.public = public
        self.secret = secret

    @classmethod
    def from_arguments(cls, server_key: str | None, client_key: str | None) -> Curve | None:
        server_key = server_key or os.environ.get(SERVER_KEY_ENV)
        client_key = client_key or os.environ.get(CLIENT_KEY_ENV)
        if server_key is None and client_key is None:
            return None
        if server_key is None or client_key is None:
            raise ValueError(
                f"CURVE needs both the broker's public key (server_key or ${SERVER_KEY_ENV}) and"
                f" this client's key pair (client_key or ${CLIENT_KEY_ENV})"
            )
        public, secret = load_key_pair(client_key, "client_key")
        return cls(load_public_key(server_key, "server_key"), public, secret)


class Channel:
    """One DEALER socket, used by one thread at a time (its lock lets a Lease cross threads)."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, curve: Curve | None, max_message_size: int) -> None:
        self.pid = os.getpid()
        self.endpoint = endpoint
        self.curve = curve
        self.max_message_size = max_message_size
        self.lock = threading.Lock()
        self.packer = msgpack.Packer(use_bin_type=True)
        self.next_id = 1
        self._ctx = ctx
        self.sock = self._connect()
        self._recv_timeout_ms = -1  # RCVTIMEO as last set
        self.generation = 0  # bumped on reset: leases taken on an older socket are lost
        self.templates: dict[tuple[Any, ...], Template] = {}  # request templates by kind (remember)
        self.closing = False  # its Client is closing: the thread in a call closes the socket after it

    def _connect(self) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)  # never let close() or term() wait on unsent messages
        if self.curve is not None:
            sock.curve_serverkey = self.curve.server_key
            sock.curve_publickey = self.curve.public
            sock.curve_secretkey = self.curve.secret
        sock.connect(self.endpoint)
        return sock

    def _reset(self) -> None:
        # After a timeout the old socket may still deliver our request, and its reply, later: a
        # new socket drops both, so no stale grant can arrive where nobody expects it.
        self.sock.close(linger=0)
        self.sock = self._connect()
        self._recv_timeout_ms = -1
        self.generation += 1

    def call(self, message: dict[str, Any], wait: float) -> dict[str, Any]:
        """Send a request and return its reply (ok or error) within `wait` seconds."""
        with self.lock:
            rid = self.next_id
            self.next_id = rid + 1
            message["v"] = VERSION
            message["id"] = rid
            return self._round_trip_open(self.packer.pack(message), rid, wait)

    def call_packed(self, template: Template, values: tuple[Any, ...], wait: float) -> dict[str, Any]:
        """As call(), for a request made from a template and the values of its varying fields."""
        with self.lock:
            rid = self.next_id
            self.next_id = rid + 1
            return self._round_trip_open(template.pack(self.packer.pack, rid, values), rid, wait)

    def _round_trip_open(self, body: bytes, rid: int, wait: float) -> dict[str, Any]:
        """A round trip on a socket its Client has not closed (under the lock). A close meanwhile
        interrupts its wait (the context's term: ContextTerminated), and the socket closes here,
        in the thread that used it, as ZeroMQ wants."""
        if self.closing:
            raise BrokerUnavailable("its Client is closed")
        try:
            return self._round_trip(body, rid, wait)
        except zmq.ContextTerminated:
            raise BrokerUnavailable("its Client was closed during the call") from None
        finally:
            if self.closing:
                self.sock.close(linger=0)

    def remember(self, key: tuple[Any, ...], template: Template) -> Template:
        """Keep `template` for `key` in `templates` (a few kinds of request serve a process: the
        cache is cleared, not grown, when an odd caller makes many)."""
        if len(self.templates) >= MAX_TEMPLATES:
            self.templates.clear()
        self.templates[key] = template
        return template

    def _round_trip(self, body: bytes, rid: int, wait: float) -> dict[str, Any]:
        if len(body) > self.max_message_size:
            limit = self.max_message_size
            raise LimitExceeded(f"a request of {len(body)} bytes is over the limit of {limit} (max_message_size)")
        try:
            # (pyzmq's compiled send: the Python layer over it, for routing ids and groups, costs
            # about a microsecond a call, which a busy client process pays several times over)
            _send(self.sock, body, NOBLOCK)
        except zmq.Again:
            self._reset()
            raise BrokerUnavailable(f"the broker at {self.endpoint} is not taking requests") from None
        deadline = time.monotonic() + wait
        remaining = wait
        while True:
            # A blocking recv with RCVTIMEO: a poll before each recv would cost a wake-up more.
            timeout_ms = int(remaining * 1000) or 1
            if timeout_ms != self._recv_timeout_ms:
                self.sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
                self._recv_timeout_ms = timeout_ms
            try:
                data = self.sock.recv()
            except zmq.Again:
                raise self._no_answer(wait) from None
            try:
                reply = msgpack.unpackb(data)
            except Exception as exc:  # msgpack raises several types for bad input
                raise ProtocolError(f"undecodable reply from the broker: {exc}") from None
            if type(reply) is dict and reply.get("id") == rid:
                return reply
            self._drop_stray(reply)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._no_answer(wait)

    def _no_answer(self, wait: float) -> BrokerUnavailable:
        self._reset()
        hint = ""
        if self.curve is not None:
            hint = " (with CURVE, also check the broker's public key and that the broker lets this client's key in)"
        return BrokerUnavailable(f"no answer from the broker at {self.endpoint} within {wait:.1f}s{hint}")

    def _drop_stray(self, reply: Any) -> None:
        """A reply nobody waits for: an earlier call here was interrupted (KeyboardInterrupt, say).
        If it granted a lease, give the lease back now rather than hold a connection unused: kept
        if only granted, discarded if an exchange ran on it (its holder never saw the answer)."""
        if not (isinstance(reply, dict) and reply.get("ok") is True and not reply.get("released")):
            return
        token = reply.get("lease")
        if isinstance(token, bytes):
            mode = RELEASE_DISCARD if "data" in reply else RELEASE_KEEP
            message = {**release_request(token, mode), "v": VERSION, "id": self.next_id, "noreply": True}
            self.next_id += 1
            try:
                self.sock.send(self.packer.pack(message), zmq.NOBLOCK)
            except zmq.Again:
                pass  # the broker reclaims it when its time limits say so

    def send_oneway(self, template: Template, values: tuple[Any, ...]) -> None:
        """A request that wants no answer (its template says "noreply")."""
        with self.lock:
            if self.closing:
                return  # (the broker reclaims the lease when the socket's connection ends)
            rid = self.next_id
            self.next_id = rid + 1
            try:
                self.sock.send(template.pack(self.packer.pack, rid, values), zmq.NOBLOCK)
            except zmq.Again:
                pass  # the broker is unreachable; it will reclaim the lease itself

    def close(self) -> None:
        """Close the socket now if no thread is in a call on it, else when that call ends."""
        self.closing = True  # (first: a call ending now sees it, or has let go of the lock)
        if self.lock.acquire(blocking=False):
            try:
                # A one-way release sent just before may still be queued: give it a moment to leave
                # (else the broker reclaims that lease when the connection closes, closing a good
                # connection).
                self.sock.close(linger=CLOSE_LINGER_MS)
            finally:
                self.lock.release()


def close_sockets(ctx: zmq.Context[Any], channels: list[Channel], timeout: float | None = None) -> None:
    """Close the channels, then their context, within `timeout` seconds. A thread still in a call
    sees its wait interrupted and closes its socket (term() waits for that); if one doesn't within
    the time, the context is left to finish terminating on its own."""
    for channel in channels:
        channel.close()
    terminating = threading.Thread(target=ctx.term, name="poolbroker-close", daemon=True)
    terminating.start()
    terminating.join(timeout)


def check_reply(reply: dict[str, Any]) -> dict[str, Any]:
    if reply.get("ok") is True:
        return reply
    raise error_from_code(str(reply.get("error")), str(reply.get("message", "")))
