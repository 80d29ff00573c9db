"""TLS to the upstream: Debian's Redis with TLS on, certificates that verify and ones that don't,
client certificates, and a handshake that stalls without stalling the broker."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from poolbroker import Client, UpstreamError, UpstreamUnavailable
from poolbroker.redis import BrokerConnectionPool
from tests.support import Broker, RedisServer, TestCertificates, TestUpstream, wait_for


@pytest.fixture
def tls_redis(certs: TestCertificates) -> Iterator[RedisServer]:
    server = RedisServer(tls=certs).start()
    yield server
    server.stop()


def test_a_tls_pool_handshakes_once_per_connection(
    tls_redis: RedisServer, certs: TestCertificates, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker(
        "--upstream", f"redis={tls_redis.address}", "--protocol", "redis", "--tls", "--tls-ca-file", str(certs.ca)
    )
    c = Client(broker.endpoint)
    for i in range(30):
        assert c.request("redis", b"SET k%d %d\r\n" % (i, i), until=b"\r\n") == b"+OK\r\n"
    with c.lease("redis") as conn:  # a longer conversation, and a reply bigger than one TLS record
        conn.sendall(b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$100000\r\n" + b"x" * 100_000 + b"\r\n")
        assert conn.recv_until(b"\r\n") == b"+OK\r\n"
        assert conn.request(b"GET big\r\n", until=b"\r\n") == b"$100000\r\n"
        assert conn.recv_exactly(100_002) == b"x" * 100_000 + b"\r\n"
    r = redis.Redis(connection_pool=BrokerConnectionPool(c, "redis"))
    assert r.get("k29") == b"29"
    stats = c.stats("redis")["redis"]
    assert (stats["connections_created"], stats["connections_closed"]) == (1, 0)  # one TLS handshake
    assert tls_redis.client().get("k7") == b"7"
    c.close()


@pytest.mark.parametrize(
    ("flags", "why"),
    [
        (("--tls-ca-file", "OTHER"), "certificate verify failed"),  # signed by a CA we don't trust
        (("--tls-ca-file", "CA", "--tls-server-name", "not-localhost"), "certificate verify failed"),  # wrong name
    ],
)
def test_a_certificate_that_does_not_verify_fails_the_connect_clearly(
    tls_redis: RedisServer,
    certs: TestCertificates,
    start_broker: Callable[..., Broker],
    flags: tuple[str, ...],
    why: str,
) -> None:
    files = {"OTHER": str(certs.other_ca), "CA": str(certs.ca)}
    flags = tuple(files.get(flag, flag) for flag in flags)
    broker = start_broker("--upstream", f"redis={tls_redis.address}", "--tls", *flags)
    with Client(broker.endpoint) as c:
        with pytest.raises(UpstreamUnavailable, match=f"TLS handshake failed: .*{why}"):
            c.request("redis", b"PING\r\n", until=b"\r\n")
        stats = c.stats("redis")["redis"]
        assert (stats["connections_failed"], stats["pool_size"]) == (1, 0)


def test_a_client_certificate_for_an_upstream_that_asks_for_one(
    certs: TestCertificates, start_broker: Callable[..., Broker]
) -> None:
    server = RedisServer(tls=certs, tls_clients="yes").start()
    try:
        tls = ("--tls", "--tls-ca-file", str(certs.ca))
        with_cert = start_broker(
            "--upstream",
            f"redis={server.address}",
            *tls,
            "--tls-cert-file",
            str(certs.client_cert),
            "--tls-key-file",
            str(certs.client_key),
        )
        without = start_broker("--upstream", f"redis={server.address}", *tls, "--connect-timeout", "2")
        with Client(with_cert.endpoint) as c:
            assert c.request("redis", b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"
        with Client(without.endpoint) as c:
            # TLS 1.3: the server refuses the missing certificate once the client's side of the
            # handshake is done, so the refusal shows at the first I/O, and that connection closes.
            with pytest.raises(UpstreamError, match=r"upstream failed: (EOF|.*certificate required)"):
                c.request("redis", b"PING\r\n", until=b"\r\n")
            assert c.stats("redis")["redis"]["connections_closed_broken"] == 1
    finally:
        server.stop()


def test_a_stalled_tls_handshake_stalls_nobody_else(
    certs: TestCertificates,
    redis_server: RedisServer,
    upstream: Callable[[str], TestUpstream],
    start_broker: Callable[..., Broker],
) -> None:
    mute = upstream("stall")  # accepts, and never answers the ClientHello
    broker = start_broker("--config", str(_config(certs, mute.port, redis_server.address)))
    with Client(broker.endpoint) as c, Client(broker.endpoint) as other, ThreadPoolExecutor(1) as background:
        stalled = background.submit(c.request, "mute", b"PING\r\n", until=b"\r\n", timeout=30)
        wait_for(lambda: mute.accepted == 1, what="the TLS connect to begin")
        wait_for(lambda: other.stats("mute")["mute"]["pool_connecting"] == 1, what="the broker to be handshaking")
        for _ in range(50):  # while the handshake hangs, the other pool serves
            assert other.request("redis", b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"
        # Still hanging after the 50 (its connect_timeout is 30 s): they ran beside it, not after it.
        assert not stalled.done() and other.stats("mute")["mute"]["pool_connecting"] == 1
        mute.close_all()  # now the handshake fails, and says so
        with pytest.raises(UpstreamUnavailable, match="TLS handshake failed"):
            stalled.result(10)


def _config(certs: TestCertificates, mute_port: int, redis_address: str) -> object:
    path = certs.dir / f"stall-{mute_port}.toml"
    path.write_text(
        f'[pools.mute]\nupstream = "127.0.0.1:{mute_port}"\ntls = true\ntls_ca_file = "{certs.ca}"\n'
        f'connect_timeout = 30\n\n[pools.redis]\nupstream = "{redis_address}"\n'
    )
    return path


class TlsEcho:
    """A TLS 1.3 echo server of our own (Redis does not say which server name a client asked for):
    records the SNI of each handshake, and sends session tickets after it, as TLS 1.3 servers do."""

    def __init__(self, certs: TestCertificates) -> None:
        self.names: list[str | None] = []
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certs.server_cert, certs.server_key)
        self.context.sni_callback = lambda sock, name, ctx: self.names.append(name)  # type: ignore[assignment,misc,return-value]
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        try:
            with self.context.wrap_socket(conn, server_side=True) as tls:
                while data := tls.recv(65536):
                    tls.sendall(data)
        except OSError:
            pass

    def stop(self) -> None:
        self.listener.close()


@pytest.fixture
def tls_echo(certs: TestCertificates) -> Iterator[TlsEcho]:
    server = TlsEcho(certs)
    yield server
    server.stop()


def test_the_server_name_is_sent_and_idle_checks_read_through_tls(
    tls_echo: TlsEcho, certs: TestCertificates, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker(
        *("--upstream", f"echo=127.0.0.1:{tls_echo.port}", "--tls", "--tls-ca-file", str(certs.ca)),
        *("--tls-server-name", "localhost", "--min-idle", "1", "--check-idle-after", "0"),
    )
    with Client(broker.endpoint) as c:
        # min_idle opens one connection nobody leases: its session tickets arrive while it is idle,
        # and the broker's watch on idle connections reads them through TLS (no data: it stays).
        wait_for(lambda: c.stats("echo")["echo"]["pool_idle"] == 1, what="the warm-up connection")
        for i in range(20):  # every checkout probes it (check_idle_after = 0): the tcp probe, through TLS
            assert c.request("echo", b"hello %d\n" % i, until=b"\n") == b"hello %d\n" % i
        # (the one min_idle opened while the first was leased may still be on its way: a TLS connect)
        stats = wait_for(lambda: (s := c.stats("echo")["echo"])["connections_created"] >= 2 and s, what="a refill")
    # Two connections (min_idle keeps one ready while the other is leased), none ever dropped.
    assert (stats["connections_created"], stats["connections_closed"], stats["checks_failed"]) == (2, 0, 0)
    assert tls_echo.names == ["localhost"] * 2  # the SNI: tls_server_name, which the certificate carries
