"""redis-py's own test suite, run directly and through poolbroker's adapters, compared test by test.

Run by ./scripts/client-suites (which makes .venv-suites from uv.lock). For the redis-py release
installed there, it downloads that release's source (its tests/), then for each flavour (sync,
asyncio) runs the files that exercise commands over connections twice, each on a fresh Redis: once
directly, once with every ConnectionPool the suite builds swapped for a poolbroker one on a broker
in front of that Redis (scripts/redis_py_route.py). A test that passes directly and fails through
the broker is either one of EXPECTED, each with the reason a shared pool makes it so, or a bug.
Exit status 1 when there is one.

The files left out test what poolbroker replaces or does not serve: redis-py's own connection
pools, connection and retry internals, cluster, sentinel, client-side caching, module commands.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "client-suites"
FILES = ["test_commands.py", "test_pipeline.py", "test_pubsub.py", "test_lock.py", "test_scripting.py"]
FILES += ["test_encoding.py", "test_monitor.py"]
FLAVOURS = {"sync": [f"tests/{name}" for name in FILES], "asyncio": [f"tests/test_asyncio/{name}" for name in FILES]}

# Tests not run through the broker: each changes the server under every connection of the pool.
DESELECTED = {
    "test_auth": "sets the server's password (CONFIG SET requirepass): the broker's new connections"
    " then can't log in, and every later test fails with them",
}
# Tests that pass directly and fail through the broker, by name (any parameters), and why.
EXPECTED = {
    "test_client_setname": "a per-connection CLIENT SETNAME: the pool's reset undoes it, and the next"
    " command may run on another connection",
    "test_client_list_after_client_setname": "as test_client_setname",
    "test_client_info_name_with_equals": "as test_client_setname",
    "test_client_kill": "kills the connection it named with CLIENT SETNAME: as test_client_setname",
    "test_client_kill_filter_by_id": "kills by the id of the connection it ran CLIENT ID on: the next command"
    " runs on another",
    "test_client_kill_filter_by_addr": "as test_client_kill_filter_by_id, by address",
    "test_client_kill_filter_by_user": "a client with its own username: logging in is the broker pool's"
    " (refused per lease, with a message naming the pool's setting)",
    "test_failed_entry_releases_connection": "a client with its own username: as test_client_kill_filter_by_user",
    "test_copy_to_another_database": "a client on db 1: the database is the broker pool's (refused per lease)",
    "test_channel_subscribe": "expects a connection error from a server that is down (port 6390); the plugin"
    " routes every pool, that one too, to the broker's pool of the live server",
}


POOL = 'upstream = "127.0.0.1:{port}"\nprotocol = "redis"\nmax_size = 8\n'
RESP = {"redis": "", "redis3": "resp = 3\n"}  # (redis_py_route.py picks by the client's protocol)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(ready: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise SystemExit(f"client-suites: {what} did not come up within {timeout}s")
        time.sleep(0.05)


def redis_py_tests(version: str) -> Path:
    """redis-py's tests/ for `version`, from its source release (downloaded once, kept in .cache)."""
    home = CACHE / f"redis-{version}"
    if not (home / "tests").is_dir():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as download:
            pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
            subprocess.run([*pip, "-d", download, f"redis=={version}"], check=True)
            (sdist,) = Path(download).glob("redis-*.tar.gz")
            with tarfile.open(sdist) as tar:
                tar.extractall(CACHE, filter="data")
    return home


class Servers:
    """A fresh Redis on a free port, and with `broker`, a poolbroker in front of it."""

    def __init__(self, broker: bool) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="client-suite-"))  # (mode 700: fit for a broker socket)
        redis_args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        redis_args += ["--appendonly", "no", "--dir", str(self.dir), "--enable-debug-command", "yes"]
        self.redis = subprocess.Popen([*redis_args, "--loglevel", "warning"], stdout=subprocess.DEVNULL)
        wait_until(self._redis_answers, "redis-server")
        self.endpoint = f"ipc://{self.dir}/broker.sock"
        self.broker = None
        if broker:  # two pools in front of it: RESP2 and RESP3 (a pool speaks one; the tests use both)
            pools = "".join(f"[pools.{name}]\n{POOL.format(port=self.port)}{resp}\n" for name, resp in RESP.items())
            (self.dir / "broker.toml").write_text(f'[broker]\nbind = "{self.endpoint}"\n\n{pools}')
            serve = [sys.executable, "-m", "poolbroker", "serve", "--config", str(self.dir / "broker.toml")]
            self.log = open(self.dir / "broker.log", "wb")  # noqa: SIM115 (closed in stop)
            self.broker = subprocess.Popen(serve, stdout=self.log, stderr=subprocess.STDOUT)
            wait_until(lambda: (self.dir / "broker.sock").exists(), "the broker")

    def _redis_answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        for process in (self.broker, self.redis):
            if process is not None:
                process.terminate()
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
        if self.broker is not None:
            self.log.close()


