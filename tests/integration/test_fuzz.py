"""10,000 malformed messages while a real workload runs through the same broker."""

from __future__ import annotations

import multiprocessing
import random
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import zmq
from zmq.utils import monitor as zmq_monitor

from poolbroker import Client
from tests.support import Broker, RedisServer, wait_for

MAX_MESSAGE_SIZE = 65536
VALID = [
    {"op": "ping"},
    {"op": "stats"},
    {"op": "lease", "pool": "redis", "timeout": 1.0, "send": b"PING\r\n", "read": "until", "delim": b"\r\n"},
    {"op": "io", "lease": b"k" * 16, "send": b"PING\r\n", "read": "any", "n": 10},
    {"op": "release", "lease": b"k" * 16, "release": "keep"},
]
# Values each field must refuse (None is "absent", which most fields allow).
WRONG: dict[str, list[Any]] = {
    "id": [None, True, -1, 2**64 - 1, 1.5, "1", b"1", []],
    "op": [None, 1, b"ping", [], {}],
    "pool": [1, b"redis", [], "x" * 300, ""],
    "timeout": [0, -1, 1e9, "1", True, float("nan")],
    "send": [1, "PING", [], True],
    "read": [1, "sometimes", b"any", []],
    "delim": [1, "x", b""],
    "n": [-1, "10", 1.5, True, 0],
    "lease": [None, b"short", "k" * 16, 16],
    "release": ["maybe", 1, b"keep"],
    "noreply": [1, "yes", b"", []],
}


def malformed(rng: random.Random) -> tuple[list[bytes], bool]:
    """One hostile message (its frames) and whether the broker owes it an answer."""
    kind = rng.randrange(11)
    base = {"v": 1, "id": rng.randrange(2**63), **rng.choice(VALID)}
    if kind == 0:  # random bytes
        return [rng.randbytes(rng.randrange(0, 200))], True
    if kind == 1:  # a valid message cut short: invalid msgpack
        body = msgpack.packb(base)
        return [body[: rng.randrange(1, len(body))]], True
    if kind == 2:  # a field of the wrong type (or out of range)
        key = rng.choice([k for k in base if k != "v"] + ["noreply"])
        return [msgpack.packb({**base, key: rng.choice(WRONG[key])})], True
    if kind == 3:  # a header claiming far more than follows: bin32, str32, array32, map32
        header = rng.choice([b"\xc6", b"\xdb", b"\xdd", b"\xdf"]) + rng.randbytes(4)
        return [header + rng.randbytes(rng.randrange(0, 20))], True
    if kind == 4:  # an unknown operation
        return [msgpack.packb({**base, "op": rng.choice(["teleport", "LEASE", "", "admin"])})], True
    if kind == 5:  # a version this broker does not speak
        return [msgpack.packb({**base, "v": rng.choice([0, 2, 255, "1", None])})], True
    if kind == 6:  # extra frames
        return [msgpack.packb(base)] * rng.randrange(2, 5), True
    if kind == 7:  # a REQ socket's envelope: an empty delimiter frame first
        return [b"", msgpack.packb(base)], True
    if kind == 8:  # a stale or made-up token, for io or release
        op = rng.choice(["io", "release"])
        return [msgpack.packb({"v": 1, "id": 5, "op": op, "lease": rng.randbytes(16), "send": b"FLUSHALL\r\n"})], True
    if kind == 9:  # the same, one-way: nothing to answer
        return [msgpack.packb({"v": 1, "id": 6, "op": "release", "lease": rng.randbytes(16), "noreply": True})], False
    # Deep nesting (written by hand: msgpack's packer refuses it), bare or as a field's value.
    nested = b"\x91" * rng.randrange(1, 5000) + b"\xc4\x01x"  # [[[...[b"x"]...]]]
    if rng.random() < 0.5:
        return [nested], True
    return [b"\x82\xa1v\x01\xa2op" + nested], True  # {"v": 1, "op": [[...]]}


def fuzz(endpoint: str, count: int, seed: int, more: Callable[[], bool] = lambda: False) -> tuple[int, int]:
    """Send `count` hostile messages (and more while `more()` says so, up to ten times as many)
    from a few sockets in windows, each window followed by a ping as a marker; return (answers
    owed, error answers received). Every answer must be an error."""
    rng = random.Random(seed)
    ctx = zmq.Context()
    sockets = []
    for _ in range(4):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 10_000)
        sock.connect(endpoint)
        sockets.append(sock)
    owed = answered = 0
    sent = 0
    marker = 0
    while sent < count or (more() and sent < 10 * count):
        sock = rng.choice(sockets)
        # Replies in flight per socket stay well under the broker's SNDHWM (100): libzmq credits a
        # writer with what its reader took only every 50 messages, so a window of 50 could reach
        # the mark under load, and the broker then drops replies by design (a client that does
        # not read loses them), which this count would take for lost answers.
        window = 25
        for _ in range(window):
            frames, deserves_answer = malformed(rng)
            sock.send_multipart(frames)
            owed += deserves_answer
        sent += window
        marker += 1
        sock.send(msgpack.packb({"v": 1, "id": 10**12 + marker, "op": "ping"}))
        while True:
            reply = msgpack.unpackb(sock.recv())
            if reply.get("id") == 10**12 + marker:
                assert reply["ok"] is True
                break
            assert reply["ok"] is False and reply["error"] and reply["message"], reply
            answered += 1
    for sock in sockets:
        sock.close()
    ctx.term()
    return owed, answered


