"""The broker's PostgreSQL login (decide/protocols/postgres.py) against a real PostgreSQL cluster:
SCRAM-SHA-256, cleartext and trust, what the server announces, a query to its end, and the wrong
password refused with the server's own words. (The pool that uses it is issue 17's next step.)"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from helpers import PostgresServer

from poolbroker.broker.decide.probes import Check, ProbeFailed
from poolbroker.broker.decide.protocols.postgres import Login, QueryCheck


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
