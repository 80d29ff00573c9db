"""Code written for sockets, unmodified, over leases: http.client and redis-py against real servers."""

from __future__ import annotations

import http.client
import io
import threading
from collections.abc import Callable

import pytest
import redis
import redis.utils

from poolbroker import Client, PoolMismatch, PoolTimeout
from poolbroker.http import HTTPConnection
from poolbroker.redis import BrokerConnectionPool
from tests.support import Broker, HttpUpstream, RedisServer

# HTTP pools: the broker follows each request and response (a connection is reused only between them).
HTTP_POOL = ("--protocol", "http", "--probe-send", "HEAD /health HTTP/1.1")


@pytest.fixture
def http_upstream() -> HttpUpstream:
    return HttpUpstream()


def test_http_client_runs_over_a_lease_with_keep_alive(
    http_upstream: HttpUpstream, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker("--upstream", f"api=127.0.0.1:{http_upstream.port}", *HTTP_POOL)
    c = Client(broker.endpoint)
    conn = http.client.HTTPConnection("api.internal")
    conn.sock = c.lease("api")  # the standard library's own class, its socket a lease
    for path, status, body in [("/health", 200, b"ok\n"), ("/down", 503, b"down\n"), ("/health", 200, b"ok\n")]:
        conn.request("GET", path)
        response = conn.getresponse()
        assert (response.status, response.read()) == (status, body)
    assert c.stats("api")["api"]["connections_created"] == 1  # three requests, one upstream connection
    conn.close()  # closes the "socket": the lease goes back, the connection stays open in the pool
    stats = c.stats("api")["api"]
    assert (stats["leases_active"], stats["pool_idle"], stats["connections_closed"]) == (0, 1, 0)
    c.close()


def test_the_http_adapter_leases_whenever_http_client_would_connect(
    http_upstream: HttpUpstream, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker("--upstream", f"api=127.0.0.1:{http_upstream.port}", "--max-size", "2", *HTTP_POOL)
    c = Client(broker.endpoint)

    def fetch() -> list[int]:
        conn = HTTPConnection(c, "api", host="api.internal", timeout=5)
        statuses = []
        for _ in range(20):
            conn.request("HEAD", "/health")
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
            conn.close()  # each request under a lease of its own
        return statuses

    # Keep-alive: one lease for as long as http.client keeps its connection, for every request on it.
    conn = HTTPConnection(c, "api", host="api.internal", timeout=5)
    before = c.stats("api")["api"]["requests_num"]
    for _ in range(5):
        conn.request("GET", "/health")
        assert conn.getresponse().read() == b"ok\n"
        assert len(c.leases("api")) == 1  # held between requests
    assert c.stats("api")["api"]["requests_num"] == before + 1  # five requests, one lease
    conn.close()
    assert c.leases("api") == []

    results: list[list[int]] = []
    threads = [threading.Thread(target=lambda: results.append(fetch())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [[200] * 20] * 4
    stats = c.stats("api")["api"]
    assert stats["requests_num"] == 81 and stats["connections_created"] <= 2
    c.close()


def test_a_lease_is_socket_like(redis_server: RedisServer, start_broker: Callable[..., Broker]) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}")
    with Client(broker.endpoint) as c, c.lease("redis") as lease:
        assert lease.send(b"SET socket-like 1\r\n") == len(b"SET socket-like 1\r\n")
        buffer = bytearray(64)
        assert lease.recv_into(buffer) == 5 and bytes(buffer[:5]) == b"+OK\r\n"
        writer = lease.makefile("wb")
        writer.write(b"GET socket-")
        writer.write(b"like\r\n")
        writer.flush()
        reader = lease.makefile("rb")
        assert reader.readline() == b"$1\r\n" and reader.readline() == b"1\r\n"
        reader.close()  # as with a socket, closing its file leaves it open
        lease.settimeout(2.5)
        assert lease.gettimeout() == 2.5
        lease.settimeout(None)  # as a socket's: blocking
        assert lease.gettimeout() is None
        lease.settimeout(0)  # non-blocking: nothing there yet is BlockingIOError, as a socket's
        assert lease.gettimeout() == 0
        with pytest.raises(BlockingIOError):
            lease.recv(10)
        with pytest.raises(ValueError):
            lease.settimeout(-1)
        with pytest.raises(ValueError):
            lease.makefile("r")
        assert isinstance(reader, io.BufferedReader)
        lease.shutdown()
        lease.close()
        assert lease.released
        assert c.stats("redis")["redis"]["connections_closed_discarded"] == 1  # shut down: not reused


def test_redis_py_runs_each_command_and_pipeline_under_one_lease(
    own_redis: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker("--upstream", f"redis={own_redis.address}", "--max-size", "2", "--protocol", "redis")
    c = Client(broker.endpoint)
    r = redis.Redis(connection_pool=BrokerConnectionPool(c, "redis"))
    assert r.set("greeting", "hello") is True
    assert r.get("greeting") == b"hello"
    assert r.incr("counter", 5) == 5
    with r.pipeline(transaction=True) as pipe:  # MULTI ... EXEC
        assert pipe.set("x", 1).incr("x").get("x").execute() == [True, 2, b"2"]
    with r.pipeline(transaction=False) as pipe:
        assert pipe.rpush("list", "a", "b").lrange("list", 0, -1).execute() == [2, [b"a", b"b"]]
    with pytest.raises(redis.ResponseError):
        r.execute_command("NO-SUCH-COMMAND")
    assert r.get("x") == b"2"
    stats = c.stats("redis")["redis"]
    # 3 commands, 2 pipelines, the failed command and the last GET: 7 leases, all given back.
    assert (stats["requests_num"], stats["leases_active"]) == (7, 0)
    assert stats["connections_created"] == 1 and stats["connections_closed"] == 0
    assert own_redis.broker_connections() == 1
    c.close()


def test_redis_py_watch_holds_one_lease_across_the_transaction(
    own_redis: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker("--upstream", f"redis={own_redis.address}", "--max-size", "2", "--protocol", "redis")
    c = Client(broker.endpoint)
    r = redis.Redis(connection_pool=BrokerConnectionPool(c, "redis"))
    r.set("balance", 10)

    def withdraw(pipe: redis.client.Pipeline) -> None:
        balance = int(pipe.get("balance"))  # immediate mode, on the leased connection
        pipe.multi()
        pipe.set("balance", balance - 3)

    assert r.transaction(withdraw, "balance") == [True]
    assert r.get("balance") == b"7"
    # The WATCH, the GET and the MULTI/EXEC run on one connection: a change made in between by
    # another client aborts the EXEC (were they on two, the EXEC would go through).
    other = own_redis.client()
    with r.pipeline() as pipe:
        pipe.watch("balance")
        balance = int(pipe.get("balance"))
        other.set("balance", 100)
        pipe.multi()
        pipe.set("balance", balance - 3)
        with pytest.raises(redis.WatchError):
            pipe.execute()
    assert r.get("balance") == b"100"
    assert c.stats("redis")["redis"]["leases_active"] == 0
    c.close()


def test_redis_py_from_many_threads_stays_within_the_bound(
    own_redis: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker("--upstream", f"redis={own_redis.address}", "--max-size", "3", "--protocol", "redis")
    c = Client(broker.endpoint, timeout=30)
    r = redis.Redis(connection_pool=BrokerConnectionPool(c, "redis"))

    def work() -> None:
        for _ in range(100):
            r.incr("shared")

    threads = [threading.Thread(target=work) for _ in range(8)]
    with own_redis.sampler(broker) as upstream:  # the broker's sockets to Redis, sampled throughout
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert r.get("shared") == b"800"
    assert c.stats("redis")["redis"]["connections_created"] <= 3
    assert 1 <= upstream.peak <= 3  # (the pool's connections stay open: the last sample sees them)
    c.close()


def test_redis_py_speaks_resp3_on_a_resp3_pool_and_names_the_setting_on_another(
    own_redis: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    resp3 = start_broker("--upstream", f"redis={own_redis.address}", "--protocol", "redis", "--resp", "3")
    c = Client(resp3.endpoint)
    r = redis.Redis(connection_pool=BrokerConnectionPool(c, "redis", protocol=3))
    assert r.hset("h", mapping={"a": "1", "b": "2"}) == 2
    assert r.hgetall("h") == {b"a": b"1", b"b": b"2"}  # (a RESP3 map)
    with r.pipeline(transaction=True) as pipe:
        assert pipe.incr("n").sismember("none", "x").execute() == [1, False]
    pubsub = r.pubsub()
    pubsub.subscribe("news")
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
    assert r.publish("news", "hello") == 1
    assert pubsub.get_message(timeout=5)["data"] == b"hello"  # type: ignore[index]  # (a RESP3 push)
    pubsub.close()
    for _ in range(20):  # each command on a lease of its own, ended by its answer
        assert r.incr("counted")
    stats = c.stats("redis")["redis"]
    assert stats["leases_active"] == 0 and stats["connections_closed_out_of_sync"] == 0
    # Every connection speaks RESP3 from its handshake: a RESP2 client is told, not misread.
    with pytest.raises(PoolMismatch, match="protocol=3 here"):
        redis.Redis(connection_pool=BrokerConnectionPool(c, "redis", protocol=2)).get("h")
    resp2 = start_broker("--upstream", f"redis={own_redis.address}", "--protocol", "redis")
    with Client(resp2.endpoint) as c2:
        with pytest.raises(PoolMismatch, match="set resp = 3"):
            redis.Redis(connection_pool=BrokerConnectionPool(c2, "redis", protocol=3)).get("h")
        # Asked for none, redis-py >= 8 speaks RESP3 where the server can, else RESP2: here, the
        # pool's. (redis-py < 8 speaks RESP2 unless asked.)
        assert redis.Redis(connection_pool=BrokerConnectionPool(c2, "redis")).hgetall("h") == {b"a": b"1", b"b": b"2"}
    if getattr(redis.utils, "DEFAULT_RESP_VERSION", 2) == 3:
        assert redis.Redis(connection_pool=BrokerConnectionPool(c, "redis")).hgetall("h") == {b"a": b"1", b"b": b"2"}
    else:
        with pytest.raises(PoolMismatch, match="protocol=3 here"):
            redis.Redis(connection_pool=BrokerConnectionPool(c, "redis")).get("h")
    c.close()


@pytest.mark.parametrize(
    ("setting", "value"), [("password", "pw"), ("username", "app"), ("db", 3), ("client_name", "web")]
)
def test_redis_py_refuses_session_settings_that_belong_to_the_pool(setting: str, value: object) -> None:
    # They would change the connection for its next holder; the broker's pool sets them once.
    with pytest.raises(ValueError, match=f"{setting}: set .* in the broker's pool"):
        BrokerConnectionPool(Client("ipc:///nonexistent"), "redis", **{setting: value})


def test_redis_py_gives_up_after_one_lease_request_when_the_pool_is_busy(
    redis_server: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}", "--max-size", "1", "--protocol", "redis")
    holder = Client(broker.endpoint)
    held = holder.lease("redis")
    c = Client(broker.endpoint, timeout=0.3)
    r = redis.Redis(connection_pool=BrokerConnectionPool(c, "redis"))
    with pytest.raises((redis.exceptions.TimeoutError, redis.exceptions.ConnectionError, PoolTimeout)):
        r.get("anything")
    stats = holder.stats("redis")["redis"]
    assert (stats["requests_num"], stats["requests_timeouts"]) == (2, 1)  # no retries on top of the wait
    held.release()
    assert r.ping() is True
    c.close()
    holder.close()


def _messages(c: Client, action: Callable[[], object]) -> int:
    """Messages the broker received for `action` (its own count; the stats request taken off)."""
    before = c.broker_stats()["requests_received"]
    action()
    return int(c.broker_stats()["requests_received"] - before - 1)


def test_a_redis_py_command_costs_one_message_and_its_answer(
    redis_server: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}", "--protocol", "redis")
    c = Client(broker.endpoint)
    r = redis.Redis(connection_pool=BrokerConnectionPool(c, "redis", lend=False))  # (the relay's leases)
    r.ping()  # (the adapter's one-time look at the pool's protocol, out of the count)

    def commands() -> None:
        for n in range(1, 101):
            assert r.incr("counted-incr") == n

    # Each command carries its lease request, and its answer ends the lease (the broker sees every
    # command answered and nothing left on the session): no release message of its own.
    assert _messages(c, commands) == 100
    with r.pipeline(transaction=True) as pipe:
        # (one read takes all four replies when Redis writes them at once, else a second one)
        assert _messages(c, lambda: pipe.incr("counted-incr").get("counted-incr").execute()) <= 2
    stats = c.stats("redis")["redis"]
    assert (stats["leases_active"], stats["connections_created"]) == (0, 1)
    c.close()


def test_an_http_client_request_costs_one_round_trip_and_a_one_way_release(
    http_upstream: HttpUpstream, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker("--upstream", f"api=127.0.0.1:{http_upstream.port}", *HTTP_POOL)
    c = Client(broker.endpoint)

    def requests(keep_alive: bool) -> None:
        conn = HTTPConnection(c, "api", host="api.internal", timeout=5)
        for _ in range(100):
            # HEAD: the server writes its answer in one piece, so one read takes it all (a GET's
            # body comes in a second write, which may need a read of its own).
            conn.request("HEAD", "/health")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            if not keep_alive:
                conn.close()  # a lease per request
        conn.close()

    assert _messages(c, lambda: requests(keep_alive=False)) == 200
    assert _messages(c, lambda: requests(keep_alive=True)) == 101  # one lease: an exchange each, one release
    assert c.stats("api")["api"]["leases_active"] == 0
    c.close()
