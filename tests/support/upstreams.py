"""Small upstreams of our own for what a real server can't do (stall, drop, count connections), and
samplers of an upstream's connection count."""

from __future__ import annotations

import http.server
import socket
import ssl
import threading
from typing import Any

from tests.support.servers import TestCertificates


class TestUpstream:
    """A TCP server of our own for what Redis can't do: echo, stall, close.

    mode: "echo" echoes every byte; "stall" accepts and never answers; "deaf" accepts and never even
    reads (a send to it fills the socket buffers, then stalls); "close" closes at once;
    "greet" sends b"hello\\n" unasked right after accepting. mute() silences the connections open
    now while new ones still answer: what a firewall that dropped idle connections looks like.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, mode: str = "echo") -> None:
        self.mode = mode
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._muted: set[socket.socket] = set()
        self.accepted = 0
        self._stopping = False
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
                self.accepted += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            if self.mode == "close":
                return
            if self.mode == "deaf":
                self._stopped.wait()
                return
            if self.mode == "greet":
                conn.sendall(b"hello\n")
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                if self.mode == "echo" and conn not in self._muted:
                    conn.sendall(data)
        except OSError:
            return
        finally:
            conn.close()

    def mute(self) -> None:
        with self._lock:
            self._muted.update(self._conns)

    def push(self, data: bytes) -> None:
        """Send `data` unasked on every accepted connection (a server that talks out of turn)."""
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.sendall(data)
            except OSError:
                pass

    def close_all(self) -> None:
        """Close every accepted connection from the server side."""
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        self._stopping = True
        self._stopped.set()
        self.listener.close()
        self.close_all()


class HttpUpstream:
    """A small HTTP/1.1 server with keep-alive: GET or HEAD /health answers 200, /down 503, and
    GET /stall sends its headers, then its body only once `unstall` is set. With `tls`, HTTPS.
    It counts the connections it accepted (`accepted`) and the most open at once (`peak_open`):
    what a client pooling its connections is judged by, from the server's side."""

    def __init__(self, tls: TestCertificates | None = None) -> None:
        self.unstall = threading.Event()
        unstall = self.unstall
        self.accepted = 0
        self.open = 0
        self.peak_open = 0
        counts = threading.Lock()
        upstream = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a pooled upstream must

            def do_HEAD(self) -> None:
                self._answer(with_body=False)

            def do_GET(self) -> None:
                self._answer(with_body=True)

            def _answer(self, with_body: bool) -> None:
                if self.path == "/stall":
                    self.send_response(200)
                    self.send_header("Content-Length", "5")
                    self.end_headers()
                    self.wfile.flush()
                    unstall.wait(30)
                    self.wfile.write(b"late\n")
                    return
                status, body = (200, b"ok\n") if self.path == "/health" else (503, b"down\n")
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def setup(self) -> None:
                with counts:
                    upstream.accepted += 1
                    upstream.open += 1
                    upstream.peak_open = max(upstream.peak_open, upstream.open)
                super().setup()

            def finish(self) -> None:
                try:
                    super().finish()
                finally:
                    with counts:
                        upstream.open -= 1

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(tls.server_cert, tls.server_key)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
