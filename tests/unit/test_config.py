"""Configuration: defaults < TOML file < environment < flags, with clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from poolbroker.broker.config import load
from poolbroker.broker.drive.security import check_bind, is_loopback_tcp, load_curve
from poolbroker.broker.settings import POOL_SETTINGS, BrokerConfig, ConfigError, PoolConfig, parse_upstream


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(text)
    return path


def test_a_file_with_two_pools_and_flags_overriding_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POOLBROKER_ENDPOINT", raising=False)
    path = write(
        tmp_path,
        """
[broker]
bind = "ipc:///tmp/x.sock"

[pools.redis]
upstream = "127.0.0.1:6379"
max_size = 4
acquire_timeout = 1.5

[pools.cache]
upstream = "[::1]:11211"
""",
    )
    config = load(path, overrides={"max_size": 7, "acquire_timeout": None})
    redis, cache = config.pools
    assert config.bind == "ipc:///tmp/x.sock"
    assert (redis.name, redis.host, redis.port, redis.max_size, redis.acquire_timeout) == (
        "redis",
        "127.0.0.1",
        6379,
        7,
        1.5,
    )
    assert (cache.host, cache.port, cache.address) == ("::1", 11211, "[::1]:11211")
    assert load(path, bind="tcp://127.0.0.1:5555").bind == "tcp://127.0.0.1:5555"


def test_the_environment_overrides_the_file_and_flags_override_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, '[broker]\nbind = "ipc:///tmp/file.sock"\n[pools.a]\nupstream = "h:1"\n')
    monkeypatch.setenv("POOLBROKER_ENDPOINT", "ipc:///tmp/env.sock")
    assert load(path).bind == "ipc:///tmp/env.sock"
    assert load(path, bind="ipc:///tmp/flag.sock").bind == "ipc:///tmp/flag.sock"


def test_upstream_flags_add_pools() -> None:
    config = load(upstreams=["a=127.0.0.1:1", "b=localhost:2"], overrides={"max_waiting": 3})
    assert [(p.name, p.host, p.port, p.max_waiting) for p in config.pools] == [
        ("a", "127.0.0.1", 1, 3),
        ("b", "localhost", 2, 3),
    ]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[pools.a]\nupstream = "h:1"\nmax_sise = 3\n', "unknown key 'max_sise'"),
        ("[pools.a]\nmax_size = 3\n", "needs upstream"),
        ('[pools.a]\nupstream = "h:1"\nmax_size = 0\n', "max_size must be at least 1"),
        ('[pools.a]\nupstream = "h:1"\nmax_size = 2.5\n', "whole number"),
        ('[pools.a]\nupstream = "h:1"\nconnect_timeout = "5"\n', "must be a number"),
        ('[pools.a]\nupstream = "h:port"\n', "not HOST:PORT"),
        ('[broker]\nport = 1\n[pools.a]\nupstream = "h:1"\n', "unknown keys ['port']"),
        ("[pool.a]\n", "unknown tables"),
        ("[broker]\n", "no pools"),
        ("not toml [", "can't read config"),
        ('[pools.a]\nupstream = "h:1"\nmin_idle = 11\n', "min_idle must be between 0 and max_size (10)"),
        ('[pools.a]\nupstream = "h:1"\nidle_timeout = -1\n', "idle_timeout must not be negative"),
        ('[pools.a]\nupstream = "h:1"\nprobe_timeout = 0\n', "probe_timeout must be positive"),
        ('[pools.a]\nupstream = "h:1"\nconnect_backoff = 9.0\n', "connect_backoff must not exceed"),
        ('[pools.a]\nupstream = "h:1"\nprobe = "ping"\n', "probe 'ping' is not one of tcp, send, redis"),
        ('[pools.a]\nupstream = "h:1"\nprobe = "send"\nprobe_send = "x"\n', "needs probe_send and probe_expect"),
        ('[pools.a]\nupstream = "h:1"\nprobe = "redis"\nprobe_send = "x"\n', "probe_send and probe_expect are for"),
        ('[pools.a]\nupstream = "h:1"\nprobe = "http"\nprobe_send = "GET"\n', "is not an HTTP request line"),
        ('[pools.a]\nupstream = "h:1"\nprobe = "http"\nprobe_expect = "OK"\n', "status prefix"),
        ('[pools.a]\nupstream = "h:1"\nprobe_send = 3\n', "probe_send must be a string"),
    ],
)
def test_bad_config_says_what_is_wrong(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=None) as caught:
        load(write(tmp_path, text))
    assert words in str(caught.value)


def test_upstream_flag_syntax() -> None:
    assert parse_upstream("r=127.0.0.1:6379") == ("r", "127.0.0.1", 6379)
    with pytest.raises(ConfigError):
        parse_upstream("127.0.0.1:6379")


def test_health_settings_from_a_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[pools.web]\nupstream = "127.0.0.1:80"\nmin_idle = 2\nidle_timeout = 0\nmax_lifetime = 1800\n'
        'probe = "http"\nprobe_send = "HEAD /health HTTP/1.1"\nprobe_expect = "2"\nprobe_timeout = 0.5\n',
    )
    [web] = load(path).pools
    assert (web.min_idle, web.idle_timeout, web.max_lifetime) == (2, 0.0, 1800.0)
    assert (web.probe, web.probe_send, web.probe_expect) == ("http", "HEAD /health HTTP/1.1", "2")
    assert web.probe_timeout == 0.5


def test_every_pool_setting_but_the_step_lists_is_also_a_flag() -> None:
    from poolbroker.broker.operate.cli import build_parser

    flags = []
    file_only = ("on_connect", "reset", "password")  # step lists, and a secret (not on a command line)
    with_flags = {name: setting for name, setting in POOL_SETTINGS.items() if name not in file_only}
    choices = {"probe": "send", "protocol": "redis", "pool_mode": "transaction"}
    for name, setting in with_flags.items():
        flags.append(f"--{name.replace('_', '-')}")
        if setting.type not in (bool, "bool"):  # (a switch: --tls, --no-tls)
            flags.append(choices.get(name) or ("x" if setting.type in (str, "str") else "1"))
    args = build_parser().parse_args(["serve", *flags])
    assert all(getattr(args, name) is not None for name in with_flags)
    assert set(POOL_SETTINGS) == {f.name for f in dataclasses.fields(PoolConfig)} - {"name", "host", "port"}
    assert all(POOL_SETTINGS[name].metadata.get("file_only") for name in file_only)


def test_on_connect_and_reset_steps_from_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[pools.a]\nupstream = "h:1"\non_connect = [{send = "AUTH pw\\r\\n", expect = "+OK"}, '
        '{send = "SELECT 2\\r\\n", expect = "+OK"}]\nreset = [{send = "RESET\\r\\n", expect = "+RESET"}]\n'
        '[pools.b]\nupstream = "h:2"\nreset = "discard"\n',
    )
    a, b = load(path).pools
    assert a.on_connect == (("AUTH pw\r\n", "+OK"), ("SELECT 2\r\n", "+OK"))
    assert a.reset == (("RESET\r\n", "+RESET"),)
    assert (b.on_connect, b.reset) == ((), "discard")
    assert "AUTH" not in repr(a)  # a password stays out of reprs and logs
    for bad, why in [
        ('reset = "sometimes"', 'must be "auto", "off", "discard" or a list'),
        ("on_connect = [{send = 1, expect = 2}]", "non-empty strings"),
        ('on_connect = [{send = "x"}]', "step 1 must be"),
        ('on_connect = "AUTH"', "must be a list"),
    ]:
        with pytest.raises(ConfigError, match=why):
            load(write(tmp_path, f'[pools.a]\nupstream = "h:1"\n{bad}\n'))


def test_lease_limits_and_the_shutdown_grace(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[broker]\nshutdown_grace = 3.5\n[pools.a]\nupstream = "h:1"\nlease_idle_timeout = 0\nmax_lease_time = 60\n',
    )
    config = load(path)
    assert config.shutdown_grace == 3.5
    assert load(path, shutdown_grace=0.0).shutdown_grace == 0.0
    [pool] = config.pools
    assert (pool.leak_warning_after, pool.lease_idle_timeout, pool.max_lease_time) == (30.0, 0.0, 60.0)
    with pytest.raises(ConfigError, match="shutdown_grace must not be negative"):
        load(write(tmp_path, '[broker]\nshutdown_grace = -1\n[pools.a]\nupstream = "h:1"\n'))
    with pytest.raises(ConfigError, match="max_lease_time must not be negative"):
        load(write(tmp_path, '[pools.a]\nupstream = "h:1"\nmax_lease_time = -5\n'))


def test_limits_and_key_paths_from_the_file_and_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[broker]\nmax_message_size = 1048576\ncurve_clients = "clients"\n'
        '[pools.a]\nupstream = "h:1"\nmax_leases_per_client = 3\n',
    )
    config = load(path, broker_overrides={"max_payload": 4096, "curve_secret_key": "k.key_secret"})
    assert (config.max_message_size, config.max_payload) == (1048576, 4096)
    assert (config.curve_secret_key, config.curve_clients, config.admin_keys) == ("k.key_secret", "clients", None)
    assert config.pools[0].max_leases_per_client == 3
    # Unless given, max_payload follows a smaller max_message_size down, and max_waiting_payload a
    # larger max_payload up.
    assert load(path).max_payload == 1048576 - 1024
    assert load(path).max_waiting_payload == 64 * 1024 * 1024
    huge = load(path, broker_overrides={"max_message_size": 2**28, "max_payload": 2**27})
    assert huge.max_waiting_payload == 2**27
    with pytest.raises(ConfigError, match="max_waiting_payload must be at least max_payload"):
        load(path, broker_overrides={"max_waiting_payload": 1000})
    with pytest.raises(ConfigError, match="max_payload must be between 1 and max_message_size - 1024"):
        load(path, broker_overrides={"max_payload": 1048576})
    with pytest.raises(ConfigError, match=r"\[broker\] curve_clients must be a string"):
        load(write(tmp_path, '[broker]\ncurve_clients = 1\n[pools.a]\nupstream = "h:1"\n'))


@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.9.9.9:5555", True),
        ("tcp://[::1]:5555", True),
        ("tcp://localhost:5555", True),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://*:5555", False),
        ("tcp://10.0.0.1:5555", False),
        ("tcp://eth0:5555", False),
        ("tcp://example.com:5555", False),
    ],
)
def test_which_tcp_endpoints_are_loopback(endpoint: str, loopback: bool) -> None:
    assert is_loopback_tcp(endpoint) is loopback
    if loopback:
        check_bind(endpoint, None)
    else:
        with pytest.raises(ConfigError, match="needs CURVE"):
            check_bind(endpoint, None)


def test_curve_settings_go_together() -> None:
    with pytest.raises(ConfigError, match="need curve_secret_key"):
        load_curve(BrokerConfig(curve_clients="/tmp"))
    with pytest.raises(ConfigError, match="curve_secret_key needs curve_clients"):
        load_curve(BrokerConfig(curve_secret_key="/nonexistent"))
    assert load_curve(BrokerConfig()) is None


def test_tls_settings(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[pools.a]\nupstream = "h:1"\ntls = true\ntls_ca_file = "/etc/ca.pem"\ntls_server_name = "redis.internal"\n',
    )
    [pool] = load(path).pools
    assert (pool.tls, pool.tls_ca_file, pool.tls_server_name) == (True, "/etc/ca.pem", "redis.internal")
    with pytest.raises(ConfigError, match="tls must be true or false"):
        load(write(tmp_path, '[pools.a]\nupstream = "h:1"\ntls = "yes"\n'))
    with pytest.raises(ConfigError, match="tls_\\* settings need tls = true"):
        load(write(tmp_path, '[pools.a]\nupstream = "h:1"\ntls_ca_file = "/etc/ca.pem"\n'))
    with pytest.raises(ConfigError, match="tls_key_file needs tls_cert_file"):
        load(write(tmp_path, '[pools.a]\nupstream = "h:1"\ntls = true\ntls_key_file = "k.pem"\n'))
    from poolbroker.broker.drive.tls import client_context

    with pytest.raises(ConfigError, match="can't set up TLS"):
        client_context(PoolConfig("a", "h", 1, tls=True, tls_ca_file=str(tmp_path / "missing.pem")))


def test_a_postgres_pool_needs_a_user() -> None:
    ok = PoolConfig("db", "h", 5432, protocol="postgres", username="app", database="shop", client_name="web app")
    assert (ok.probe, ok.database) == ("postgres", "shop")
    with pytest.raises(ConfigError, match="needs a username"):
        PoolConfig("db", "h", 5432, protocol="postgres")
    with pytest.raises(ConfigError, match='database need protocol = "postgres"'):
        PoolConfig("r", "h", 6379, protocol="redis", database="shop")


def test_loading_says_which_file_settings_a_flag_overrides(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text('[broker]\nmax_payload = 8192\n[pools.a]\nupstream = "h:1"\nmax_size = 3\n')
    path.write_text(path.read_text() + '[pools.b]\nupstream = "h:2"\n')
    config = load(path, overrides={"max_size": 8, "min_idle": 1}, broker_overrides={"max_payload": 4096})
    assert config.overridden == (
        f"--max-size 8 overrides max_size in {path} for pool(s) a",
        f"--max-payload 4096 overrides [broker] max_payload in {path}",
    )
    assert load(path).overridden == ()


CLUSTER = '[cluster]\netcd = ["http://127.0.0.1:2379", "http://10.0.0.2:2379"]\nname = "web-1"\n'


def test_a_cluster_table_and_pools_that_share_a_budget(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        CLUSTER
        + 'ttl = 5\n[pools.db]\nupstream = "db:5432"\nmax_size = 20\ncluster_max_size = 100\nreserved = 10\n'
        + '[pools.cache]\nupstream = "cache:11211"\n',
    )
    config = load(path)
    assert config.cluster is not None
    assert config.cluster.etcd == ("http://127.0.0.1:2379", "http://10.0.0.2:2379")
    assert (config.cluster.name, config.cluster.ttl) == ("web-1", 5)
    db, cache = config.pools
    assert (db.shared, db.cluster_max_size, db.reserved) == (True, 100, 10)
    assert not cache.shared  # (bounded by this broker alone, as without [cluster])
    assert load(write(tmp_path, CLUSTER + '[pools.p]\nupstream = "h:1"\n')).cluster.ttl == 10  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('[pools.p]\nupstream = "h:1"\ncluster_max_size = 5\n', "cluster_max_size needs a [cluster] table"),
        ('[cluster]\nname = "a"\n[pools.p]\nupstream = "h:1"\n', "needs etcd"),
        ('[cluster]\netcd = "http://h:1"\nname = "a"\n[pools.p]\nupstream = "h:1"\n', "must be a list of URLs"),
        ('[cluster]\netcd = []\nname = "a"\n[pools.p]\nupstream = "h:1"\n', "lists no endpoints"),
        ('[cluster]\netcd = ["h:1"]\nname = "a"\n[pools.p]\nupstream = "h:1"\n', "is not http://HOST:PORT"),
        ('[cluster]\netcd = ["http://h:1"]\nname = "a b"\n[pools.p]\nupstream = "h:1"\n', "letters, digits"),
        ('[cluster]\netcd = ["http://h:1"]\nname = "a"\nttl = 0\n[pools.p]\nupstream = "h:1"\n', "ttl must be"),
        ('[cluster]\netcd = ["http://h:1"]\nname = "a"\nport = 1\n[pools.p]\nupstream = "h:1"\n', "unknown keys"),
        (CLUSTER + '[pools.p]\nupstream = "h:1"\nreserved = 2\n', "reserved needs cluster_max_size"),
        (CLUSTER + '[pools.p]\nupstream = "h:1"\nmax_size = 4\ncluster_max_size = 9\nreserved = 5\n', "reserved must"),
        (CLUSTER + '[pools.p]\nupstream = "h:1"\ncluster_max_size = 9\nreserved = 1\nmin_idle = 2\n', "min_idle"),
    ],
)
def test_a_wrong_cluster_setting_is_named(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error.replace("[", r"\[").replace("]", r"\]")):
        load(write(tmp_path, text))
