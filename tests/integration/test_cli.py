"""The broker as a service: default endpoint, config file and flags, signals, refusals."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from poolbroker import BrokerUnavailable, Client, PoolBrokerError
from tests.support import ROOT, Broker, RedisServer, free_port, short_tempdir, wait_for


def test_without_bind_it_listens_in_a_private_runtime_dir_and_says_where(
    redis_server: RedisServer, make_client: Callable[..., Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = short_tempdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))  # for the broker and for this test's Client
    monkeypatch.delenv("POOLBROKER_ENDPOINT", raising=False)
    env = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, "-m", "poolbroker", "serve", "--upstream", f"redis={redis_server.address}"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        first_line = proc.stderr.readline()  # type: ignore[union-attr]
        sock_path = runtime / "poolbroker" / "broker.sock"
        assert f"listening on ipc://{sock_path}" in first_line
        assert stat.S_IMODE(sock_path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(sock_path.stat().st_mode) == 0o600
        c = make_client(None)  # the default endpoint finds it
        assert c.ping()["pools"] == ["redis"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        assert not sock_path.exists()
    finally:
        proc.kill()
        proc.wait()


def test_a_config_file_with_flags_overriding_it(
    redis_server: RedisServer,
    own_redis: RedisServer,
    start_broker: Callable[..., Broker],
    make_client: Callable[..., Client],
    tmp_path: Path,
) -> None:
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[broker]\nlog_level = "debug"\n\n[pools.a]\nupstream = "{redis_server.address}"\nmax_size = 3\n\n'
        f'[pools.b]\nupstream = "{own_redis.address}"\nmax_size = 5\nacquire_timeout = 0.5\n'
    )
    broker = start_broker("--config", str(config), "--max-size", "4")
    c = make_client(broker.endpoint)
    stats = c.stats()
    assert (stats["a"]["pool_max"], stats["b"]["pool_max"]) == (4, 4)
    c.lease("a").discard()  # logged at debug only: the file's log_level took effect
    wait_for(
        lambda: "DEBUG broker.server: pool 'a': closing a connection (discarded)" in broker.log(), what="the debug line"
    )


def test_sigterm_answers_waiters_lets_active_leases_finish_then_exits_cleanly(
    redis_server: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}", "--max-size", "1", "--shutdown-grace", "30")
    c = Client(broker.endpoint)
    other = Client(broker.endpoint)
    held = c.lease("redis")
    with ThreadPoolExecutor(1) as background:
        waiter = background.submit(other.lease, "redis", timeout=20)
        wait_for(lambda: c.stats()["redis"]["requests_waiting"] == 1, what="the waiter")
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGTERM)
        with pytest.raises(BrokerUnavailable, match="shutting down"):
            waiter.result(10)
    with pytest.raises(BrokerUnavailable, match="shutting down"):
        other.lease("redis")  # no new grants
    assert held.request(b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"  # the active lease carries on
    assert broker.proc.poll() is None
    held.release()
    assert broker.proc.wait(10) == 0  # its last lease is back: it ends without waiting out the grace
    assert not Path(broker.endpoint.removeprefix("ipc://")).exists()
    assert "1 leases active, given up to 30.0s to finish" in broker.log()
    wait_for(lambda: redis_server.broker_connections() == 0, what="upstream connections to close")
    c.close()
    other.close()


def test_the_shutdown_grace_ends_and_a_second_signal_ends_it_at_once(
    redis_server: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    for grace, signals in (("0.5", 1), ("60", 2)):
        broker = start_broker("--upstream", f"redis={redis_server.address}", "--shutdown-grace", grace)
        c = Client(broker.endpoint)
        c.lease("redis", tag="slow-job")
        assert broker.proc is not None
        for _ in range(signals):  # one at a time: signals sent together may arrive as one
            broker.proc.send_signal(signal.SIGTERM)
            wait_for(lambda b=broker: "shutting down" in b.log(), what="the shutdown to begin")
        assert broker.proc.wait(10) == 0
        assert "shutdown grace is over: ending a lease held by pid" in broker.log()
        assert "(tag 'slow-job')" in broker.log()
        c.close()


def test_a_second_shutdown_request_ends_active_leases_at_once(
    redis_server: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}", "--shutdown-grace", "60")
    assert broker.proc is not None
    with Client(broker.endpoint) as c, Client(broker.endpoint) as admin:
        c.lease("redis", tag="slow-job")
        admin.shutdown_broker()
        wait_for(lambda: "shutting down" in broker.log(), what="the shutdown to begin")
        assert broker.proc.poll() is None  # the lease may finish: the grace is 60 s
        try:
            admin.shutdown_broker()  # (its answer may not make it out: the broker ends at once)
        except BrokerUnavailable:
            pass
        assert broker.proc.wait(10) == 0
    assert "shutdown grace is over: ending a lease held by pid" in broker.log()


def test_kill_usr1_prints_where_the_broker_is_and_it_goes_on(
    redis_server: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}")
    assert broker.dump_stack()
    assert re.search(r'File ".*broker/drive/server\.py", line \d+ in serve', broker.log())  # the loop, waiting
    with Client(broker.endpoint) as c:
        assert c.request("redis", b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"


def test_bad_configuration_exits_2_with_the_reason(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "poolbroker", "serve", "--upstream", "nonsense"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert result.returncode == 2
    assert "is not NAME=HOST:PORT" in result.stderr


def test_a_second_broker_on_the_same_socket_is_refused(
    redis_server: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    first = start_broker("--upstream", f"redis={redis_server.address}")
    second = Broker("--upstream", f"redis={redis_server.address}", endpoint=first.endpoint).start(wait=False)
    assert second.proc is not None and second.proc.wait(10) == 2
    assert "already listening" in second.log()
    assert first.ready()


def test_the_console_script_and_python_m_are_one_program() -> None:
    script = Path(sys.executable).parent / "poolbroker"
    if not script.exists():
        pytest.skip("the package is not installed in this environment")
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=30)
    mod = subprocess.run([sys.executable, "-m", "poolbroker", "--version"], capture_output=True, text=True, timeout=30)
    assert out.stdout == mod.stdout and out.stdout.startswith("poolbroker ")


def poolbroker(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "poolbroker", *args], capture_output=True, text=True, cwd=ROOT, timeout=60, env=env
    )


def test_serve_check_says_what_would_be_served_or_names_the_problem_and_starts_nothing(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text('[pools.cache]\nupstream = "127.0.0.1:6379"\nmax_size = 4\n')
    endpoint = f"ipc://{tmp_path}/never.sock"
    good = poolbroker("serve", "--check", "--config", str(config), "--bind", endpoint, "--max-size", "8")
    assert good.returncode == 0, good.stderr
    assert f"good; the broker would listen on {endpoint}" in good.stdout
    assert "pool 'cache': 127.0.0.1:6379, protocol tcp" in good.stdout and "max_size 8" in good.stdout
    assert 'port 6379 is redis\'s, but protocol = "tcp"' in good.stdout  # (nothing guards its sessions)
    assert f"--max-size 8 overrides max_size in {config} for pool(s) cache" in good.stdout
    assert not (tmp_path / "never.sock").exists()  # (nothing bound)
    config.write_text('[pools.cache]\nupstream = "127.0.0.1:6379"\ntls = true\ntls_ca_file = "/nonexistent.pem"\n')
    bad = poolbroker("serve", "--check", "--config", str(config), "--bind", endpoint)
    assert bad.returncode == 2 and "pool 'cache': can't set up TLS" in bad.stderr
    assert "Traceback" not in bad.stderr
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o1777)  # (as /tmp: anyone could replace the socket there)
    unsafe = poolbroker("serve", "--check", "--upstream", "r=127.0.0.1:1", "--bind", f"ipc://{tmp_path}/open/b.sock")
    assert unsafe.returncode == 2 and "is not safe for the broker's socket" in unsafe.stderr


def test_keygen_never_replaces_a_key_pair_unless_forced(tmp_path: Path) -> None:
    first = poolbroker("keygen", str(tmp_path), "--name", "broker")
    assert first.returncode == 0, first.stderr
    pair = (tmp_path / "broker.key_secret").read_text()
    again = poolbroker("keygen", str(tmp_path), "--name", "broker")
    assert again.returncode == 2 and "--force" in again.stderr and "locks out" in again.stderr
    assert (tmp_path / "broker.key_secret").read_text() == pair
    forced = poolbroker("keygen", str(tmp_path), "--name", "broker", "--force")
    assert forced.returncode == 0 and (tmp_path / "broker.key_secret").read_text() != pair


def test_ping_is_a_readiness_probe(redis_server: RedisServer, start_broker: Callable[..., Broker]) -> None:
    dead = f"127.0.0.1:{free_port()}"  # (nobody listens there)
    broker = start_broker("--upstream", f"redis={redis_server.address}", "--upstream", f"gone={dead}")
    up = poolbroker("ping", "--endpoint", broker.endpoint)
    assert up.returncode == 0 and "is up: pools gone, redis" in up.stdout, up.stdout + up.stderr
    with Client(broker.endpoint, timeout=0.5) as c, pytest.raises(PoolBrokerError):
        c.request("gone", b"PING\r\n", until=b"\r\n")  # (its connect fails: the pool knows now)
    down = poolbroker("ping", "--endpoint", broker.endpoint)
    assert down.returncode == 1 and "pool(s) gone is failing" in down.stdout
    nobody = poolbroker("ping", "--endpoint", f"ipc://{short_tempdir()}/nobody.sock", "--timeout", "0.5")
    assert nobody.returncode == 1 and "no answer" in nobody.stderr.lower(), nobody.stderr


def test_a_bind_the_os_refuses_is_one_line_and_exit_2(redis_server: RedisServer, tmp_path: Path) -> None:
    with socket_listening() as port:
        result = poolbroker("serve", "--upstream", f"redis={redis_server.address}", "--bind", f"tcp://127.0.0.1:{port}")
    assert result.returncode == 2 and f"can't bind tcp://127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_systemd_hears_ready_once_the_broker_serves(
    redis_server: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    directory = short_tempdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(directory / "notify"))
    listener.settimeout(30)
    with listener:
        broker = start_broker(
            "--upstream",
            f"redis={redis_server.address}",
            env={**os.environ, "NOTIFY_SOCKET": str(directory / "notify")},
        )
        assert listener.recv(100) == b"READY=1"
        assert broker.ready()


def test_every_flag_says_what_it_does_and_enumerated_ones_list_their_values() -> None:
    from poolbroker.broker.operate.cli import build_parser

    silent, open_ended = [], []
    todo = [("poolbroker", build_parser())]
    while todo:  # (every command, and the commands within one: `pool resize`)
        name, parser = todo.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [(f"{name} {sub_name}", sub) for sub_name, sub in action.choices.items()]
                continue
            if isinstance(action, argparse._HelpAction):
                continue
            if not action.help:
                silent.append(f"{name} {action.dest}")
            if action.dest in ("protocol", "probe", "pool_mode", "log_level", "log_format") and not action.choices:
                open_ended.append(f"{name} {action.dest}")
    assert not silent, silent
    assert not open_ended, open_ended


@contextlib.contextmanager
def socket_listening() -> Iterator[int]:
    """A loopback port something else listens on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]
