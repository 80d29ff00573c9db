"""Every limit: over it, a clear error naming it, and nothing else changes."""

from __future__ import annotations

import multiprocessing
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from zmq.utils import monitor as zmq_monitor

from poolbroker import Client, LimitExceeded
from tests.support import ROOT, Broker, RedisServer, broker_answers, free_port, short_tempdir, wait_for


def test_one_operation_may_send_and_read_at_most_max_payload(
    own_redis: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker("--upstream", f"redis={own_redis.address}", "--max-payload", "4096")
    big = b"SET k " + b"x" * 5000 + b"\r\n"
    with Client(broker.endpoint) as c, c.lease("redis") as conn:
        with pytest.raises(LimitExceeded, match=r"sending 5008 bytes .* over the limit of 4096 \(max_payload\)"):
            conn.request(big, until=b"\r\n")
        with pytest.raises(LimitExceeded, match=r"read exactly 5000 bytes .* \(max_payload\)"):
            conn.recv_exactly(5000)
        # Nothing was sent, and the lease goes on.
        assert conn.request(b"EXISTS k\r\n", until=b"\r\n") == b":0\r\n"
        assert c.stats("redis")["redis"]["leases_active"] == 1
    assert own_redis.client().dbsize() == 0


def test_a_request_over_max_message_size_is_refused_by_the_client_and_dropped_by_the_broker(
    redis_server: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}", "--max-message-size", "65536")
    with Client(broker.endpoint, max_message_size=65536) as c, c.lease("redis") as conn:
        with pytest.raises(LimitExceeded, match=r"over the limit of 65536 \(max_message_size\)"):
            conn.request(b"x" * 70000, until=b"\r\n")
        assert conn.request(b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"
    # A client that ignores the limit: libzmq drops its connection at once, unanswered.
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    monitor = raw.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
    raw.connect(broker.endpoint)
    raw.send(msgpack.packb({"v": 1, "id": 1, "op": "ping", "pad": b"x" * 70000}))
    events = []
    while zmq.EVENT_DISCONNECTED not in events:  # the broker closes this connection
        assert monitor.poll(10_000), f"no disconnect within 10 s (events: {events})"
        events.append(zmq_monitor.parse_monitor_message(monitor.recv_multipart())["event"])
    assert raw.poll(0) == 0  # unanswered
    raw.disable_monitor()
    monitor.close()
    raw.close()
    ctx.term()
    with Client(broker.endpoint) as c:
        assert c.ping()["pools"] == ["redis"]  # the broker went on


def _lease_in_child(endpoint: str, results: Any) -> None:
    with Client(endpoint) as c, c.lease("redis") as conn:
        results.put(conn.request(b"PING\r\n", until=b"\r\n"))


def test_a_client_process_may_hold_or_wait_for_at_most_max_leases_per_client(
    redis_server: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker(
        "--upstream", f"redis={redis_server.address}", "--max-size", "5", "--max-leases-per-client", "2"
    )
    c = Client(broker.endpoint)
    first, second = c.lease("redis"), c.lease("redis")
    with pytest.raises(LimitExceeded, match=r"holds or waits for 2 leases of pool 'redis' \(max_leases_per_client\)"):
        c.lease("redis")
    # Another thread of the same process has its own connection, and is counted with it.
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            c.request("redis", b"PING\r\n", until=b"\r\n")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join(10)
    assert len(errors) == 1 and isinstance(errors[0], LimitExceeded)
    assert c.stats("redis")["redis"]["leases_active"] == 2  # nothing else changed
    assert c.stats("redis")["redis"]["requests_waiting"] == 0
    # Another process is not held back.
    mp = multiprocessing.get_context("spawn")
    results = mp.SimpleQueue()
    child = mp.Process(target=_lease_in_child, args=(broker.endpoint, results))
    child.start()
    child.join(30)
    assert child.exitcode == 0 and results.get() == b"+PONG\r\n"
    first.release()
    assert c.request("redis", b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"
    second.release()
    c.close()


def test_on_tcp_max_leases_per_client_counts_each_connection_alone(
    redis_server: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    # Over tcp the broker can't see a process id: each client connection (a thread's socket) counts.
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    broker = start_broker(
        *("--upstream", f"redis={redis_server.address}", "--max-size", "5", "--max-leases-per-client", "2"),
        endpoint=endpoint,
    )
    with Client(broker.endpoint) as c:
        held = [c.lease("redis"), c.lease("redis")]
        with pytest.raises(LimitExceeded, match=r"max_leases_per_client"):
            c.lease("redis")
        results: list[bytes] = []
        thread = threading.Thread(target=lambda: results.append(c.request("redis", b"PING\r\n", until=b"\r\n")))
        thread.start()
        thread.join(10)
        assert results == [b"+PONG\r\n"]  # another thread's connection is another client here
        for lease in held:
            lease.release()


def test_tokens_never_appear_in_full_in_the_log(redis_server: RedisServer, start_broker: Callable[..., Broker]) -> None:
    broker = start_broker(
        "--upstream",
        f"redis={redis_server.address}",
        "--leak-warning-after",
        "0.1",
        "--lease-idle-timeout",
        "0.3",
    )
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.RCVTIMEO, 5000)
    raw.connect(broker.endpoint)
    raw.send(msgpack.packb({"v": 1, "id": 1, "op": "lease", "pool": "redis"}))
    token = msgpack.unpackb(raw.recv())["lease"]
    raw.send(msgpack.packb({"v": 1, "id": 2, "op": "io", "lease": token, "send": b"PING\r\n", "read": "any", "n": 99}))
    assert msgpack.unpackb(raw.recv())["data"] == b"+PONG\r\n"
    # Left idle: warned about as a possible leak, then reclaimed; both lines describe the lease.
    wait_for(lambda: "reclaiming a lease" in broker.log(), what="the lease to be reclaimed")
    log = broker.log()
    assert "possible leak" in log
    for form in (token.hex(), token.hex().upper(), repr(token), token.decode("latin-1")):
        assert form not in log
    raw.close()
    ctx.term()


def test_lease_requests_in_line_carry_at_most_max_waiting_payload(
    redis_server: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker(
        "--upstream",
        f"redis={redis_server.address}",
        "--max-size",
        "1",
        "--max-payload",
        "4096",
        "--max-waiting-payload",
        "8192",
    )
    c = Client(broker.endpoint)
    held = c.lease("redis")
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.RCVTIMEO, 10_000)
    raw.connect(broker.endpoint)
    command = b"SET filler " + b"x" * 3000 + b"\r\n"  # each request carries 3,013 bytes while it waits
    one_shot = {"op": "lease", "pool": "redis", "send": command, "read": "until", "delim": b"\r\n", "release": "keep"}
    for rid in (1, 2, 3):
        raw.send(msgpack.packb({"v": 1, "id": rid, "timeout": 30, **one_shot}))
    refused = msgpack.unpackb(raw.recv())
    assert (refused["id"], refused["error"]) == (3, "limit_exceeded")
    assert "max_waiting_payload=8192" in refused["message"]
    assert c.stats("redis")["redis"]["requests_waiting"] == 2  # the first two still wait
    held.release()
    served = [msgpack.unpackb(raw.recv()) for _ in range(2)]
    assert sorted((reply["id"], reply["data"]) for reply in served) == [(1, b"+OK\r\n"), (2, b"+OK\r\n")]
    # The line is empty again: as much may wait as before.
    raw.send(msgpack.packb({"v": 1, "id": 4, "timeout": 30, **one_shot}))
    assert msgpack.unpackb(raw.recv())["ok"] is True
    raw.close()
    ctx.term()
    c.close()


def test_a_flood_of_connections_does_not_end_the_broker(redis_server: RedisServer) -> None:
    """libzmq's ipc listener aborts its process when accept() finds no file descriptor left: the
    broker takes all the descriptors its hard limit allows, whatever soft limit it was given."""
    directory = short_tempdir()
    endpoint = f"ipc://{directory}/b.sock"
    argv = ["prlimit", "--nofile=200:4096", sys.executable, "-m", "poolbroker", "serve", "--bind", endpoint]
    proc = subprocess.Popen([*argv, "--upstream", f"redis={redis_server.address}"], cwd=ROOT, stderr=subprocess.PIPE)
    flood: list[socket.socket] = []
    try:
        with Client(endpoint, broker_timeout=0.5) as c:
            wait_for(lambda: broker_answers(c), what="the broker")
            limits = Path(f"/proc/{proc.pid}/limits").read_text()
            assert re.search(r"Max open files\s+4096\s+4096", limits), limits
            for _ in range(1000):
                sock = socket.socket(socket.AF_UNIX)
                sock.connect(str(directory / "b.sock"))
                flood.append(sock)
            assert c.request("redis", b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"
        assert proc.poll() is None
    finally:
        for sock in flood:
            sock.close()
        proc.terminate()
        proc.wait(15)
        shutil.rmtree(directory, ignore_errors=True)


def test_a_sendall_larger_than_max_payload_goes_in_chunks(
    redis_server: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}", "--max-payload", str(1024 * 1024))
    value = bytes(range(256)) * (12 * 1024 * 1024 // 256)  # 12 MiB
    with Client(broker.endpoint) as c, c.lease("redis") as conn:
        conn.sendall(b"*3\r\n$3\r\nSET\r\n$9\r\nbig-value\r\n$%d\r\n" % len(value))
        conn.sendall(value)
        conn.sendall(b"\r\n")
        assert conn.recv_until(b"\r\n") == b"+OK\r\n"
        assert conn.request(b"STRLEN big-value\r\n", until=b"\r\n") == b":%d\r\n" % len(value)
    assert redis_server.client().getrange("big-value", 5_000_000, 5_000_009) == value[5_000_000:5_000_010]
    redis_server.client().delete("big-value")
