"""Real servers of Debian's packages, each on free loopback ports and stopped by its test: Redis,
memcached, PostgreSQL (run as the postgres user), and test certificates for TLS."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import redis

from tests.support.broker import Broker
from tests.support.processes import free_port, short_tempdir, wait_for
from tests.support.samplers import BoundSampler

LOCKED_REDIS_PASSWORD = "s3cret-pass"  # the locked_redis fixture's: its clients AUTH with it


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


def pg_pool(tmp_path: Path, server: PostgresServer, **settings: object) -> str:
    """A broker config file with one pool, "pg", of `protocol = "postgres"` in front of `server`."""
    lines = [f'upstream = "{server.address}"', 'protocol = "postgres"', f'username = "{server.user}"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]  # (TOML takes these)
    path = tmp_path / "broker.toml"
    path.write_text("[pools.pg]\n" + "\n".join(lines) + "\n")
    return str(path)
