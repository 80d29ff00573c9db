"""Real processes for tests: a Redis, a broker, and small upstreams of our own; waits with deadlines."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `condition` until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def run_python(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`script` in a fresh interpreter (this one's), from the project's root, its output captured."""
    return subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def broker_answers(client: Any) -> bool:
    """Does the broker answer this client's ping (within the client's broker_timeout)?"""
    from poolbroker import BrokerUnavailable

    try:
        client.ping()
        return True
    except BrokerUnavailable:
        return False


def upstream_connections(port: int, pid: int) -> int:
    """TCP sockets the process `pid` (a broker) holds to a loopback server's `port`, as the kernel
    holds them (/proc/net/tcp and tcp6, by inode): each counts from its creation, connecting or
    connected, until the broker closes it, whatever the broker's own counters say. So a pool that
    opened a replacement before closing the old connection, or forgot to close one, shows here.
    (The server's side lags: it may still hold a connection whose close it has not yet seen.)"""
    owned = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            owned.add(target[8:-1])
    # By (local, remote) address: the kernel writes these tables a page at a time, and a socket may
    # appear twice when others come and go between two pages.
    connections = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[9] in owned and int(fields[2].rsplit(":", 1)[1], 16) == port:
                connections.add((fields[1], fields[2]))
    return len(connections)


class PeakSampler:
    """Samples `count()` every few milliseconds until stopped: `peak` is the most seen, `samples`
    how many were taken."""

    def __init__(self, count: Callable[[], int], every: float = 0.003) -> None:
        self.count = count
        self.peak = 0
        self.samples = 0
        self._every = every
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self._sample()  # one at the end, whatever the thread managed meanwhile

    def _run(self) -> None:
        while not self._done.is_set():
            self._sample()
            self._done.wait(self._every)

    def _sample(self) -> None:
        self.peak = max(self.peak, self.count())
        self.samples += 1


class BoundSampler(PeakSampler):
    """Samples the sockets the broker process `pid` holds to `port` (upstream_connections)."""

    def __init__(self, port: int, pid: int, every: float = 0.003) -> None:
        super().__init__(lambda: upstream_connections(port, pid), every)
        self.port = port
        self.pid = pid


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def short_tempdir() -> Path:
    # ipc paths are limited to 107 bytes: pytest's tmp_path can be longer.
    return Path(tempfile.mkdtemp(prefix="pb-", dir="/tmp"))


