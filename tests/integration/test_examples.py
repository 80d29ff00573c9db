"""The examples run, and the package builds as a wheel with its type information."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from poolbroker import Client
from poolbroker.broker.config import load
from poolbroker.broker.operate.cli import build_parser
from tests.support import ROOT, Broker, RedisServer, free_port, short_tempdir, wait_for
from tests.support.web import get, status


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
    [check] = [line for line in unit.splitlines() if line.startswith("ExecStartPre=")]
    checked = build_parser().parse_args(shlex.split(check.removeprefix("ExecStartPre="))[1:])
    assert checked.check and checked.config == args.config
    assert "Type=notify" in unit.splitlines()  # (the broker sends READY=1 once it listens)


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


def test_the_package_builds_a_wheel_of_one_package_with_its_type_information_and_command() -> None:
    out = short_tempdir()
    # From a copy of the sources (symlinks kept): a build/ left in the checkout by an older build
    # would otherwise slip its files into the wheel.
    source = Path(out) / "source"
    skip = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache")
    shutil.copytree(ROOT, source, symlinks=True, ignore=skip)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    [wheel] = list(Path(out).glob("poolbroker-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    # One package at the top level, nothing else: no `client` or `broker` to shadow an app's own.
    assert {name.split("/")[0] for name in names} == {"poolbroker", "poolbroker-0.1.0.dist-info"}
    assert {"poolbroker/py.typed", "poolbroker/redis.py", "poolbroker/http.py", "poolbroker/__main__.py"} <= set(names)
    every_layer = {
        "broker/drive/server.py",
        "broker/decide/protocols/redis.py",
        "broker/operate/cli.py",
        "client/_lease.py",
    }
    assert {f"poolbroker/{name}" for name in every_layer} <= set(names)
    [entry_points] = [name for name in names if name.endswith("entry_points.txt")]
    assert "poolbroker = poolbroker.broker.operate.launch:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    # Installed on its own (away from this checkout), it imports and runs as the service.
    target = Path(out) / "site"
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)]
    assert subprocess.run(install, capture_output=True, text=True, timeout=300).returncode == 0
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = "import poolbroker, poolbroker.redis, poolbroker.http; print(poolbroker.__file__)"
    imported = subprocess.run([sys.executable, "-c", where], capture_output=True, text=True, cwd=out, env=env)
    assert imported.stdout.strip() == str(target / "poolbroker" / "__init__.py"), imported.stderr
    version = subprocess.run(
        [sys.executable, "-m", "poolbroker", "--version"], capture_output=True, text=True, cwd=out, env=env
    )
    assert version.stdout.strip() == "poolbroker 0.1.0", version.stderr


def test_a_worker_s_install_needs_only_pyzmq_and_msgpack_and_the_command_says_what_it_lacks() -> None:
    """`pip install poolbroker` is the worker side: the client and every adapter import without
    the broker's own libraries (poolbroker[broker]); the command says which extra it needs."""
    blocked = short_tempdir()
    for name in ("h11", "prometheus_client", "rich", "scramp"):  # (as if not installed)
        (blocked / name).mkdir()
        (blocked / name / "__init__.py").write_text(f"raise ModuleNotFoundError('not installed', name={name!r})\n")
    env = {**os.environ, "PYTHONPATH": f"{blocked}:{ROOT}"}
    # (poolbroker.httpx is left out: httpx itself needs h11)
    worker = "import poolbroker, poolbroker.redis, poolbroker.memcache, poolbroker.postgres, poolbroker.pytest_plugin"
    imported = subprocess.run([sys.executable, "-c", worker], capture_output=True, text=True, cwd=blocked, env=env)
    assert imported.returncode == 0, imported.stderr
    command = subprocess.run(
        [sys.executable, "-m", "poolbroker", "serve", "--upstream", "r=127.0.0.1:1"],
        capture_output=True,
        text=True,
        cwd=blocked,
        env=env,
        timeout=60,
    )
    assert command.returncode == 2 and 'pip install "poolbroker[broker]"' in command.stderr, command.stderr
    assert "Traceback" not in command.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_systemd_units_verify(tmp_path: Path) -> None:
    """systemd's own check of the broker's and the workers' units (their programs pointed at this
    environment's, which exist)."""
    bin_dir = str(Path(sys.executable).parent)
    units = []
    for name in ("poolbroker.service", "gunicorn.service"):
        unit = tmp_path / name
        unit.write_text((ROOT / "examples" / name).read_text().replace("/opt/app/.venv/bin", bin_dir))
        units.append(str(unit))
    result = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not [line for line in result.stderr.splitlines() if "service" in line], result.stderr


