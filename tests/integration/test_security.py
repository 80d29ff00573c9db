"""Who gets in and who may administer: ipc permissions, CURVE beyond loopback, admin rights."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from poolbroker import BrokerUnavailable, Client, NotAuthorized
from tests.support import ROOT, Broker, RedisServer, broker_answers, free_port, short_tempdir, wait_for


def serve_and_exit(*args: str) -> subprocess.CompletedProcess[str]:
    """A broker that is expected to refuse to start."""
    argv = [sys.executable, "-m", "poolbroker", "serve", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=ROOT)


def poolbroker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "poolbroker", *args], capture_output=True, text=True, timeout=30, cwd=ROOT
    )


# -- ipc ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o720])
def test_the_broker_refuses_an_ipc_directory_others_can_write_to(redis_server: RedisServer, mode: int) -> None:
    directory = short_tempdir()
    try:
        os.chmod(directory, mode)
        result = serve_and_exit("--bind", f"ipc://{directory}/b.sock", "--upstream", f"redis={redis_server.address}")
        assert result.returncode == 2
        assert f"{directory} is not safe for the broker's socket" in result.stderr
        assert f"mode {mode:o}" in result.stderr
        assert not (directory / "b.sock").exists()
    finally:
        shutil.rmtree(directory)


def test_an_ipc_socket_file_is_for_its_owner_only(
    redis_server: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    directory = short_tempdir()
    os.chmod(directory, 0o755)  # others may look but not write: allowed
    broker = start_broker("--upstream", f"redis={redis_server.address}", endpoint=f"ipc://{directory}/b.sock")
    assert stat.S_IMODE((directory / "b.sock").stat().st_mode) == 0o600
    assert Client(broker.endpoint).ping()["pools"] == ["redis"]
    shutil.rmtree(directory, ignore_errors=True)


# -- tcp and CURVE -----------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "*", "[::]", "eth0"])
def test_plain_tcp_beyond_loopback_is_refused(redis_server: RedisServer, host: str) -> None:
    result = serve_and_exit("--bind", f"tcp://{host}:{free_port()}", "--upstream", f"redis={redis_server.address}")
    assert result.returncode == 2
    assert "is not a loopback address: it needs CURVE" in result.stderr


@dataclass
class Keys:
    server_public: Path
    server_pair: Path
    clients: Path  # directory of client public keys
    admins: Path  # directory of admin public keys
    app_pair: Path  # an ordinary client's key pair (its public key is in `clients`)
    ops_pair: Path  # an administrator's key pair (its public key is in `admins`)
    stranger_pair: Path  # a key pair nobody listed


def keygen(directory: Path, name: str) -> tuple[Path, Path]:
    result = poolbroker("keygen", str(directory), "--name", name)
    assert result.returncode == 0, result.stderr
    return directory / f"{name}.key", directory / f"{name}.key_secret"


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    server_public, server_pair = keygen(tmp_path / "server", "broker")
    app_public, app_pair = keygen(tmp_path / "app", "app")
    ops_public, ops_pair = keygen(tmp_path / "ops", "ops")
    _, stranger_pair = keygen(tmp_path / "stranger", "stranger")
    (tmp_path / "clients").mkdir()
    (tmp_path / "admins").mkdir()
    shutil.copy(app_public, tmp_path / "clients")
    shutil.copy(ops_public, tmp_path / "admins")
    clients, admins = tmp_path / "clients", tmp_path / "admins"
    return Keys(server_public, server_pair, clients, admins, app_pair, ops_pair, stranger_pair)


def test_keygen_writes_a_public_key_to_give_out_and_a_private_key_pair(keys: Keys) -> None:
    assert stat.S_IMODE(keys.server_pair.stat().st_mode) == 0o600
    assert stat.S_IMODE(keys.server_public.stat().st_mode) == 0o644
    assert "secret-key" in keys.server_pair.read_text()
    assert "secret-key" not in keys.server_public.read_text()


@pytest.fixture
def curve_broker(keys: Keys, redis_server: RedisServer, start_broker: Callable[..., Broker]) -> Broker:
    return start_broker(
        "--upstream",
        f"redis={redis_server.address}",
        "--curve-secret-key",
        str(keys.server_pair),
        "--curve-clients",
        str(keys.clients),
        "--admin-keys",
        str(keys.admins),
        endpoint=f"tcp://127.0.0.1:{free_port()}",
        client_options={"server_key": str(keys.server_public), "client_key": str(keys.app_pair)},
    )


def test_curve_lets_in_listed_keys_and_nobody_else(curve_broker: Broker, keys: Keys) -> None:
    endpoint, server = curve_broker.endpoint, str(keys.server_public)
    app = Client(endpoint, server_key=server, client_key=str(keys.app_pair))
    assert app.request("redis", b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"
    outsiders = [
        Client(endpoint, broker_timeout=0.5),  # no CURVE at all
        Client(endpoint, broker_timeout=0.5, server_key=server, client_key=str(keys.stranger_pair)),  # unlisted
        # The right client key but the wrong server key: the handshake can't complete.
        Client(endpoint, broker_timeout=0.5, server_key=str(keys.app_pair), client_key=str(keys.app_pair)),
    ]
    for outsider in outsiders:
        with pytest.raises(BrokerUnavailable, match="no answer from the broker"):
            outsider.ping()
        outsider.close()
    assert app.request("redis", b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"  # still serving
    app.close()


def test_client_keys_may_come_from_the_environment(
    curve_broker: Broker, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POOLBROKER_SERVER_KEY", keys.server_public.read_text().split('public-key = "')[1][:40])
    monkeypatch.setenv("POOLBROKER_CLIENT_KEY", str(keys.app_pair))
    with Client(curve_broker.endpoint) as c:
        assert c.ping()["pools"] == ["redis"]


def test_a_key_pair_readable_by_others_is_refused(keys: Keys, redis_server: RedisServer) -> None:
    keys.server_pair.chmod(0o644)
    result = serve_and_exit(
        "--bind",
        f"tcp://127.0.0.1:{free_port()}",
        "--upstream",
        f"redis={redis_server.address}",
        "--curve-secret-key",
        str(keys.server_pair),
        "--curve-clients",
        str(keys.clients),
    )
    assert result.returncode == 2
    assert "is readable by others (mode 644): chmod 600 it" in result.stderr
    keys.app_pair.chmod(0o640)
    with pytest.raises(ValueError, match="readable by others"):
        Client("tcp://127.0.0.1:1", server_key=str(keys.server_public), client_key=str(keys.app_pair))


def test_curve_needs_both_keys_on_the_client(keys: Keys) -> None:
    with pytest.raises(ValueError, match="CURVE needs both"):
        Client("tcp://127.0.0.1:1", server_key=str(keys.server_public))


# -- administration ----------------------------------------------------------------------------


def test_the_brokers_own_user_may_shut_it_down_over_ipc(
    redis_server: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}")
    result = poolbroker("shutdown", "--endpoint", broker.endpoint)
    assert result.returncode == 0, result.stderr
    assert broker.proc is not None and broker.proc.wait(15) == 0
    assert "shutdown asked by an administrator" in broker.log()


def test_nobody_administers_over_plain_tcp(redis_server: RedisServer, start_broker: Callable[..., Broker]) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}", endpoint=f"tcp://127.0.0.1:{free_port()}")
    with Client(broker.endpoint) as c:
        with pytest.raises(NotAuthorized, match="'shutdown' is for administrators only"):
            c.shutdown_broker()
        c.lease("redis").release()  # a holder's rights are decided on its first lease: still none
        with pytest.raises(NotAuthorized):
            c.shutdown_broker()
        assert c.ping()["pools"] == ["redis"]
    result = poolbroker("shutdown", "--endpoint", broker.endpoint)
    assert result.returncode == 1
    assert "for administrators only" in result.stderr


def test_with_curve_only_admin_keys_administer(curve_broker: Broker, keys: Keys) -> None:
    server = str(keys.server_public)
    with Client(curve_broker.endpoint, server_key=server, client_key=str(keys.app_pair)) as app:
        with pytest.raises(NotAuthorized):
            app.shutdown_broker()
        assert app.ping()["pools"] == ["redis"]
    result = poolbroker(
        "shutdown", "--endpoint", curve_broker.endpoint, "--server-key", server, "--client-key", str(keys.ops_pair)
    )
    assert result.returncode == 0, result.stderr
    assert curve_broker.proc is not None and curve_broker.proc.wait(15) == 0


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run the broker as another user")
def test_over_ipc_another_user_may_connect_only_as_root_and_may_not_administer(redis_server: RedisServer) -> None:
    nobody = 65534
    directory = short_tempdir()
    os.chown(directory, nobody, nobody)
    endpoint = f"ipc://{directory}/b.sock"
    argv = ["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups", sys.executable, "-m", "poolbroker"]
    argv += ["serve", "--bind", endpoint, "--upstream", f"redis={redis_server.address}"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with Client(endpoint, broker_timeout=0.5) as root:  # root may connect to any socket file
            wait_for(lambda: proc.poll() is None and broker_answers(root), what="the broker run as nobody")
            with pytest.raises(NotAuthorized):
                root.shutdown_broker()
        assert proc.poll() is None
    finally:
        proc.terminate()
        assert proc.wait(15) == 0, proc.stderr.read() if proc.stderr else ""
        shutil.rmtree(directory, ignore_errors=True)