class TestCertificates:
    """A test CA, a server certificate for localhost and 127.0.0.1, a client certificate, and a
    second CA that signed none of them (openssl, elliptic-curve keys: fast)."""

    __test__ = False  # (not a pytest test class)

    def __init__(self) -> None:
        self.dir = short_tempdir()
        d = self.dir
        self.ca, self.other_ca = d / "ca.crt", d / "other-ca.crt"
        self.server_cert, self.server_key = d / "server.crt", d / "server.key"
        self.client_cert, self.client_key = d / "client.crt", d / "client.key"
        key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        for name in ("ca", "other-ca"):
            files = ["-keyout", f"{name}.key", "-out", f"{name}.crt"]
            self._openssl("req", "-x509", *key, *files, "-days", "2", "-subj", f"/CN={name}")
        (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
        for name in ("server", "client"):
            self._openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
            sign = ["-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext"]
            self._openssl("x509", "-req", "-in", f"{name}.csr", "-out", f"{name}.crt", *sign)

    def _openssl(self, *args: str) -> None:
        subprocess.run(["openssl", *args], cwd=self.dir, check=True, capture_output=True, timeout=60)


class RedisServer:
    """A private redis-server on a free loopback port; stop() and start() keep the port."""

    def __init__(
        self,
        port: int | None = None,
        maxclients: int = 1000,
        password: str | None = None,
        tls: TestCertificates | None = None,
        tls_clients: str = "no",
        options: tuple[str, ...] = ("--save", "", "--appendonly", "no"),
    ) -> None:
        self.port = port or free_port()
        self.options = options  # (by default nothing is kept on disk)
        self.maxclients = maxclients
        self.password = password
        self.tls = tls  # TLS only, on `port`, with these certificates
        self.tls_clients = tls_clients  # --tls-auth-clients: no, optional, yes
        self.dir = short_tempdir()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> RedisServer:
        """Start it; unless told not to wait, until it answers PING (after loading what it keeps)."""
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (./scripts/test installs it)")
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                *self.options,
                "--dir",
                str(self.dir),
                "--maxclients",
                str(self.maxclients),
                *(["--requirepass", self.password] if self.password else []),
                *(self._tls_args() if self.tls else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if wait:
            wait_for(self._answers, what=f"redis on port {self.port}")
        return self

    def _tls_args(self) -> list[str]:
        assert self.tls is not None
        certs = self.tls
        return [
            *("--port", "0", "--tls-port", str(self.port)),
            *("--tls-cert-file", str(certs.server_cert), "--tls-key-file", str(certs.server_key)),
            *("--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", self.tls_clients),
        ]

    def _answers(self) -> bool:
        r = self.client()
        try:
            return bool(r.ping())
        except redis.ConnectionError:
            return False
        finally:
            r.close()

    def client(self, db: int = 0) -> redis.Redis:
        if self.tls is not None:
            return redis.Redis(
                port=self.port,
                socket_timeout=5,
                password=self.password,
                db=db,
                ssl=True,
                ssl_ca_certs=str(self.tls.ca),
                ssl_certfile=str(self.tls.client_cert),
                ssl_keyfile=str(self.tls.client_key),
            )
        return redis.Redis(port=self.port, socket_timeout=5, password=self.password, db=db)

    def broker_connections(self, via: redis.Redis | None = None) -> int:
        """Connections from anyone but the inspecting client `via` (in tests: the broker's)."""
        r = via or self.client()
        me = r.client_id()
        count = sum(1 for c in r.client_list() if int(c["id"]) != me)
        if via is None:
            r.close()
        return count

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def sampler(self, broker: Broker) -> BoundSampler:
        """Samples the sockets `broker` holds to this Redis, as the kernel holds them (see
        upstream_connections)."""
        return BoundSampler(self.port, broker.pid)


class Broker:
    """A real broker process (`python -m poolbroker serve`) on a private ipc endpoint."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        endpoint: str | None = None,
        log_level: str = "debug",
        client_options: dict[str, Any] | None = None,
    ) -> None:
        self.client_options = client_options or {}  # what a Client needs to reach it (CURVE keys)
        self.dir = short_tempdir()
        self.log_level = log_level
        self.endpoint = endpoint or f"ipc://{self.dir}/broker.sock"
        self.log_path = self.dir / "broker.log"
        self.args = args
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> Broker:
        argv = [
            sys.executable,
            "-m",
            "poolbroker",
            "serve",
            "--bind",
            self.endpoint,
            "--log-level",
            self.log_level,
            *self.args,
        ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        if wait:
            wait_for(self.ready, what="the broker to answer ping")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def ready(self) -> bool:
        from poolbroker import Client

        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"broker exited with {self.proc.returncode}:\n{self.log()}")
        client = Client(self.endpoint, broker_timeout=0.2, **self.client_options)
        try:
            return broker_answers(client)
        finally:
            client.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def dump_stack(self) -> bool:
        """`kill -USR1`: the broker writes every thread's stack to its log (faulthandler). True once
        the dump is there (within 5 s)."""
        assert self.proc is not None
        dumps = self.log().count("most recent call first")
        self.proc.send_signal(signal.SIGUSR1)
        try:
            wait_for(lambda: self.log().count("most recent call first") > dumps, timeout=5, what="the stack dump")
        except AssertionError:
            return False
        return True

    def signal(self, signum: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(signum)
        return self.proc.wait(15)

    def stop(self) -> None:
        """SIGTERM, and fail loudly (with a stack dump in the log) if it does not end in time."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.dump_stack()  # where is it stuck?
                    self.proc.kill()
                    self.proc.wait()
                    raise AssertionError(f"the broker ignored SIGTERM for 10 s:\n{self.log()}") from None
        finally:
            if hasattr(self, "_log"):
                self._log.close()
            shutil.rmtree(self.dir, ignore_errors=True)


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


class MemcachedServer:
    """A private memcached on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        exe = shutil.which("memcached")
        if exe is None:
            raise RuntimeError("memcached is not installed (./scripts/test installs it)")
        user = ["-u", "root"] if os.geteuid() == 0 else []  # it refuses to run as root otherwise
        self.proc = subprocess.Popen([exe, "-p", str(self.port), "-l", "127.0.0.1", "-U", "0", *user])
        wait_for(self._answers, what=f"memcached on port {self.port}")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"version\r\n")
                return sock.recv(100).startswith(b"VERSION ")
        except OSError:
            return False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


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


def postgres_bin(program: str) -> str:
    """A PostgreSQL program: Debian keeps them in /usr/lib/postgresql/NN/bin, out of PATH."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{program}"))
    if found:
        return str(found[-1])
    exe = shutil.which(program)
    if exe is None:
        raise RuntimeError("PostgreSQL is not installed (./scripts/test installs it)")
    return exe


