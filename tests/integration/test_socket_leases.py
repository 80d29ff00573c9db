"""Socket leases: the broker lends the upstream socket itself over its lending socket, and keeps
the bound, the line and the return. Real broker, real Redis, real worker processes."""

from __future__ import annotations

import asyncio
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from poolbroker import AsyncClient, Client, NotLent, SocketLease
from poolbroker.client.extension import LentSocket
from poolbroker.redis import BrokerConnectionPool
from poolbroker.wire import pgwire
from poolbroker.wire.endpoint import lending_path
from tests.support import ROOT, Broker, RedisServer, short_tempdir, wait_for
from tests.support.servers import PostgresServer, pg_pool

REDIS_POOL = ("--protocol", "redis", "--max-size", "1", "--check-idle-after", "60")


def command(lease: SocketLease, line: bytes) -> bytes:
    """One inline command on the lent socket, and its one-line reply."""
    lease.socket.sendall(line + b"\r\n")
    reply = b""
    while not reply.endswith(b"\r\n"):
        chunk = lease.socket.recv(4096)
        assert chunk, "the upstream closed the connection"
        reply += chunk
    return reply


def resets(redis_server: RedisServer) -> int:
    stats = redis_server.client().info("commandstats")
    return int(stats.get("cmdstat_reset", {}).get("calls", 0))


@pytest.fixture
def broker(start_broker: Callable[..., Broker], own_redis: RedisServer) -> Broker:
    return start_broker("--upstream", f"redis={own_redis.address}", *REDIS_POOL)


def test_the_lent_socket_is_the_upstream_connection_itself(broker: Broker, own_redis: RedisServer) -> None:
    with Client(broker.endpoint) as c, c.lease("redis", socket=True) as lease:
        assert lease.socket.getpeername() == ("127.0.0.1", own_redis.port)
        ours = lease.socket.getsockname()[1]
        clients = own_redis.client().client_list()
        # Redis sees the lent socket's own address: no relay between.
        assert [client for client in clients if client["addr"].endswith(f":{ours}")]
        assert command(lease, b"PING") == b"+PONG\r\n"
    assert os.path.exists(lending_path(broker.endpoint) or "")
    assert oct(os.stat(lending_path(broker.endpoint) or "").st_mode & 0o777) == "0o600"


def test_a_session_left_unreported_is_reset_and_a_clean_one_costs_nothing(
    broker: Broker, own_redis: RedisServer
) -> None:
    with Client(broker.endpoint) as c:
        with c.lease("redis", socket=True) as lease:
            assert command(lease, b"SELECT 3") == b"+OK\r\n"
        with c.lease("redis", socket=True) as lease:  # (a pool of one: the same connection)
            before = resets(own_redis)  # (counted once the last holder's reset is surely done)
            assert b"db=0" in command(lease, b"CLIENT INFO")
            lease.release("clean")
        assert resets(own_redis) == before  # (reported clean: back as it is, no reset)
        with c.lease("redis", socket=True) as lease:
            assert command(lease, b"PING") == b"+PONG\r\n"
        stats = c.stats("redis")["redis"]
        assert stats["connections_created"] == 1 and stats["pool_peak"] == 1


def test_what_a_holder_leaves_unread_or_reports_out_of_sync_closes_the_connection(broker: Broker) -> None:
    with Client(broker.endpoint) as c:
        lease = c.lease("redis", socket=True)
        lease.socket.sendall(b"PING\r\n")
        assert select.select([lease.socket], [], [], 5)[0]  # (its answer is there, unread)
        lease.release("clean")
        wait_for(lambda: c.stats("redis")["redis"]["connections_closed_unread"] == 1, what="the unread close")
        with c.lease("redis", socket=True) as lease:  # (its client knows what the socket can't show)
            lease.release("out_of_sync")
        wait_for(lambda: c.stats("redis")["redis"]["connections_closed_out_of_sync"] == 1, what="the close")
        with c.lease("redis", socket=True) as lease:  # (a new connection, clean)
            assert command(lease, b"PING") == b"+PONG\r\n"