def workload(endpoint: str, worker: int, stop: Any, results: Any) -> None:
    """A legitimate client: one-shot INCRs and leased SET/GET pairs until `stop`; reports how many
    rounds it ran and how many answers were wrong."""
    rounds = wrong = 0
    with Client(endpoint, timeout=30) as c:
        while not stop.is_set():
            c.request("redis", b"INCR fuzz:counter\r\n", until=b"\r\n")
            value = f"{worker}-{rounds}".encode()
            with c.lease("redis") as conn:
                conn.sendall(b"SET fuzz:%d %s\r\n" % (worker, value))
                conn.recv_until(b"\r\n")
                conn.sendall(b"GET fuzz:%d\r\n" % worker)
                answer = conn.recv_until(b"\r\n")
                answer += conn.recv_exactly(len(value) + 2) if answer.startswith(b"$") else b""
                wrong += answer != b"$%d\r\n%s\r\n" % (len(value), value)
            rounds += 1
    results.put((rounds, wrong))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_ten_thousand_malformed_messages_while_a_real_workload_runs(
    own_redis: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker(
        "--upstream",
        f"redis={own_redis.address}",
        "--max-size",
        "4",
        "--max-message-size",
        str(MAX_MESSAGE_SIZE),
        log_level="warning",
    )
    fuzz(broker.endpoint, 500, seed=1)  # warm up, then measure memory
    memory_before = rss_mb(broker.pid)
    mp = multiprocessing.get_context("spawn")
    stop, results = mp.Event(), mp.SimpleQueue()
    workers = [mp.Process(target=workload, args=(broker.endpoint, w, stop, results)) for w in range(3)]
    for worker in workers:
        worker.start()
    redis = own_redis.client()

    def rounds_done() -> int:
        return int(redis.get("fuzz:counter") or 0)

    wait_for(lambda: rounds_done() >= 3, what="the workload to run")
    at_start = rounds_done()
    # At least 10,000 hostile messages, and on until the workload has run 30 rounds beside them.
    owed, answered = fuzz(broker.endpoint, 10_000, seed=2, more=lambda: rounds_done() < at_start + 30)
    assert rounds_done() >= at_start + 30
    stop.set()
    reports = [results.get() for _ in workers]
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    # Every hostile message that deserves an answer got an error answer, and nothing more.
    assert answered == owed, f"{answered} error answers for {owed} owed"
    # The legitimate workload's results are all correct.
    assert all(wrong == 0 for _, wrong in reports)
    assert int(redis.get("fuzz:counter")) == sum(rounds for rounds, _ in reports)
    # The broker is up, holds nothing, and its memory stayed bounded.
    with Client(broker.endpoint) as c:
        stats = c.stats("redis")["redis"]
        assert (stats["leases_active"], stats["requests_waiting"]) == (0, 0)
        assert c.broker_stats()["bad_requests"] > 5000
    assert rss_mb(broker.pid) < memory_before + 20


def test_oversize_messages_only_cost_their_sender_its_connection(
    redis_server: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}", "--max-message-size", str(MAX_MESSAGE_SIZE))
    ctx = zmq.Context()
    senders: Iterator[zmq.Socket[Any]] = (ctx.socket(zmq.DEALER) for _ in range(20))
    with Client(broker.endpoint) as c:
        for sock in senders:
            sock.setsockopt(zmq.LINGER, 0)
            monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            sock.connect(broker.endpoint)
            sock.send(msgpack.packb({"v": 1, "id": 1, "op": "ping", "pad": b"x" * MAX_MESSAGE_SIZE}))
            assert_dropped(monitor)  # the broker closed this sender's connection
            assert c.request("redis", b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"  # and no one else's
            assert sock.poll(0) == 0
            sock.disable_monitor()
            monitor.close()
            sock.close()
        assert c.broker_stats()["bad_requests"] == 0  # dropped by libzmq before the loop saw them
    ctx.term()


def assert_dropped(monitor: zmq.Socket[Any]) -> None:
    """The monitored socket connected, then was disconnected by its peer, within 10 s."""
    events = []
    while zmq.EVENT_DISCONNECTED not in events:
        assert monitor.poll(10_000), f"no disconnect within 10 s (events: {events})"
        events.append(zmq_monitor.parse_monitor_message(monitor.recv_multipart())["event"])
    assert events[0] == zmq.EVENT_CONNECTED


def test_garbage_below_zeromq_framing_only_closes_that_connection(
    redis_server: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}")
    path = broker.endpoint.removeprefix("ipc://")
    rng = random.Random(3)
    greeting = b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00NULL" + b"\x00" * 16 + b"\x00" * 32  # a ZMTP 3.0 greeting
    with Client(broker.endpoint) as c:
        for i in range(200):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(path)
                # Random bytes, or a valid greeting followed by random frames.
                sock.sendall((greeting if i % 2 else b"") + rng.randbytes(rng.randrange(1, 4096)))
            if i % 20 == 0:
                assert c.request("redis", b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"
        assert c.request("redis", b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"
