"""The bridge's greeter: a small process of its own that accepts libpq's connections on the
bridge's sockets and answers their startup, then passes each connection (its descriptor, by
SCM_RIGHTS) to the process that owns the bridge.

Why a process: libpq's blocking calls (PQconnectdb, PQcancel, PQping) hold the caller's GIL in
psycopg's C implementation while they wait for the server's answer. If that answer had to come
from a thread of the same process, it never would. The greeter needs nothing of the caller's
interpreter: its answer is the pool's (AuthenticationOk, the server's parameters, a BackendKeyData
of the greeter's choosing, ReadyForQuery), which the bridge tells it beforehand. After the startup,
libpq only writes when its caller asks for something, and waits in a way that lets threads run.

A route may want the bridge to answer when it can (session mode: it leases first, and answers with
the real backend's pid). Then the greeter asks the bridge first, and answers itself only if no
claim comes within CLAIM_TIMEOUT: a caller holding its GIL keeps the bridge from claiming at all.

Standard library only, run from its file (see _bridge.Bridge._start_greeter): it starts in milliseconds.
Its wire with the bridge is a SOCK_SEQPACKET socket pair, one JSON message per packet:
    bridge -> greeter: {"route": port, "user", "database", "parameters", "pool", "answer"} (+ the
                       listener's descriptor the first time; later ones update what it answers);
                       "answer" is "greeter", "bridge" or "claimed" (the bridge's, if it claims)
                       {"claim": n}  (the bridge answers connection n itself)
    greeter -> bridge: {"port", "key": [pid, secret], "rest": hex} + the connection's descriptor,
                       or {"port", "startup": hex} + the descriptor (the bridge answers it)
                       {"ask": n}  (an "answer": "claimed" route's connection n: claim it?)
                       {"cancel": [pid, secret]}  (libpq's CancelRequest; its socket is closed)
It ends when the bridge's end closes (the bridge's process is gone).
"""

from __future__ import annotations

import array
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
from typing import Any

PROTOCOL_MAJOR = 3
SSL_REQUEST_CODE, GSSENC_REQUEST_CODE, CANCEL_REQUEST_CODE = 80877103, 80877104, 80877102
MAX_STARTUP = 10_000  # libpq's own limit for a startup packet
STARTUP_TIMEOUT = 60.0  # a connection that sends no whole startup packet by then is dropped
# How long a connection waits for the bridge's claim before the greeter answers it: a claim comes
# in milliseconds unless the caller's process holds its GIL (then never).
CLAIM_TIMEOUT = 0.5
FDS = socket.CMSG_SPACE(array.array("i", [0]).itemsize)  # room for one descriptor


class StartupError(Exception):
    """The startup can't be answered as the pool's: an ErrorResponse with this SQLSTATE."""

    def __init__(self, sqlstate: str, text: str) -> None:
        super().__init__(text)
        self.sqlstate = sqlstate


