"""Malformed and hostile requests over a raw DEALER: each gets an error reply, the broker goes on."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
import zmq

from poolbroker import Client
from tests.support import Broker, RedisServer


@pytest.fixture
def raw(redis_server: RedisServer, start_broker: Callable[..., Broker]) -> Iterator[tuple[zmq.Socket[Any], Broker]]:
    broker = start_broker("--upstream", f"redis={redis_server.address}")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(broker.endpoint)
    yield sock, broker
    sock.close()
    ctx.term()


def ask(sock: zmq.Socket[Any], *frames: bytes) -> dict[str, Any]:
    sock.send_multipart(list(frames))
    reply = msgpack.unpackb(sock.recv(), raw=False)
    assert isinstance(reply, dict)
    return reply


def req(**fields: Any) -> bytes:
    return msgpack.packb({"v": 1, "id": 9, **fields}, use_bin_type=True)


@pytest.mark.parametrize(
    ("frames", "code", "rid"),
    [
        ((b"\x00\xff garbage",), "bad_request", None),
        ((msgpack.packb("a string"),), "bad_request", None),
        ((msgpack.packb({"v": 1, "id": 1, "op": ["a", "list"]}),), "bad_request", 1),
        ((msgpack.packb({"v": 9, "id": 3, "op": "ping"}),), "unsupported_version", 3),
        ((req(op="teleport"),), "bad_request", 9),
        ((req(op="lease", pool=["x"]),), "bad_request", 9),
        ((req(op="lease", pool="nope"),), "unknown_pool", 9),
        ((req(op="io", lease=b"0" * 16, send=b"x"),), "lease_lost", 9),
        ((req(op="release", lease=b"0" * 16),), "lease_lost", 9),
        ((req(op="cancel", lease=b"0" * 16),), "lease_lost", 9),
        ((b"", req(op="ping")), "bad_request", None),  # a REQ-style envelope: two frames
        ((b"\xc6\x7f\xff\xff\xff",), "bad_request", None),  # a bin header claiming 2 GiB
        ((req(op="lease", pool="redis", read="exactly", n=2**40),), "limit_exceeded", 9),
    ],
)
def test_each_bad_request_gets_its_error_and_the_broker_goes_on(
    raw: tuple[zmq.Socket[Any], Broker], frames: tuple[bytes, ...], code: str, rid: int | None
) -> None:
    sock, _ = raw
    reply = ask(sock, *frames)
    assert (reply["ok"], reply["error"], reply["id"]) == (False, code, rid)
    assert reply["message"]
    assert ask(sock, req(op="ping"))["ok"] is True


def test_another_clients_token_is_lost_and_their_lease_untouched(
    raw: tuple[zmq.Socket[Any], Broker], make_client: Callable[..., Client]
) -> None:
    sock, broker = raw
    grant = ask(sock, req(op="lease", pool="redis"))
    token = grant["lease"]
    thief = zmq.Context.instance().socket(zmq.DEALER)
    thief.setsockopt(zmq.LINGER, 0)
    thief.setsockopt(zmq.RCVTIMEO, 5000)
    thief.connect(broker.endpoint)
    try:
        assert ask(thief, req(op="io", lease=token, send=b"FLUSHALL\r\n"))["error"] == "lease_lost"
        assert ask(thief, req(op="release", lease=token, release="discard"))["error"] == "lease_lost"
    finally:
        thief.close()
    # The owner's lease still works and its connection was never touched.
    reply = ask(sock, req(op="io", lease=token, send=b"PING\r\n", read="until", delim=b"\r\n"))
    assert reply["data"] == b"+PONG\r\n"
    assert ask(sock, req(op="release", lease=token))["ok"] is True


def test_a_cancel_where_there_is_no_backend_says_so(raw: tuple[zmq.Socket[Any], Broker]) -> None:
    sock, _ = raw
    token = ask(sock, req(op="lease", pool="redis"))["lease"]
    reply = ask(sock, req(op="cancel", lease=token))
    assert (reply["ok"], reply["error"]) == (False, "bad_request") and "postgres" in reply["message"]
    assert ask(sock, req(op="io", lease=token, send=b"PING\r\n", read="until", delim=b"\r\n"))["data"] == b"+PONG\r\n"


def io(rid: int, token: bytes, **exchange: Any) -> bytes:
    return msgpack.packb({"v": 1, "id": rid, "op": "io", "lease": token, **exchange}, use_bin_type=True)


def test_a_second_read_while_one_runs_is_refused_and_a_send_joins_it(raw: tuple[zmq.Socket[Any], Broker]) -> None:
    sock, _ = raw
    token = ask(sock, req(op="lease", pool="redis"))["lease"]
    # BLPOP blocks for 1 s: the first io is in progress when the others arrive.
    sock.send(io(1, token, send=b"BLPOP nothing 1\r\n", read="until", delim=b"*-1\r\n"))
    busy = ask(sock, io(2, token, send=b"PING\r\n", read="any", n=100))
    assert (busy["id"], busy["error"]) == (2, "lease_busy")
    over = ask(sock, io(3, token, send=b"x" * (8 * 1024 * 1024 + 1)))  # (its sends over max_payload)
    assert (over["id"], over["error"]) == (3, "limit_exceeded")
    joined = ask(sock, io(4, token, send=b"ECHO beside\r\n"))  # a send alone joins the running exchange
    assert (joined["id"], joined["ok"], "data" in joined) == (4, True, False)
    first = msgpack.unpackb(sock.recv(), raw=False)
    assert (first["id"], first["data"]) == (1, b"*-1\r\n")
    after = ask(sock, io(5, token, read="exactly", n=12))  # ECHO's answer, after BLPOP's
    assert after["data"] == b"$6\r\nbeside\r\n"