HOLDER = textwrap.dedent("""
    import sys, time
    from poolbroker import Client
    lease = Client(sys.argv[1]).lease("redis", socket=True)
    lease.socket.sendall(b"MULTI\\r\\n")
    lease.socket.recv(100)
    lease.socket.sendall(b"SET {key} 1\\r\\n")   # (queued: a MULTI never ended)
    lease.socket.recv(100)
    print("holding", flush=True)
    time.sleep(120)
""")


def test_a_holder_killed_while_holding_is_reclaimed_at_once_and_leaves_nothing(
    broker: Broker, own_redis: RedisServer
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER.replace("{key}", "killed"), broker.endpoint],
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"holding\n"
        holder.kill()
        holder.wait()
        with Client(broker.endpoint) as c:
            wait_for(lambda: c.stats("redis")["redis"]["leases_reclaimed"] == 1, what="the reclaim")
            with c.lease("redis", socket=True) as lease:
                assert command(lease, b"EXEC") == b"-ERR EXEC without MULTI\r\n"  # (a new connection)
                assert command(lease, b"EXISTS killed") == b":0\r\n"
            assert c.stats("redis")["redis"]["pool_size"] <= 1
    finally:
        holder.kill()
        holder.wait()


EXITS_WITH_A_GRANT_UNREAD = """
import os, select, sys
from poolbroker import Client
from poolbroker.wire.protocol import VERSION, lease_request

c = Client(sys.argv[1])
lease = c.lease("redis", socket=True)
lease.socket.sendall(b"CLIENT ID\\r\\n")
print(lease.socket.recv(100).decode().strip(":\\r\\n"), flush=True)
lender = lease._lender
# Another pool's lease asked for (as another thread would), its grant come and left unread; then
# the release, one way, and the exit: the broker's next read of this connection reports a reset
# before the release it still holds.
lender.sock.send(lender._packer.pack({"v": VERSION, "id": 99, **lease_request("other", 5.0, os.getpid(), "h", None)}))
select.select([lender.sock], [], [], 10)
lease.release("clean")
os._exit(0)
"""


def test_a_release_before_an_exit_with_a_grant_unread_still_counts(
    start_broker: Callable[..., Broker], own_redis: RedisServer
) -> None:
    broker = start_broker("--upstream", f"redis={own_redis.address}", "--upstream", f"other={own_redis.address}")
    holder = subprocess.run(
        [sys.executable, "-c", EXITS_WITH_A_GRANT_UNREAD, broker.endpoint],
        capture_output=True,
        cwd=ROOT,
        timeout=30,
        check=True,
    )
    first_id = int(holder.stdout)
    with Client(broker.endpoint) as c:
        wait_for(lambda: c.stats("other")["other"]["leases_reclaimed"] == 1, what="the unread grant's reclaim")
        with c.lease("redis", socket=True) as lease:  # the released connection, kept: not reclaimed
            assert command(lease, b"CLIENT ID") == f":{first_id}\r\n".encode()
        assert c.stats("redis")["redis"]["leases_reclaimed"] == 0