def message(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("!i", len(payload) + 4) + payload


def error_response(sqlstate: str, text: str, severity: str = "FATAL") -> bytes:
    """A backend ErrorResponse: how the driver learns why (libpq shows its message)."""
    fields = b"".join(k + v.encode() + b"\0" for k, v in ((b"S", severity), (b"V", severity), (b"C", sqlstate)))
    return message(b"E", fields + b"M" + text.encode(errors="replace") + b"\0\0")


def startup_parameters(packet: bytes) -> dict[str, str]:
    """A StartupMessage's name/value pairs (after its length and protocol version)."""
    parts = packet[8:].split(b"\0")
    return {
        name.decode(errors="replace"): value.decode(errors="replace")
        for name, value in zip(parts[::2], parts[1::2], strict=False)
        if name
    }


def startup_answer(route: dict[str, Any], asked: dict[str, str], key: tuple[int, int]) -> bytes:
    """What the pool's server would answer a StartupMessage asking `asked`: AuthenticationOk, its
    parameters, the BackendKeyData `key`, ReadyForQuery. Another user or database is refused."""
    for name in ("user", "database"):
        ours = route[name]
        theirs = asked.get(name) or (asked.get("user") if name == "database" else None)
        if theirs is not None and theirs != ours:
            code = "28000" if name == "user" else "3D000"
            raise StartupError(code, f"pool {route['pool']!r} logs in to {name} {ours!r}, not {theirs!r}")
    answer = message(b"R", struct.pack("!i", 0))
    for name, value in route["parameters"].items():
        answer += message(b"S", name.encode() + b"\0" + value.encode() + b"\0")
    return answer + message(b"K", struct.pack("!ii", *key)) + message(b"Z", b"I")


def new_key() -> tuple[int, int]:
    """A BackendKeyData: the pid names the connection in its process, the secret proves it."""
    pid, secret = struct.unpack("!ii", os.urandom(8))
    return pid & 0x7FFFFFFF or 1, secret


class Greeting:
    """One accepted connection until its startup is whole."""

    def __init__(self, sock: socket.socket, port: int) -> None:
        self.sock, self.port = sock, port
        self.data = b""
        self.since = time.monotonic()

    def packet(self) -> tuple[bytes, bytes] | None:
        """The first whole startup packet, and what came after it; None until it is whole."""
        if len(self.data) < 8:
            return None
        (length,) = struct.unpack_from("!i", self.data)
        if not 8 <= length <= MAX_STARTUP:
            raise StartupError("08P01", f"invalid startup packet length {length}")
        if len(self.data) < length:
            return None
        packet, self.data = self.data[:length], self.data[length:]
        return packet, self.data


class Greeter:
    def __init__(self, bridge: socket.socket) -> None:
        self.bridge = bridge
        self.routes: dict[int, dict[str, Any]] = {}
        self.listeners: dict[int, socket.socket] = {}
        self.greetings: dict[socket.socket, Greeting] = {}
        # Connections asked of the bridge, by number: their startup packet, what came after it,
        # and when the greeter answers them itself
        self.asked: dict[int, tuple[Greeting, bytes, bytes, float]] = {}
        self.asks = 0
        self.selector = selectors.DefaultSelector()
        self.selector.register(bridge, selectors.EVENT_READ)

    def run(self) -> None:
        while True:
            soonest = min((deadline for *_, deadline in self.asked.values()), default=None)
            timeout = 5.0 if soonest is None else max(0.0, soonest - time.monotonic())
            for key, _ in self.selector.select(timeout=min(timeout, 5.0)):
                if key.fileobj is self.bridge:
                    if not self._from_bridge():
                        return
                elif key.data is not None:
                    self._accept(key.fileobj, key.data)  # type: ignore[arg-type]
                else:
                    self._read(key.fileobj)  # type: ignore[arg-type]
            now = time.monotonic()
            for n, (greeting, packet, rest, deadline) in list(self.asked.items()):
                if now >= deadline:  # (no claim: its caller's process may hold its GIL)
                    del self.asked[n]
                    self._pass(greeting, packet, rest, answer=True)
            for sock, greeting in list(self.greetings.items()):
                if now - greeting.since > STARTUP_TIMEOUT:
                    self._drop(sock)

    def _from_bridge(self) -> bool:
        data, ancillary, _, _ = self.bridge.recvmsg(1 << 20, FDS)
        if not data:
            return False
        route = json.loads(data)
        if "claim" in route:
            asked = self.asked.pop(route["claim"], None)
            if asked is not None:  # (else a claim too late: the greeter has answered it)
                self._pass(*asked[:3], answer=False)
            return True
        port = route["route"]
        self.routes[port] = route
        for level, kind, fds in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                listener = socket.socket(fileno=array.array("i", fds[:4])[0])
                listener.setblocking(False)
                if port in self.listeners:  # (a route sent again: the old copy goes)
                    self.selector.unregister(self.listeners.pop(port))
                self.listeners[port] = listener
                self.selector.register(listener, selectors.EVENT_READ, port)
        return True

    def _accept(self, listener: socket.socket, port: int) -> None:
        try:
            sock, _ = listener.accept()
        except OSError:
            return
        sock.setblocking(False)
        self.greetings[sock] = Greeting(sock, port)
        self.selector.register(sock, selectors.EVENT_READ)

    def _read(self, sock: socket.socket) -> None:
        greeting = self.greetings[sock]
        try:
            data = sock.recv(MAX_STARTUP)
            if not data:
                self._drop(sock)
                return
            greeting.data += data
            while (whole := greeting.packet()) is not None:
                if self._answer(greeting, *whole):
                    return
        except StartupError as exc:
            self._tell(sock, error_response(exc.sqlstate, str(exc)))
            self._drop(sock)
        except OSError:
            self._drop(sock)

    def _answer(self, greeting: Greeting, packet: bytes, rest: bytes) -> bool:
        """True once the connection is done with here (passed on, or closed)."""
        sock = greeting.sock
        (code,) = struct.unpack_from("!i", packet, 4)
        if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
            self._tell(sock, b"N")  # (the bridge is in the driver's own host and user: nothing to encrypt)
            return False
        if code == CANCEL_REQUEST_CODE and len(packet) == 16:
            # Closed at once, as the server does: libpq's PQcancel waits for that end, holding its GIL.
            self.bridge.send(json.dumps({"cancel": struct.unpack_from("!ii", packet, 8)}).encode())
            self._drop(sock)
            return True
        if code >> 16 != PROTOCOL_MAJOR:
            raise StartupError("08P01", f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}")
        answer = self.routes[greeting.port]["answer"]
        if answer == "claimed":  # (libpq sends nothing more until it has the answer)
            self.asks += 1
            self.asked[self.asks] = (greeting, packet, rest, time.monotonic() + CLAIM_TIMEOUT)
            self.greetings.pop(sock)
            self.selector.unregister(sock)
            self.bridge.send(json.dumps({"ask": self.asks}).encode())
        else:  # (with "bridge", its driver's connect never holds the GIL while it waits)
            self._pass(greeting, packet, rest, answer=answer == "greeter")
        return True

    def _pass(self, greeting: Greeting, packet: bytes, rest: bytes, *, answer: bool) -> None:
        """The connection to the bridge, its startup answered here (`answer`) or for the bridge to answer."""
        sock = greeting.sock
        try:
            if answer:
                key = new_key()
                sock.settimeout(5.0)  # (the answer is small: it fits the socket's buffer)
                sock.sendall(startup_answer(self.routes[greeting.port], startup_parameters(packet), key))
                passed = {"port": greeting.port, "key": key, "rest": rest.hex()}
            else:
                passed = {"port": greeting.port, "startup": (packet + rest).hex()}
            fds = array.array("i", [sock.fileno()])
            self.bridge.sendmsg([json.dumps(passed).encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        except StartupError as exc:
            self._tell(sock, error_response(exc.sqlstate, str(exc)))
        except OSError:
            pass
        self._drop(sock)  # (this copy: the bridge's process has its own now)

    def _tell(self, sock: socket.socket, data: bytes) -> None:
        try:
            sock.settimeout(5.0)
            sock.sendall(data)
            sock.setblocking(False)
        except OSError:
            pass

    def _drop(self, sock: socket.socket) -> None:
        """This copy of a connection closed (one asked of the bridge is no longer watched here)."""
        if self.greetings.pop(sock, None) is not None:
            self.selector.unregister(sock)
        sock.close()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # (a terminal's ^C is its bridge's to act on; it ends with it)
    Greeter(socket.socket(fileno=int(sys.argv[-1]))).run()
