"""PostgreSQL's login and queries, as the broker speaks them (pure): each authentication method
against a server played by the test (scramp's own server side for SCRAM-SHA-256)."""

from __future__ import annotations

import hashlib
import struct

import pytest
from scramp import ScramMechanism

from poolbroker.broker.decide.probes import ProbeFailed
from poolbroker.broker.decide.protocols.postgres import (
    AUTH_CLEARTEXT,
    AUTH_MD5,
    AUTH_OK,
    AUTH_SASL,
    AUTH_SASL_CONTINUE,
    AUTH_SASL_FINAL,
    Login,
    QueryCheck,
    SslRequest,
    startup_message,
    take_messages,
)


def backend(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("!i", len(payload) + 4) + payload


def auth(code: int, data: bytes = b"") -> bytes:
    return backend(b"R", struct.pack("!i", code) + data)


READY = backend(b"S", b"server_version\x0016.4\x00") + backend(b"K", struct.pack("!ii", 4242, 99)) + backend(b"Z", b"I")


def frontend(data: bytes) -> tuple[bytes, bytes]:
    """The one message the client queued: its type and payload."""
    [(kind, payload)] = list(take_messages(bytearray(data)))
    return kind, payload


def test_the_startup_message_names_user_database_and_parameters() -> None:
    data = startup_message("app", "shop", {"application_name": "web"})
    (length, version) = struct.unpack("!ii", data[:8])
    assert length == len(data) and version == 196608
    assert data[8:] == b"user\0app\0database\0shop\0application_name\0web\0\0"


def test_trust_keeps_what_the_server_announces() -> None:
    login = Login("app", "shop", None)
    assert login.read(bytearray(auth(AUTH_OK) + READY))
    assert login.parameters == {"server_version": "16.4"} and login.backend_key == (4242, 99)


def test_cleartext_and_md5_passwords() -> None:
    login = Login("app", "shop", "s3cret")
    assert not login.read(bytearray(auth(AUTH_CLEARTEXT)))
    assert frontend(login.outgoing) == (b"p", b"s3cret\0")
    login = Login("app", "shop", "s3cret")
    assert not login.read(bytearray(auth(AUTH_MD5, b"salt")))
    inner = hashlib.md5(b"s3cretapp").hexdigest().encode()
    assert frontend(login.outgoing) == (b"p", b"md5" + hashlib.md5(inner + b"salt").hexdigest().encode() + b"\0")


def test_scram_sha_256_against_a_real_scram_server() -> None:
    mechanism = ScramMechanism("SCRAM-SHA-256")
    stored = mechanism.make_auth_info("s3cret", iteration_count=4096)
    server = mechanism.make_server(lambda username: stored)
    login = Login("app", "shop", "s3cret")
    assert not login.read(bytearray(auth(AUTH_SASL, b"SCRAM-SHA-256\0\0")))
    kind, payload = frontend(login.outgoing)
    login.outgoing = b""
    name, rest = payload.split(b"\0", 1)
    assert kind == b"p" and name == b"SCRAM-SHA-256"
    server.set_client_first(rest[4:].decode())
    assert not login.read(bytearray(auth(AUTH_SASL_CONTINUE, server.get_server_first().encode())))
    kind, payload = frontend(login.outgoing)
    server.set_client_final(payload.decode())  # raises unless the client proved the password
    assert login.read(bytearray(auth(AUTH_SASL_FINAL, server.get_server_final().encode()) + auth(AUTH_OK) + READY))


def test_a_refused_login_says_what_the_server_said_and_never_the_password() -> None:
    login = Login("app", "shop", "s3cret")
    refusal = backend(b"E", b'SFATAL\0C28P01\0Mpassword authentication failed for user "app"\0\0')
    with pytest.raises(ProbeFailed, match='28P01: password authentication failed for user "app"') as failure:
        login.read(bytearray(refusal))
    assert "s3cret" not in str(failure.value)
    with pytest.raises(ProbeFailed, match="the pool has none"):
        Login("app", "shop", None).read(bytearray(auth(AUTH_CLEARTEXT)))


def test_a_query_runs_to_ready_for_query_and_must_leave_the_connection_idle() -> None:
    check = QueryCheck("SELECT 1")
    rows = backend(b"T", b"...") + backend(b"D", b"...") + backend(b"C", b"SELECT 1\0")
    assert not check.read(bytearray(rows))  # (halfway: no ReadyForQuery yet)
    assert check.read(bytearray(backend(b"Z", b"I")))
    with pytest.raises(ProbeFailed, match="not idle"):
        QueryCheck("BEGIN").read(bytearray(backend(b"C", b"BEGIN\0") + backend(b"Z", b"T")))
    with pytest.raises(ProbeFailed, match="42601"):
        QueryCheck("SELEC").read(bytearray(backend(b"E", b"SERROR\0C42601\0Msyntax error\0\0") + backend(b"Z", b"I")))


def test_the_sslrequest_goes_on_only_on_s_and_alone() -> None:
    assert SslRequest().request == struct.pack("!ii", 8, 80877103)
    assert not SslRequest().read(bytearray())
    assert SslRequest().read(bytearray(b"S"))
    with pytest.raises(ProbeFailed, match="does not accept TLS"):
        SslRequest().read(bytearray(b"N"))
    with pytest.raises(ProbeFailed, match="before TLS: refused"):  # injected bytes (CVE-2021-23222)
        SslRequest().read(bytearray(b"Sinjected"))
