"""The examples run, and the package builds as a wheel with its type information."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

from helpers import ROOT, Broker, RedisServer, free_port, short_tempdir

from broker.config import load
from broker.operate.cli import build_parser
from client import Client


def test_the_example_config_loads_and_serves(redis_server: RedisServer, start_broker: Callable[..., Broker]) -> None:
    config = load(ROOT / "examples" / "broker.toml")
    assert [pool.name for pool in config.pools] == ["redis", "cache", "api"]
    assert [pool.protocol for pool in config.pools] == ["redis", "memcached", "http"]
    assert (config.log_format, config.metrics_bind) == ("json", "127.0.0.1:9187")
    # The same file, with the machine-specific parts overridden by flags.
    broker = start_broker(
        "--config",
        str(ROOT / "examples" / "broker.toml"),
        "--metrics-bind",
        f"127.0.0.1:{free_port()}",
        "--upstream",
        f"redis={redis_server.address}",
    )
    with Client(broker.endpoint) as c:
        assert sorted(c.ping()["pools"]) == ["api", "cache", "redis"]
        assert c.request("redis", b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"


def test_the_systemd_unit_starts_the_broker_with_flags_it_knows() -> None:
    unit = (ROOT / "examples" / "poolbroker.service").read_text().replace("\\\n", " ")
    [exec_start] = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    argv = shlex.split(exec_start.removeprefix("ExecStart="))
    assert argv[0].endswith("/poolbroker")
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.config, args.log_format) == ("serve", "/etc/poolbroker/broker.toml", "json")
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit


def test_the_multiprocessing_demo_runs(own_redis: RedisServer, start_broker: Callable[..., Broker]) -> None:
    broker = start_broker("--upstream", f"redis={own_redis.address}", "--protocol", "redis", "--max-size", "3")
    result = subprocess.run(
        [sys.executable, "examples/multiprocessing_demo.py", "--processes", "4", "--requests", "50"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "POOLBROKER_ENDPOINT": broker.endpoint, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    assert "4 processes did 200 INCRs" in result.stdout
    assert own_redis.client().get("demo:counter") == b"200"
    assert own_redis.broker_connections() <= 3


def test_the_package_builds_a_wheel_with_its_type_information_and_command() -> None:
    out = short_tempdir()
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    [wheel] = list(Path(out).glob("poolbroker-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {"broker/py.typed", "client/py.typed", "client/redis.py", "broker/drive/server.py"} <= set(names)
    assert {"broker/decide/protocols/redis.py", "broker/operate/cli.py"} <= set(names)  # every layer
    [entry_points] = [name for name in names if name.endswith("entry_points.txt")]
    assert "poolbroker = broker.operate.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    version = subprocess.run([sys.executable, "-m", "broker", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert version.stdout.strip() == "poolbroker 0.1.0"