def test_a_frozen_holder_past_max_lease_time_is_cut_off_and_its_next_io_fails(
    start_broker: Callable[..., Broker], own_redis: RedisServer
) -> None:
    broker = start_broker("--upstream", f"redis={own_redis.address}", *REDIS_POOL, "--max-lease-time", "1")
    code = textwrap.dedent("""
        import os, signal, sys
        from poolbroker import Client
        lease = Client(sys.argv[1]).lease("redis", socket=True)
        os.kill(os.getpid(), signal.SIGSTOP)          # frozen past max_lease_time
        lease.socket.settimeout(5)
        try:
            lease.socket.sendall(b"PING\\r\\n")
            print("read", lease.socket.recv(100), flush=True)
        except OSError as exc:
            print("failed", type(exc).__name__, flush=True)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code, broker.endpoint], stdout=subprocess.PIPE, cwd=ROOT)
    try:
        wait_for(lambda: Path(f"/proc/{holder.pid}/stat").read_text().split()[2] == "T", what="the holder to stop")
        with Client(broker.endpoint) as c:
            wait_for(lambda: c.stats("redis")["redis"]["leases_reclaimed"] == 1, timeout=15, what="the revocation")
            with c.lease("redis", socket=True) as lease:  # (the bound held: a new connection, the only one)
                assert command(lease, b"PING") == b"+PONG\r\n"
            assert own_redis.broker_connections() <= 1
        holder.send_signal(signal.SIGCONT)
        out, _ = holder.communicate(timeout=30)
        assert out in (b"read b''\n", b"failed BrokenPipeError\n", b"failed ConnectionResetError\n"), out
    finally:
        holder.kill()
        holder.wait()


def test_a_forked_child_never_keeps_its_parent_s_lent_socket(broker: Broker) -> None:
    with Client(broker.endpoint) as c, c.lease("redis", socket=True) as lease:
        inode = os.fstat(lease.socket.fileno()).st_ino
        pid = os.fork()
        if pid == 0:  # the child: its copy of the lent socket is closed, the lease not its own
            held = [fd for fd in os.listdir("/proc/self/fd") if _inode(f"/proc/self/fd/{fd}") == inode]
            try:
                lease.socket  # noqa: B018 - the child may not use it
                os._exit(3)
            except NotLent:
                os._exit(0 if not held else 4)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert command(lease, b"PING") == b"+PONG\r\n"  # (the parent's lease goes on)


def test_an_exec_d_program_inherits_no_lent_socket(broker: Broker) -> None:
    with Client(broker.endpoint) as c, c.lease("redis", socket=True) as lease:
        inode = os.fstat(lease.socket.fileno()).st_ino
        listing = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_socket_leases as t;"
        listing += " print(' '.join(t._links('self')))"
        child = subprocess.run([sys.executable, "-c", listing], close_fds=False, capture_output=True, text=True)
        assert child.returncode == 0
        assert f"socket:[{inode}]" not in child.stdout
        assert f"socket:[{inode}]" in " ".join(_links(os.getpid()))  # (and it is ours)


def test_a_pool_that_can_t_lend_says_so(
    start_broker: Callable[..., Broker], own_redis: RedisServer, tmp_path: Path
) -> None:
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[pools.redis]\nupstream = "{own_redis.address}"\nprotocol = "redis"\n'
        f'[pools.kept]\nupstream = "{own_redis.address}"\nprotocol = "redis"\nlend_sockets = false\n'
    )
    broker = start_broker("--config", str(config))
    with Client(broker.endpoint) as c:
        with pytest.raises(NotLent, match="lend_sockets = false"):
            c.lease("kept", socket=True)
        with c.lease("redis", socket=True) as lease:  # (the lending connection goes on)
            assert command(lease, b"PING") == b"+PONG\r\n"
        assert c.request("kept", b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"  # (the relay serves it)
    with Client("tcp://127.0.0.1:1") as far, pytest.raises(NotLent, match="ipc"):
        far.lease("redis", socket=True)


def test_another_user_may_not_lease_a_socket(broker: Broker) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root, to run a process as another user")
    path = lending_path(broker.endpoint)
    assert path is not None
    code = textwrap.dedent("""
        import socket, sys
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(sys.argv[1])
        except PermissionError:
            print("refused by the file's mode")
            sys.exit()
        sock.settimeout(10)
        print(sock.recv(1000))
    """)

    python = shutil.which("python3", path="/usr/bin:/bin")  # (not ours: another user can't reach it)
    if python is None:
        pytest.skip("no system python3 to run as another user")

    def as_nobody() -> str:
        argv = [python, "-I", "-c", code, path]
        return subprocess.run(argv, user="nobody", capture_output=True, text=True, timeout=30).stdout

    assert as_nobody().strip() == "refused by the file's mode"
    # Were the socket open to all, the broker would still check who connects.
    os.chmod(os.path.dirname(path), 0o711)
    os.chmod(path, 0o666)
    assert "not_authorized" in as_nobody()


def test_ten_thousand_socket_leases_leak_no_descriptor(broker: Broker) -> None:
    with Client(broker.endpoint) as c:
        for _ in range(100):  # (the lending connection, the pool's connection: made once)
            with c.lease("redis", socket=True) as lease:
                command(lease, b"PING")
        c.ping()  # (and the broker socket the count below uses)
        ours, theirs = _fd_count(os.getpid()), _fd_count(broker.pid)
        started = time.monotonic()
        for _ in range(10_000):
            lease = c.lease("redis", socket=True)
            lease.socket.sendall(b"PING\r\n")
            lease.socket.recv(100)
            lease.release("clean")
        print(f"10,000 socket leases in {time.monotonic() - started:.1f}s")
        c.ping()  # (the last release is in)
        assert _fd_count(os.getpid()) == ours
        assert _fd_count(broker.pid) == theirs
        assert c.stats("redis")["redis"]["connections_created"] == 1


def _inode(link: str) -> int | None:
    try:
        return os.stat(link).st_ino
    except OSError:
        return None


def _links(pid: int | str) -> list[str]:
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return links


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_an_async_socket_lease_serves_the_loop_and_a_cancelled_wait_leaks_nothing(broker: Broker) -> None:
    async def main() -> None:
        async with AsyncClient(broker.endpoint) as c:
            async with c.lease("redis", socket=True) as lease:
                reader, writer = await asyncio.open_connection(sock=lease.socket.dup())
                writer.write(b"PING\r\n")
                assert await reader.readline() == b"+PONG\r\n"
                writer.close()  # (its own copy: the lease's socket is the lease's to close)
                # A second request waits (a pool of one); cancelled, its grant is given back.
                waiting = asyncio.ensure_future(c.lease("redis", socket=True))
                async with asyncio.timeout(10):  # (until the broker has it in line)
                    while (await c.stats("redis"))["redis"]["requests_waiting"] != 1:
                        await asyncio.sleep(0.01)
                waiting.cancel()
            lease = await c.lease("redis", socket=True)  # (the pool's one connection, back)
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(lease.socket, b"PING\r\n")
            assert await loop.sock_recv(lease.socket, 100) == b"+PONG\r\n"
            lease.release("clean")
            assert (await c.stats("redis"))["redis"]["connections_created"] == 1

    asyncio.run(main())


def pg_simple(lease: SocketLease, sql: str) -> list[tuple[int, bytes]]:
    """One simple query on the lent socket, as the server answers it, to its ReadyForQuery."""
    lease.socket.sendall(pgwire.query(sql))
    frames, answers = pgwire.Frames(keep=b"DEZ"), []
    while not answers or answers[-1][0] != ord("Z"):
        data = lease.socket.recv(65536)
        assert data, "the server closed the connection"
        answers += frames.feed(data)
    return answers


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_a_postgres_session_left_on_a_lent_socket_never_reaches_the_next_holder(
    mode: str, pg_server: PostgresServer, start_broker: Callable[..., Broker], tmp_path: Path
) -> None:
    config = pg_pool(tmp_path, pg_server, password_env="PG_PASSWORD", database="postgres", max_size=1, pool_mode=mode)
    broker = start_broker("--config", config, env={**os.environ, "PG_PASSWORD": pg_server.password})
    with Client(broker.endpoint) as c:
        with c.lease("pg", socket=True) as lease:
            assert lease.backend_pid is not None  # (the backend the socket reaches)
            first_pid = lease.backend_pid
            pg_simple(lease, "CREATE TEMPORARY TABLE left_behind (n int)")
            pg_simple(lease, "BEGIN")  # (and a transaction left open)
            # (nothing reported: the pool's reset runs, ROLLBACK and DISCARD ALL)
        with c.lease("pg", socket=True) as lease:
            assert lease.backend_pid == first_pid  # (the same connection, reset)
            answers = pg_simple(lease, "SELECT count(*) FROM pg_class WHERE relname = 'left_behind'")
            [row] = [body for kind, body in answers if kind == ord("D")]
            assert row.endswith(b"0")  # (no such table)
            assert answers[-1] == (ord("Z"), b"I")  # (idle: no transaction)


def test_psycopg_in_transaction_mode_takes_a_socket_lease_per_transaction_and_none_to_close(
    pg_server: PostgresServer, start_broker: Callable[..., Broker], tmp_path: Path
) -> None:
    from poolbroker import postgres

    config = pg_pool(tmp_path, pg_server, password_env="PG_PASSWORD", database="postgres", pool_mode="transaction")
    broker = start_broker("--config", config, env={**os.environ, "PG_PASSWORD": pg_server.password})
    with Client(broker.endpoint) as c:
        conn = postgres.connect(c, "pg", autocommit=True)
        before = c.stats("pg")["pg"]["requests_num"]
        for n in range(3):
            assert conn.execute("SELECT %s::int", [n]).fetchone() == (n,)
            assert c.stats("pg")["pg"]["leases_active"] == 0  # (given back at the transaction's end)
        with conn.transaction():
            conn.execute("SELECT 1")
            assert c.stats("pg")["pg"]["leases_active"] == 1  # (held to the COMMIT)
        conn.close()
        assert c.stats("pg")["pg"]["requests_num"] - before == 4  # (the close took none)


def test_redis_py_runs_on_lent_sockets_by_default_and_resets_only_what_a_command_changed(
    broker: Broker, own_redis: RedisServer
) -> None:
    with Client(broker.endpoint) as c:
        r = redis.Redis(connection_pool=BrokerConnectionPool(c, "redis"))
        connection = r.connection_pool.get_connection()
        assert isinstance(connection._sock, LentSocket)  # (what it runs its commands on)
        r.connection_pool.release(connection)
        assert r.incr("lent-incr") == 1  # (the connection's handshake has a RESET of its own)
        before = resets(own_redis)
        for n in range(2, 51):
            assert r.incr("lent-incr") == n
        with r.pipeline(transaction=True) as pipe:
            assert pipe.incr("lent-incr").get("lent-incr").execute() == [51, b"51"]
        assert resets(own_redis) == before  # (its client followed each command: nothing to reset)
        r.execute_command("CLIENT", "SETNAME", "changed")
        assert resets(own_redis) == before + 1  # (reported: the pool's reset ran)
        assert r.client_getname() is None
        stats = c.stats("redis")["redis"]
        assert stats["requests_num"] >= 53 and stats["connections_created"] == 1


def test_a_lending_socket_that_never_answers_fails_the_lease_within_its_wait() -> None:
    """The client's lending socket blocks under the kernel's timeout: a broker that accepted and
    then hangs (stopped, wedged) fails the lease with BrokerUnavailable once the wait is over."""
    import socket

    from poolbroker import BrokerUnavailable

    directory = short_tempdir()
    endpoint = f"ipc://{directory}/broker.sock"
    path = lending_path(endpoint)
    assert path is not None
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    hung.bind(path)
    hung.listen(1)  # (accepted by the kernel, never answered)
    client = Client(endpoint, timeout=0.3, broker_timeout=0.2)
    try:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="no answer on the lending socket"):
            client.lease("redis", socket=True)
        assert time.monotonic() - started < 5.0  # (bounded by the wait, 0.5 s, not forever)
    finally:
        client.close()
        hung.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_connections_lent_then_killed_while_idle_are_seen_closed_and_never_lent(
    start_broker: Callable[..., Broker], own_redis: RedisServer
) -> None:
    """An idle connection's watch is one-shot and stays through a lent lease (whose own replies
    may spend it): each one lent and given back is watched again, and its close by the upstream
    is seen at once, with no lease asking."""
    broker = start_broker("--upstream", f"redis={own_redis.address}", *REDIS_POOL, "--max-size", "4")
    with Client(broker.endpoint) as c:
        for _ in range(3):  # (each connection lent and given back more than once)
            leases = [c.lease("redis", socket=True) for _ in range(4)]
            for lease in leases:
                lease.socket.sendall(b"PING\r\n")
            for lease in leases:
                assert lease.socket.recv(100) == b"+PONG\r\n"
                lease.release("clean")
        wait_for(lambda: c.stats("redis")["redis"]["pool_idle"] == 4, what="the four back idle")
        r = own_redis.client()
        try:
            assert r.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes") == 4
        finally:
            r.close()
        wait_for(lambda: c.stats("redis")["redis"]["connections_closed_broken"] == 4, what="the four closes seen")
        with c.lease("redis", socket=True) as lease:  # (a new connection, not a dead one)
            lease.socket.sendall(b"PING\r\n")
            assert lease.socket.recv(100) == b"+PONG\r\n"
            lease.release("clean")