def test_the_supervisord_recipe_runs_the_broker_and_the_app(tmp_path: Path, own_redis: RedisServer) -> None:
    """examples/supervisord.conf under a real supervisord, its paths, user and port made this
    test's: the broker starts before the app, the app counts hits through it, HUP reloads, and a
    stop ends both cleanly."""
    here = short_tempdir()
    endpoint, port = f"ipc://{here}/run/broker.sock", free_port()
    (tmp_path / "broker.toml").write_text(
        f'[pools.redis]\nupstream = "{own_redis.address}"\nprotocol = "redis"\nmax_size = 2\n'
    )
    recipe = (ROOT / "examples" / "supervisord.conf").read_text()
    for theirs, ours in [
        ("/opt/app/.venv/bin", str(Path(sys.executable).parent)),
        ("/etc/poolbroker/broker.toml", str(tmp_path / "broker.toml")),
        ("ipc:///run/poolbroker/broker.sock", endpoint),
        ("--workers 8 --bind 127.0.0.1:8000 app:app", f"--workers 2 --bind 127.0.0.1:{port} examples.gunicorn_app:app"),
        ("directory=/opt/app", f"directory={ROOT}"),
        ("user=app", f"user={os.environ.get('USER') or 'root'}"),
        ("/var/log/", f"{tmp_path}/"),
    ]:
        assert theirs in recipe, theirs
        recipe = recipe.replace(theirs, ours)
    (tmp_path / "programs.conf").write_text(recipe)
    conf = tmp_path / "supervisord.conf"
    conf.write_text(
        f"[unix_http_server]\nfile={here}/supervisor.sock\n\n"
        f"[supervisord]\nnodaemon=true\nlogfile={tmp_path}/supervisord.log\npidfile={tmp_path}/supervisord.pid\n\n"
        "[rpcinterface:supervisor]\n"
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n"
        f"[supervisorctl]\nserverurl=unix://{here}/supervisor.sock\n\n"
        f"[include]\nfiles={tmp_path}/programs.conf\n"
    )
    bin_dir = Path(sys.executable).parent

    def ctl(*args: str) -> str:
        result = subprocess.run(
            [str(bin_dir / "supervisorctl"), "-c", str(conf), *args], capture_output=True, text=True, timeout=60
        )
        return result.stdout

    supervisord = subprocess.Popen([str(bin_dir / "supervisord"), "-c", str(conf)], cwd=tmp_path)
    try:
        wait_for(lambda: ctl("status").count("RUNNING") == 2, timeout=60, what="both programs to run")
        ping = [str(bin_dir / "poolbroker"), "ping", "--endpoint", endpoint]
        assert subprocess.run(ping, capture_output=True, timeout=30).returncode == 0
        wait_for(lambda: status(f"http://127.0.0.1:{port}/hit") == 200, timeout=60, what="the app to answer")
        hits = [get(f"http://127.0.0.1:{port}/hit") for _ in range(3)]
        assert [int(hit.split()[1]) for hit in hits] == [2, 3, 4]  # (after the first, which waited)
        broker_log = tmp_path / "poolbroker.log"
        ctl("signal", "HUP", "poolbroker")
        wait_for(lambda: "reloaded" in broker_log.read_text(), timeout=30, what="the broker to reload")
        ctl("stop", "all")
        assert ctl("status").count("STOPPED") == 2
        assert "Traceback" not in broker_log.read_text()
        assert own_redis.broker_connections() == 0  # (the broker closed its connections on the way out)
    finally:
        ctl("shutdown")
        try:
            supervisord.wait(30)
        except subprocess.TimeoutExpired:
            supervisord.kill()
            supervisord.wait()
