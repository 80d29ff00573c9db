"""Nothing a holder leaves on a connection reaches the next holder: seen from the next holder's
side, on a pool of one connection, against a real Redis (and a real HTTP server). What holders do
by hand runs on both kinds of lease: the relay, and the socket lease (the upstream socket itself,
its stream followed by the Redis tracker the adapters use, whose verdict the release reports)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from poolbroker import Client, UpstreamTimeout
from poolbroker.client._lease import Lease
from poolbroker.client.extension import LentSocket
from poolbroker.redis import BrokerConnectionPool, SessionLeakWarning
from poolbroker.sessions.redis import RedisSession
from poolbroker.sessions.resp import encode_command
from tests.support import LOCKED_REDIS_PASSWORD, Broker, HttpUpstream, RedisServer, wait_for

PASSWORD = LOCKED_REDIS_PASSWORD  # (the locked_redis fixture's)


class Held:
    """A holder's side of a lease of either kind: the relay's Lease, or a socket lease (LentSocket,
    as the adapters hold one: its stream followed by the Redis tracker)."""

    def __init__(self, lease: Lease | LentSocket) -> None:
        self.lease = lease
        self._read = b""  # (a socket lease's bytes read past the last reply)

    def send(self, data: bytes) -> None:
        self.lease.sendall(data)
        if isinstance(self.lease, Lease):
            self.lease.flush()

    def line(self) -> bytes:
        if isinstance(self.lease, Lease):
            return self.lease.recv_until(b"\r\n")
        while b"\r\n" not in self._read:
            self._read += self.lease.recv(65536)
        line, _, self._read = self._read.partition(b"\r\n")
        return line + b"\r\n"

    def exactly(self, size: int) -> bytes:
        if isinstance(self.lease, Lease):
            return self.lease.recv_exactly(size)
        while len(self._read) < size:
            self._read += self.lease.recv(65536)
        data, self._read = self._read[:size], self._read[size:]
        return data


@pytest.fixture(params=["relay", "socket"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextmanager
def hold(c: Client, kind: str) -> Iterator[Held]:
    """A lease of the pool "redis" of `kind`: released at the end of the block, discarded if it raises."""
    if kind == "relay":
        with c.lease("redis") as lease:
            yield Held(lease)
        return
    lent = LentSocket(c, "redis", RedisSession)
    try:
        yield Held(lent)
    except BaseException:
        lent.discard()
        raise
    lent.give_back()  # (with its tracker's verdict)


def cmd(held: Held, *args: str) -> bytes:
    """One command and its first reply line (enough for +OK, :n, -ERR, +QUEUED)."""
    held.send(encode_command(*args))
    return held.line()


def bulk(held: Held, *args: str) -> bytes | None:
    """One command whose reply is a bulk string; None for a null."""
    header = cmd(held, *args)
    assert header.startswith(b"$"), header
    size = int(header[1:-2])
    return None if size < 0 else held.exactly(size + 2)[:-2]


def pool_config(tmp_path: Path, server: RedisServer, extra: str = "", max_size: int = 1) -> str:
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[pools.redis]\nupstream = "{server.address}"\nprotocol = "redis"\nmax_size = {max_size}\n'
        f"check_idle_after = 60\n{extra}\n"
    )
    config.chmod(0o600)
    return str(config)


@pytest.fixture
def broker(start_broker: Callable[..., Broker], tmp_path: Path, own_redis: RedisServer) -> Broker:
    return start_broker("--config", pool_config(tmp_path, own_redis))


def test_the_next_holder_gets_none_of_the_last_holders_session(
    kind: str, broker: Broker, own_redis: RedisServer
) -> None:
    with Client(broker.endpoint) as c:
        with hold(c, kind) as a:
            first_id = cmd(a, "CLIENT", "ID")
            assert cmd(a, "SELECT", "3") == b"+OK\r\n"
            assert cmd(a, "CLIENT", "SETNAME", "holder-A") == b"+OK\r\n"
            assert cmd(a, "CLIENT", "TRACKING", "ON") == b"+OK\r\n"
            assert cmd(a, "MULTI") == b"+OK\r\n"
            assert cmd(a, "SET", "left-by-a", "1") == b"+QUEUED\r\n"
        # (the with block ended normally: a release, not a discard)
        with hold(c, kind) as b:
            assert cmd(b, "CLIENT", "ID") == first_id  # the same connection, reset rather than closed
            assert bulk(b, "CLIENT", "GETNAME") is None
            assert cmd(b, "SET", "written-by-b", "1") == b"+OK\r\n"  # not QUEUED: no MULTI open
            info = bulk(b, "CLIENT", "INFO")
            assert info is not None and b" db=0 " in info and b"flags=N " in info  # no tracking (t)
        stats = c.stats("redis")["redis"]
    assert (stats["connections_created"], stats["pool_size"]) == (1, 1)
    direct = own_redis.client()
    assert direct.get("written-by-b") == b"1" and direct.exists("left-by-a") == 0
    assert own_redis.client(db=3).exists("written-by-b") == 0


def test_an_auth_as_another_user_is_undone(
    kind: str, start_broker: Callable[..., Broker], tmp_path: Path, locked_redis: RedisServer
) -> None:
    admin = locked_redis.client()
    admin.acl_setuser("other", enabled=True, passwords=["+other-pass"], commands=["+@all"], keys=["*"])
    config = pool_config(tmp_path, locked_redis, f'password = "{PASSWORD}"\ndb = 2\nclient_name = "pooled"')
    broker = start_broker("--config", config)
    with Client(broker.endpoint) as c:
        with hold(c, kind) as a:
            assert bulk(a, "ACL", "WHOAMI") == b"default"
            assert cmd(a, "AUTH", "other", "other-pass") == b"+OK\r\n"
            assert bulk(a, "ACL", "WHOAMI") == b"other"
        with hold(c, kind) as b:  # RESET, then the pool's AUTH, SELECT and SETNAME again
            assert bulk(b, "ACL", "WHOAMI") == b"default"
            assert bulk(b, "CLIENT", "GETNAME") == b"pooled"
            assert cmd(b, "SET", "in-db-2", "1") == b"+OK\r\n"
        assert c.stats("redis")["redis"]["connections_created"] == 1
    assert locked_redis.client(db=2).get("in-db-2") == b"1"
    assert PASSWORD not in broker.log()


def test_a_password_from_a_file_or_the_environment(
    start_broker: Callable[..., Broker], tmp_path: Path, locked_redis: RedisServer
) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text(PASSWORD + "\n")
    from_file = start_broker("--config", pool_config(tmp_path, locked_redis, f'password_file = "{secret}"'))
    from_env = start_broker(
        "--upstream",
        f"redis={locked_redis.address}",
        "--protocol",
        "redis",
        "--password-env",
        "TEST_REDIS_PASSWORD",
        env={**__import__("os").environ, "TEST_REDIS_PASSWORD": PASSWORD},
    )
    for broker in (from_file, from_env):
        with Client(broker.endpoint) as c:
            assert c.request("redis", b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"


def test_a_one_shot_that_changes_nothing_costs_no_reset(kind: str, broker: Broker, own_redis: RedisServer) -> None:
    with Client(broker.endpoint) as c:
        for _ in range(20):
            assert c.request("redis", encode_command("INCR", "n"), until=b"\r\n").startswith(b":")
        with hold(c, kind) as held:
            cmd(held, "SELECT", "1")
        c.request("redis", b"PING\r\n", until=b"\r\n")  # waits for the reset: one connection
        stats = c.stats("redis")["redis"]
    # Redis counts every command it ran: the connect's RESET and PING, 20 INCR, the lease's SELECT,
    # one RESET after it, one PING.
    resets = own_redis.client().info("commandstats").get("cmdstat_reset", {}).get("calls", 0)
    assert resets == 1 + 1
    assert stats["connections_created"] == 1


def test_pipelines_and_a_watch_left_behind_are_gone(kind: str, broker: Broker, own_redis: RedisServer) -> None:
    with Client(broker.endpoint) as c:
        r = redis.Redis(connection_pool=BrokerConnectionPool(c, "redis", lend=kind == "socket"))
        pipe = r.pipeline(transaction=False)
        pipe.execute_command("SELECT", 4)
        pipe.set("from-pipeline", 1)
        assert pipe.execute() == [True, True]
        assert r.set("after-pipeline", 1)  # the next holder writes to db 0
        with hold(c, kind) as a:  # a WATCH never ended, then the key changes
            assert cmd(a, "WATCH", "watched") == b"+OK\r\n"
        own_redis.client().set("watched", "changed")
        with hold(c, kind) as b:  # a WATCH still in force would abort this EXEC (a null reply)
            assert [cmd(b, "MULTI"), cmd(b, "SET", "t", "1"), cmd(b, "EXEC")] == [b"+OK\r\n", b"+QUEUED\r\n", b"*1\r\n"]
            assert b.line() == b"+OK\r\n"
        with r.pipeline() as tx:  # redis-py's own MULTI/EXEC under one lease
            tx.watch("watched")
            tx.multi()
            tx.incr("counter")
            assert tx.execute() == [1]
    direct = own_redis.client()
    assert direct.get("after-pipeline") == b"1" and own_redis.client(db=4).get("from-pipeline") == b"1"
    assert direct.exists("from-pipeline") == 0 and direct.get("t") == b"1"


def test_a_holder_killed_in_the_middle_of_a_multi_leaves_nothing(
    kind: str, broker: Broker, own_redis: RedisServer
) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        from poolbroker import Client
        lease = Client({broker.endpoint!r}).lease("redis", socket={kind == "socket"})
        for command in (b"MULTI\\r\\n", b"SET from-the-dead 1\\r\\n"):
            if {kind == "socket"}:
                lease.socket.sendall(command)
                lease.socket.recv(100)
            else:
                lease.request(command, until=b"\\r\\n")
        print("in multi", flush=True)
        time.sleep(60)
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"in multi\n"
        holder.kill()
        with Client(broker.endpoint) as c:
            with hold(c, kind) as held:  # the one connection, once reclaimed
                assert cmd(held, "SET", "after-the-dead", "1") == b"+OK\r\n"
                assert cmd(held, "EXEC") == b"-ERR EXEC without MULTI\r\n"
            assert c.stats("redis")["redis"]["leases_reclaimed"] == 1
    finally:
        holder.kill()
        holder.wait()
    assert own_redis.client().exists("from-the-dead") == 0


def test_a_command_left_half_sent_closes_the_connection(kind: str, broker: Broker, own_redis: RedisServer) -> None:
    with Client(broker.endpoint) as c:
        with hold(c, kind) as a:
            a.send(b"*3\r\n$3\r\nSET\r\n$4\r\nhalf\r\n")  # the value never follows
        with hold(c, kind) as b:  # a new connection: the old one would take this as the value
            assert cmd(b, "SET", "whole", "1") == b"+OK\r\n"
        with hold(c, kind) as d:
            d.send(encode_command("GET", "whole"))  # its reply is never read
        assert c.request("redis", encode_command("GET", "whole"), exactly=7) == b"$1\r\n1\r\n"
        stats = c.stats("redis")["redis"]
    assert stats["connections_created"] == 3
    # The half-sent command is seen in the stream; the unread reply, by the socket (if it came before
    # the release was handled) or by the stream.
    assert stats["connections_closed_out_of_sync"] >= 1
    assert stats["connections_closed_out_of_sync"] + stats["connections_closed_unread"] == 2
    assert own_redis.client().exists("half") == 0


def test_pub_sub_over_a_lease(
    kind: str, start_broker: Callable[..., Broker], tmp_path: Path, own_redis: RedisServer
) -> None:
    broker = start_broker("--config", pool_config(tmp_path, own_redis, max_size=2))
    with Client(broker.endpoint) as c:
        r = redis.Redis(connection_pool=BrokerConnectionPool(c, "redis", lend=kind == "socket"))
        pubsub = r.pubsub()
        pubsub.subscribe("news")
        confirmation = pubsub.get_message(timeout=5)
        assert confirmation is not None and confirmation["type"] == "subscribe"
        assert pubsub.get_message() is None  # non-blocking: nothing yet
        assert pubsub.get_message(timeout=0.05) is None  # nothing within the timeout
        assert own_redis.client().publish("news", "one") == 1
        message = wait_for(pubsub.get_message, what="the published message")  # non-blocking, polled
        assert (message["type"], message["data"]) == ("message", b"one")
        own_redis.client().publish("news", "two")
        message = pubsub.get_message(timeout=5)
        assert message is not None and message["data"] == b"two"
        own_redis.client().publish("news", "three")
        assert next(m for m in pubsub.listen() if m["type"] == "message")["data"] == b"three"
        assert len(c.leases("redis")) == 1  # one lease for the pub/sub's whole life
        assert r.set("meanwhile", 1)  # commands take another lease
        pubsub.close()
        wait_for(lambda: c.stats("redis")["redis"]["leases_active"] == 0, what="the pub/sub's release")
        with hold(c, kind) as held:  # whichever connection: not subscribed, commands work
            assert cmd(held, "PING") == b"+PONG\r\n"
        assert own_redis.client().pubsub_numsub("news") == [(b"news", 0)]


def test_blpop_without_a_socket_timeout_waits_as_long_as_it_takes(
    start_broker: Callable[..., Broker], tmp_path: Path, own_redis: RedisServer
) -> None:
    broker = start_broker("--config", pool_config(tmp_path, own_redis, max_size=2))
    # A short io_timeout: the BLPOP outlives several of the lease's round trips.
    with Client(broker.endpoint, io_timeout=0.2) as c:
        # socket_timeout=None: redis-py's way to wait for a blocking command as long as it takes,
        # here on the relay's leases, whose reads go in rounds of io_timeout.
        r = redis.Redis(connection_pool=BrokerConnectionPool(c, "redis", socket_timeout=None, lend=False))
        result: list[object] = []
        waiter = threading.Thread(target=lambda: result.append(r.blpop(["queue"], timeout=0)))
        waiter.start()
        wait_for(lambda: any(lease["ops"] >= 3 for lease in c.leases("redis")), what="three polls of the BLPOP")
        assert not result
        own_redis.client().rpush("queue", "job")
        waiter.join(10)
        assert result == [(b"queue", b"job")]
        # With a socket_timeout, redis-py's own: a TimeoutError when it runs out.
        timed = redis.Redis(connection_pool=BrokerConnectionPool(c, "redis", socket_timeout=0.2))
        with pytest.raises(redis.TimeoutError):
            timed.blpop(["empty"], timeout=0)


def test_non_blocking_and_blocking_reads_on_a_lease(broker: Broker, own_redis: RedisServer) -> None:
    with Client(broker.endpoint, io_timeout=0.2) as c, c.lease("redis") as lease:
        lease.request(encode_command("SUBSCRIBE", "ch"), until=b"\r\n")
        lease.recv_until(b":1\r\n")
        lease.settimeout(0)
        with pytest.raises(BlockingIOError):
            lease.recv(100)
        lease.settimeout(0.1)
        with pytest.raises(UpstreamTimeout):  # a TimeoutError, as socket.timeout is
            lease.recv(100)
        own_redis.client().publish("ch", "x")
        lease.settimeout(None)
        assert lease.recv(100).startswith(b"*3\r\n")


def test_the_redis_adapter_warns_once_over_a_pool_that_does_not_reset(
    start_broker: Callable[..., Broker], tmp_path: Path, own_redis: RedisServer
) -> None:
    tcp = start_broker("--upstream", f"redis={own_redis.address}")
    with Client(tcp.endpoint) as c:
        r = redis.Redis(connection_pool=BrokerConnectionPool(c, "redis"))
        with pytest.warns(SessionLeakWarning, match=r"it speaks tcp.*SELECT, AUTH"):
            r.ping()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            r.ping()  # once per process and pool
    off = start_broker("--config", pool_config(tmp_path, own_redis, 'reset = "off"'))
    with Client(off.endpoint) as c, pytest.warns(SessionLeakWarning, match="its reset is off"):
        redis.Redis(connection_pool=BrokerConnectionPool(c, "redis")).ping()
    safe = start_broker("--upstream", f"redis={own_redis.address}", "--protocol", "redis")
    with Client(safe.endpoint) as c, warnings.catch_warnings():
        warnings.simplefilter("error")
        assert redis.Redis(connection_pool=BrokerConnectionPool(c, "redis")).ping()
        described = {"protocol": "redis", "reset": "auto", "protects": True, "lends": True, "resp": 2}
        assert c.ping()["protocols"]["redis"] == described


def test_an_http_connection_left_in_the_middle_of_a_response_is_closed(
    start_broker: Callable[..., Broker], http_upstream: HttpUpstream
) -> None:
    broker = start_broker("--upstream", f"api={http_upstream.address}", "--protocol", "http", "--max-size", "1")
    request = b"GET /health HTTP/1.1\r\nHost: api\r\n\r\n"
    with Client(broker.endpoint) as c:
        for _ in range(3):  # whole exchanges: one connection throughout
            assert c.request("api", request, until=b"ok\n").endswith(b"\r\n\r\nok\n")
        with c.lease("api") as lease:
            assert lease.request(request, until=b"\r\n") == b"HTTP/1.1 200 OK\r\n"  # the rest unread
        with c.lease("api") as lease:  # the body has not even arrived: only the stream can tell
            stalled = lease.request(b"GET /stall HTTP/1.1\r\nHost: api\r\n\r\n", until=b"\r\n\r\n")
            assert b"Content-Length: 5" in stalled
        wait_for(lambda: c.stats("api")["api"]["leases_active"] == 0, what="the release")
        http_upstream.unstall.set()
        assert c.request("api", request, until=b"ok\n").startswith(b"HTTP/1.1 200 OK\r\n")
        stats = c.stats("api")["api"]
    assert stats["connections_created"] == 3
    assert (stats["connections_closed_unread"], stats["connections_closed_out_of_sync"]) == (1, 1)
