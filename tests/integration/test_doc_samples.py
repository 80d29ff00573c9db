"""Every code sample of the README and docs/ runs as written, so none can rot:

- each Python block runs in a process of its own against a real broker, whose pools are the ones
  the samples use (`redis`, `cache`, `db`, `api`) in front of a real Redis, memcached, PostgreSQL
  (in transaction mode, as the PostgreSQL guide's sample sets it) and HTTP server; a block with
  top-level `await` runs in an event loop, and one that defines `test_` functions runs under
  pytest with the plugin;
- each TOML block loads as a broker config, as `poolbroker serve --config` would load it;
- each `poolbroker` command line parses with the command's own parser.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from poolbroker.broker.config import ConfigError, load
from poolbroker.broker.operate.cli import build_parser
from tests.support import ROOT, Broker, MemcachedServer, PostgresServer, RedisServer, short_tempdir
from tests.support.upstreams import HttpUpstream

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def fenced_blocks() -> Iterator[tuple[str, str, str]]:
    """Every fenced block of the pages: its language, where it is (PAGE:LINE), and its text."""
    for page in PAGES:
        text = page.read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            yield match.group(1), f"{page.relative_to(ROOT)}:{line}", match.group(2)


def samples(language: str) -> list[pytest.param]:
    """Every fenced block of `language` in the pages, as test parameters named PAGE:LINE."""
    return [pytest.param(text, id=where) for kind, where, text in fenced_blocks() if kind == language]


def command_lines() -> list[pytest.param]:
    """The concrete `poolbroker` command lines of the pages' shell blocks (a synopsis, with `...`,
    `[optional]`, `a|b` or a placeholder such as `NAME`, is not one), continuation lines joined."""
    found = []
    for kind, where, text in fenced_blocks():
        if kind in ("", "sh", "bash", "console"):
            for line in text.replace("\\\n", " ").splitlines():
                command = re.split(r"  #| \| |; ", line)[0].strip()  # (the command, not what it pipes to)
                words = shlex.split(command) if command and not re.search(r"\.\.\.|\[|\||<", command) else []
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # (VAR=value before it)
                    words.pop(0)
                if words[:3] == ["python", "-m", "poolbroker"]:
                    words = words[2:]
                if (
                    words
                    and words[0].split("/")[-1] == "poolbroker"
                    and not any(re.fullmatch(r"[A-Z]+", w) for w in words)
                ):
                    found.append(pytest.param(words[1:], id=f"{where.split(':')[0]}: {command[:60]}"))
    return found


# -- the servers and broker every Python sample runs against --------------------------------------


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    redis, memcached, http, postgres = RedisServer().start(), MemcachedServer(), HttpUpstream(), PostgresServer()
    config = short_tempdir() / "broker.toml"
    config.write_text(
        textwrap.dedent(f"""
            [pools.redis]
            upstream = "{redis.address}"
            protocol = "redis"
            max_size = 4
            [pools.cache]
            upstream = "{memcached.address}"
            protocol = "memcached"
            [pools.api]
            upstream = "{http.address}"
            protocol = "http"
            probe_send = "HEAD /health HTTP/1.1"
            [pools.db]
            upstream = "{postgres.address}"
            protocol = "postgres"
            username = "{postgres.user}"
            password_env = "DOC_SAMPLES_PG_PASSWORD"
            database = "postgres"
            pool_mode = "transaction"
            max_size = 4
            """)
    )
    env = {**os.environ, "DOC_SAMPLES_PG_PASSWORD": postgres.password}
    started = Broker("--config", str(config), env=env).start()
    yield started
    started.stop()
    for server in (redis, memcached, http, postgres):
        server.stop()


def has_top_level_await(source: str) -> bool:
    try:
        compile(source, "sample", "exec")
    except SyntaxError as exc:
        return "outside" in str(exc.msg)  # ('await' or 'async with' outside an async function)
    return False


@pytest.mark.parametrize("source", samples("python"))
def test_every_python_sample_runs(source: str, broker: Broker, tmp_path: Path) -> None:
    env = {**os.environ, "POOLBROKER_ENDPOINT": broker.endpoint}
    if "def test_" in source:
        (tmp_path / "test_sample.py").write_text(source)
        # (under pytest with the plugin, which starts a broker of its own from the same config)
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_sample.py"]
        argv += ["--poolbroker-config", broker.args[broker.args.index("--config") + 1]]
        env.update(broker.env or {})
    else:
        if has_top_level_await(source):
            body = textwrap.indent(source, "    ")
            source = f"import asyncio\n\n\nasync def main():\n{body}\n\nasyncio.run(main())\n"
        (tmp_path / "sample.py").write_text(source)
        argv = [sys.executable, "sample.py"]
    result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "skipped" not in result.stdout, result.stdout  # (a test sample's tests all ran)


@pytest.mark.parametrize("source", samples("toml"))
def test_every_toml_sample_loads_as_a_config(source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in re.findall(r'password_env = "(\w+)"', source):
        monkeypatch.setenv(name, "a password")  # (the sample names a variable its reader would set)
    for name in re.findall(r'password_file = "([^"]+)"', source):  # (and a file they would write)
        (tmp_path / "password").write_text("a password\n")
        source = source.replace(name, str(tmp_path / "password"))
    if "[pools." not in source and "[broker]" not in source:  # (a table's lines alone)
        source = '[pools.sample]\nupstream = "127.0.0.1:6379"\n' + source
    path = tmp_path / "sample.toml"
    path.write_text(source)
    try:
        load(path)
    except ConfigError as exc:
        pytest.fail(f"the sample does not load: {exc}")


@pytest.mark.parametrize("words", command_lines())
def test_every_command_line_parses(words: list[str]) -> None:
    try:
        build_parser().parse_args(words)
    except SystemExit as exc:
        pytest.fail(f"poolbroker {' '.join(words)}: the command refuses it (exit {exc.code})")
