"""Not ready is not up, and too old says so: a pool does not hand out a connection to a server that
answers but can't serve yet. A Redis restarting from a large AOF answers -LOADING for a few
seconds: requests made meanwhile wait (the broker retries its connect with backoff) and are
answered once it has loaded, never with -LOADING. A PostgreSQL standby that refuses sessions
(57P03) is waited for until it is promoted. A Redis without RESET (before 6.2) fails the first
connect with a message that says what to do."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from poolbroker import Client, UpstreamUnavailable
from poolbroker.sessions.resp import encode_command
from tests.support import Broker, PostgresServer, RedisServer, free_port, pg_pool, postgres_bin, wait_for

KEYS = 2_000_000  # (about two seconds of loading here)


def loading(server: RedisServer) -> bool:
    """Does it answer PING with -LOADING? (A plain socket: redis-py would retry, and hide it.)"""
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"PING\r\n")
            answer = sock.recv(100)
    except OSError:
        return False  # (not listening yet)
    assert answer.startswith(b"-LOADING"), f"{answer!r} before it was seen loading: make its data set larger"
    return True


def test_a_redis_loading_its_data_is_not_handed_out_and_its_waiters_wait(
    start_broker: Callable[..., Broker],
) -> None:
    server = RedisServer(options=("--save", "", "--appendonly", "yes", "--enable-debug-command", "yes")).start()
    try:
        direct = server.client()
        direct.execute_command("DEBUG", "POPULATE", KEYS, "filler", 50)
        direct.bgrewriteaof()
        wait_for(lambda: direct.info("persistence")["aof_rewrite_in_progress"] == 0, 60, "the AOF rewrite")
        broker = start_broker("--upstream", f"redis={server.address}", "--protocol", "redis", "--max-size", "2")
        c = Client(broker.endpoint, timeout=60)
        assert c.request("redis", encode_command("INCR", "counter"), until=b"\r\n") == b":1\r\n"

        server.stop()
        server.start(wait=False)
        wait_for(lambda: loading(server), 20, "redis to be loading its AOF")
        # Asked while Redis loads: the broker's connects are answered -LOADING, and retried.
        assert c.request("redis", encode_command("INCR", "counter"), until=b"\r\n") == b":2\r\n"
        assert server.client().dbsize() == KEYS + 1  # (it was served once all was loaded)
        stats = c.stats("redis")["redis"]
        assert stats["connections_failed"] >= 1 and stats["leases_active"] == 0
        assert "not ready: LOADING" in broker.log()
        c.close()
    finally:
        server.stop()


class OldRedis(socketserver.ThreadingTCPServer):
    """Answers as Redis 6.0 does: RESET is an unknown command; PING is +PONG. (Debian has no Redis
    that old: this stands in for one.)"""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while line := self.rfile.readline():
                    if line.startswith(b"*"):  # a RESP array: its command is the second line after
                        self.rfile.readline()
                        name = self.rfile.readline().strip().upper()
                        for _ in range(int(line[1:]) - 1):
                            self.rfile.readline(), self.rfile.readline()
                    else:
                        name = line.split()[0].upper()
                    answer = b"+PONG\r\n" if name == b"PING" else b"-ERR unknown command '%s'\r\n" % name
                    self.wfile.write(answer)

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_a_redis_without_reset_fails_the_first_connect_saying_what_to_do(
    start_broker: Callable[..., Broker], tmp_path: Path
) -> None:
    old = OldRedis()
    try:
        address = f"127.0.0.1:{old.server_address[1]}"
        broker = start_broker("--upstream", f"redis={address}", "--protocol", "redis")
        with Client(broker.endpoint) as c, pytest.raises(UpstreamUnavailable, match=r"needs Redis 6\.2 or later"):
            c.request("redis", encode_command("PING"), until=b"\r\n")
        # The documented fallback: a pool that closes instead of resetting needs no RESET.
        config = tmp_path / "broker.toml"
        config.write_text(f'[pools.redis]\nupstream = "{address}"\nprotocol = "redis"\nreset = "discard"\n')
        fallback = start_broker("--config", str(config))
        with Client(fallback.endpoint) as c:
            assert c.request("redis", encode_command("PING"), until=b"\r\n") == b"+PONG\r\n"
    finally:
        old.shutdown()
        old.server_close()


def test_a_postgresql_standby_refusing_sessions_is_waited_for_until_promoted(
    start_broker: Callable[..., Broker], tmp_path: Path
) -> None:
    # A standby without hot standby refuses every login with 57P03 ("not accepting connections"):
    # a server that is up but not ready, for as long as we like. Promoted, it takes sessions.
    primary = PostgresServer()
    standby_data = primary.dir / "standby"
    port = free_port()
    try:
        primary._run(
            postgres_bin("pg_basebackup"),
            *("-h", str(primary.dir), "-p", str(primary.port), "-U", primary.user, "-D", str(standby_data), "-R"),
        )
        options = f"-p {port} -k {primary.dir} -c listen_addresses=127.0.0.1 -c hot_standby=off -c fsync=off"
        log = str(primary.dir / "standby.log")
        primary._run(postgres_bin("pg_ctl"), "-D", str(standby_data), "-o", options, "-l", log, "-w", "start")
        config = pg_pool(tmp_path, primary, password_env="PG_PASSWORD", database="postgres")
        config_text = Path(config).read_text().replace(f":{primary.port}", f":{port}")
        Path(config).write_text(config_text)
        broker = start_broker("--config", config, env={"PG_PASSWORD": primary.password})
        with Client(broker.endpoint, timeout=60) as c:
            granted: list[bool] = []

            def lease_once() -> None:
                with c.lease("pg"):
                    granted.append(True)

            waiter = threading.Thread(target=lease_once)
            waiter.start()
            # Not ready: its login is retried, and the request waits on rather than failing at once.
            with Client(broker.endpoint) as observer:

                def retried() -> bool:
                    stats = observer.stats("pg")["pg"]
                    return stats["connections_failed"] >= 2 and stats["requests_waiting"] == 1

                wait_for(retried, 20, "logins refused as not ready, the request still waiting")
            assert "not ready: FATAL 57P03" in broker.log()
            primary._run(postgres_bin("pg_ctl"), "-D", str(standby_data), "-w", "promote")
            waiter.join(30)
            assert granted == [True]
    finally:
        if (standby_data / "postmaster.pid").exists():
            primary._run(postgres_bin("pg_ctl"), "-D", str(standby_data), "-m", "immediate", "-w", "stop")
        primary.stop()