def outcomes(junit: Path) -> dict[str, str]:
    """Each test's outcome (passed, failed, error, skipped) from a JUnit XML report."""
    results = {}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        kinds = {child.tag for child in case} & {"failure", "error", "skipped"}
        outcome = "failed" if "failure" in kinds else "error" if "error" in kinds else "skipped" if kinds else "passed"
        test = f"{case.get('classname')}::{case.get('name')}"
        results[test] = "failed" if results.get(test) in ("failed", "error") else outcome  # (teardown errors)
    return results


def run(home: Path, flavour: str, through_broker: bool, extra: list[str]) -> dict[str, str]:
    servers = Servers(through_broker)
    junit = servers.dir / "junit.xml"
    argv = [sys.executable, "-m", "pytest", *FLAVOURS[flavour], f"--redis-url=redis://127.0.0.1:{servers.port}/0"]
    argv += ["-q", "-p", "no:cacheprovider", "-p", "no:warnings", "--timeout=90", f"--junitxml={junit}"]
    argv += ["-o", "addopts=", "-o", "junit_family=xunit1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "scripts"), PB_ENDPOINT=servers.endpoint)
    if through_broker:
        argv += ["-p", "redis_py_route", *(f"--deselect={t}" for t in deselected(home, flavour))]
    output = CACHE / f"{flavour}-{'broker' if through_broker else 'direct'}.txt"  # (each failure's story)
    try:
        with open(output, "w") as out:
            subprocess.run([*argv, *extra], cwd=home, env=env, timeout=1200, stdout=out, stderr=subprocess.STDOUT)
        if not junit.exists():
            raise SystemExit(f"client-suites: pytest wrote no report; its output is in {output}")
        return outcomes(junit)
    finally:
        servers.stop()
        shutil.rmtree(servers.dir, ignore_errors=True)


def deselected(home: Path, flavour: str) -> list[str]:
    found = subprocess.run(
        [sys.executable, "-m", "pytest", *FLAVOURS[flavour], "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=home,
        capture_output=True,
        text=True,
    ).stdout.split()
    return [test for test in found if test.split("::")[-1].split("[")[0] in DESELECTED]


def name_of(test: str) -> str:
    return test.split("::")[-1].split("[")[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("flavours", nargs="*", metavar="sync|asyncio", help="the flavours to run (default: both)")
    parser.add_argument("--pytest", default="", help="more pytest arguments for every run, e.g. '-k pubsub'")
    args = parser.parse_args()
    flavours = args.flavours or list(FLAVOURS)
    if not set(flavours) <= set(FLAVOURS):
        parser.error(f"flavours are {' and '.join(FLAVOURS)}")
    version = importlib.metadata.version("redis")
    home = redis_py_tests(version)
    shutil.copy(ROOT / "scripts" / "redis_py_route.py", home / "redis_py_route.py")
    print(f"redis-py {version}'s own suite ({', '.join(FILES)}), Redis {redis_version()}:")
    unexpected = 0
    for flavour in flavours:
        direct = run(home, flavour, False, shlex.split(args.pytest))
        routed = run(home, flavour, True, shlex.split(args.pytest))
        count = {kind: [sum(1 for o in r.values() if o == kind) for r in (direct, routed)] for kind in direct.values()}
        figures = ", ".join(f"{kind} {a} / {b}" for kind, (a, b) in sorted(count.items()))
        print(f"\n{flavour}: directly / through the broker: {figures}")
        lost = sorted(t for t, o in direct.items() if o == "passed" and routed.get(t, "deselected") != "passed")
        for test in lost:
            reason = DESELECTED.get(name_of(test)) or EXPECTED.get(name_of(test))
            unexpected += reason is None
            print(f"  {routed.get(test, 'deselected'):10} {test}\n             {reason or 'NOT EXPECTED: a bug'}")
    print(f"\n{unexpected} unexpected" if unexpected else "\nevery difference is an expected one")
    print(f"(pytest's output of each run: {CACHE}/FLAVOUR-direct.txt and FLAVOUR-broker.txt)")
    return 1 if unexpected else 0


def redis_version() -> str:
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    return next((word[2:] for word in out.split() if word.startswith("v=")), out.strip())


if __name__ == "__main__":
    sys.exit(main())
