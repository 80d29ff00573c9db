"""PostgreSQL, for real (a private cluster): the broker's login (decide/protocols/postgres.py) with
SCRAM-SHA-256, cleartext and trust, what the server announces, a query to its end, the wrong
password refused in the server's own words; and a `protocol = "postgres"` pool that logs in once
per connection and hands each holder a session as new (a SET, a temporary table, an open
transaction and its lock gone), over TLS too (after PostgreSQL's SSLRequest)."""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from poolbroker import Client, Lease, UpstreamUnavailable
from poolbroker.broker.decide.probes import Check, ProbeFailed
from poolbroker.broker.decide.protocols.postgres import Login, QueryCheck, query, take_messages
from tests.support import Broker, PostgresServer, TestCertificates, pg_pool


def converse(sock: socket.socket, check: Check) -> None:
    """What the broker's loop does with a check, blocking: send, read, answer, until it is done."""
    sock.sendall(check.request)
    buf = bytearray()
    while True:
        data = sock.recv(65536)
        if not data:
            raise ProbeFailed("closed by the server")
        buf += data
        if check.read(buf):
            return
        if check.outgoing:
            sock.sendall(check.outgoing)
            check.outgoing = b""


@pytest.fixture(params=["scram-sha-256", "password", "trust"])
def postgres(request: pytest.FixtureRequest) -> Iterator[PostgresServer]:
    server = PostgresServer(auth=request.param)
    yield server
    server.stop()


def test_the_login_completes_against_a_real_server(postgres: PostgresServer) -> None:
    with socket.create_connection(("127.0.0.1", postgres.port), timeout=10) as sock:
        login = Login(postgres.user, "postgres", postgres.password, {"application_name": "poolbroker-test"})
        converse(sock, login)
        assert login.parameters["server_encoding"] == "UTF8" and login.backend_key is not None
        query = QueryCheck("SELECT current_setting('application_name')")
        converse(sock, query)
        assert query.status == b"I"


def test_the_wrong_password_is_refused_in_the_servers_words() -> None:
    server = PostgresServer()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            with pytest.raises(ProbeFailed, match="28P01") as failure:
                converse(sock, Login(server.user, "postgres", "not-the-password"))
            assert "not-the-password" not in str(failure.value)
    finally:
        server.stop()


# -- a postgres pool: the broker logs in, probes and resets --------------------------------------


def pg_query(conn: Lease, sql: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Run `sql` on a lease in PostgreSQL's protocol: its messages, and ReadyForQuery's status."""
    conn.sendall(query(sql))
    buf, got = bytearray(), []
    while True:
        buf += conn.recv()
        for kind, payload in take_messages(buf):
            if kind == b"Z":
                return got, payload
            got.append((kind, payload))


def value(messages: list[tuple[bytes, bytes]]) -> str:
    """The first column of the first DataRow."""
    [row] = [payload for kind, payload in messages if kind == b"D"]
    (length,) = struct.unpack_from("!i", row, 2)
    return row[6 : 6 + length].decode()


def test_a_postgres_pool_logs_in_once_and_hands_on_a_clean_session(
    start_broker: Callable[..., Broker], make_client: Callable[..., Client], tmp_path: Path
) -> None:
    server = PostgresServer()
    try:
        config = pg_pool(
            tmp_path, server, max_size=1, password_env="PG_PASSWORD", database="postgres", client_name="poolbroker-test"
        )
        broker = start_broker("--config", config, env={"PG_PASSWORD": server.password})
        c = make_client(broker.endpoint)
        with c.lease("pg") as conn:
            messages, status = pg_query(conn, "SELECT pg_backend_pid()")
            backend = value(messages)
            assert value(pg_query(conn, "SHOW application_name")[0]) == "poolbroker-test"
            pg_query(conn, "SET statement_timeout = 1234")
            pg_query(conn, "CREATE TEMP TABLE left_behind (x int)")
            pg_query(conn, "BEGIN")
            _, status = pg_query(conn, "SELECT pg_advisory_xact_lock(7)")
            assert status == b"T"  # released in the middle of a transaction
        with c.lease("pg") as conn:  # the same connection (a pool of 1), its session as new
            assert value(pg_query(conn, "SELECT pg_backend_pid()")[0]) == backend
            assert value(pg_query(conn, "SHOW statement_timeout")[0]) == "0"
            messages, status = pg_query(conn, "SELECT count(*) FROM pg_tables WHERE tablename = 'left_behind'")
            assert (value(messages), status) == ("0", b"I")
        stats = c.stats("pg")["pg"]
        assert (stats["connections_created"], stats["connections_closed"]) == (1, 0)  # logged in once
    finally:
        server.stop()


def test_a_postgres_pool_with_the_wrong_password_fails_its_connect_clearly(
    start_broker: Callable[..., Broker], make_client: Callable[..., Client], tmp_path: Path
) -> None:
    server = PostgresServer()
    try:
        broker = start_broker("--config", pg_pool(tmp_path, server, password="not-the-password"))
        with pytest.raises(UpstreamUnavailable, match="28P01") as failure:
            make_client(broker.endpoint).request("pg", query("SELECT 1"), max_bytes=1024)
        assert "not-the-password" not in str(failure.value)  # the server's words, never the password
    finally:
        server.stop()


def test_a_postgres_pool_speaks_tls_after_the_sslrequest(
    start_broker: Callable[..., Broker], make_client: Callable[..., Client], tmp_path: Path
) -> None:
    certs = TestCertificates()
    server = PostgresServer(tls=certs)
    try:
        tls = {"tls": True, "tls_ca_file": str(certs.ca), "tls_server_name": "localhost"}
        broker = start_broker(
            "--config", pg_pool(tmp_path, server, password=server.password, database="postgres", **tls)
        )
        with make_client(broker.endpoint).lease("pg") as conn:
            # The server's own view: this session came over TLS.
            messages, _ = pg_query(conn, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            assert value(messages) == "t"
    finally:
        server.stop()