class PostgresServer:
    """A private PostgreSQL cluster on a free loopback port, in a temporary directory: initdb and
    pg_ctl run as the `postgres` user when we are root (PostgreSQL refuses to run as root). Its
    superuser is `user` with `password`; TCP connections authenticate with `auth` (pg_hba's
    method: scram-sha-256, password, md5, trust); with `tls`, it accepts TLS with those
    certificates."""

    def __init__(
        self,
        *,
        user: str = "app",
        password: str = "pool-pass",
        auth: str = "scram-sha-256",
        tls: TestCertificates | None = None,
        max_connections: int = 100,
    ) -> None:
        self.port = free_port()
        self.user, self.password = user, password
        self.dir = Path(tempfile.mkdtemp(prefix="pb-pg-", dir="/tmp"))
        self.data = self.dir / "data"
        pwfile = self.dir / "pwfile"
        pwfile.write_text(password + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        self._run(
            postgres_bin("initdb"),
            *("-D", str(self.data), "-U", user, "--pwfile", str(pwfile), "-E", "UTF8", "--no-sync"),
            *("--auth-local", "trust", "--auth-host", auth),
        )
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        options += f" -c max_connections={max_connections}"
        if tls is not None:  # (its key must be the server's own, mode 0600)
            for name, source in (("server.crt", tls.server_cert), ("server.key", tls.server_key)):
                target = self.dir / name
                shutil.copy(source, target)
                target.chmod(0o600)
                if os.geteuid() == 0:
                    shutil.chown(target, "postgres", "postgres")
            options += f" -c ssl=on -c ssl_cert_file={self.dir}/server.crt -c ssl_key_file={self.dir}/server.key"
        self._run(
            postgres_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"), "-w", "start"
        )

    def _run(self, *argv: str) -> None:
        if os.geteuid() == 0:
            argv = ("runuser", "-u", "postgres", "--", *argv)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"{argv[-1]}: {result.stdout}{result.stderr}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def connect(self, **kwargs: Any) -> Any:
        """A psycopg connection straight to the server (no broker): the tests' observer."""
        import psycopg

        return psycopg.connect(
            host="127.0.0.1", port=self.port, user=self.user, password=self.password, dbname="postgres", **kwargs
        )

    def restart(self) -> None:
        """Stop the server (fast: sessions are cut) and start it again on the same port."""
        log = str(self.dir / "log")
        self._run(postgres_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-l", log, "-w", "restart")

    def stop(self) -> None:
        try:
            self._run(postgres_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def gunicorn(app: str, endpoint: str, log_dir: Path, *flags: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """gunicorn serving `app` (an examples module) with POOLBROKER_ENDPOINT=`endpoint` and the
    given flags, until it answers (404 on /); its URL and its master process. Stopped after."""
    port = free_port()
    log = open(log_dir / "gunicorn.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", *flags, app],
        cwd=ROOT,
        env={**os.environ, "POOLBROKER_ENDPOINT": endpoint, "PYTHONPATH": str(ROOT)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: status(url + "/") == 404, timeout=30, what="gunicorn to answer")
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def status(url: str) -> int | None:
    """An HTTP GET's status (None when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return str(response.read().decode())


def pg_pool(tmp_path: Path, server: PostgresServer, **settings: object) -> str:
    """A broker config file with one pool, "pg", of `protocol = "postgres"` in front of `server`."""
    lines = [f'upstream = "{server.address}"', 'protocol = "postgres"', f'username = "{server.user}"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]  # (TOML takes these)
    path = tmp_path / "broker.toml"
    path.write_text("[pools.pg]\n" + "\n".join(lines) + "\n")
    return str(path)
