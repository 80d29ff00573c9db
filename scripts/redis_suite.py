"""redis-py's own test suite, for scripts/client_suites.py: the files that exercise commands over
connections, sync and asyncio, directly and with every ConnectionPool the suite builds swapped for a
poolbroker one (scripts/redis_py_route.py) on a broker with a RESP2 and a RESP3 pool in front of the
same Redis. The tests come from the source release of the redis-py that uv.lock installs.

The files left out test what poolbroker replaces or does not serve: redis-py's own connection
pools, connection and retry internals, cluster, sentinel, client-side caching, module commands.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from client_suites import CACHE, ROOT, free_port, start_broker, stop_process, wait_until

FILES = ["test_commands.py", "test_pipeline.py", "test_pubsub.py", "test_lock.py", "test_scripting.py"]
FILES += ["test_encoding.py", "test_monitor.py"]
VARIANTS = {"sync": [f"tests/{name}" for name in FILES], "asyncio": [f"tests/test_asyncio/{name}" for name in FILES]}

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
VERSION = importlib.metadata.version("redis")


def title() -> str:
    return f"redis-py {VERSION}'s own suite ({', '.join(FILES)}), {subprocess.getoutput('redis-server --version')}:"


def prepare() -> Path:
    """redis-py's tests/ for the installed version, from its source release (downloaded once, kept
    in .cache), with the routing plugin beside them."""
    home = CACHE / f"redis-{VERSION}"
    if not (home / "tests").is_dir():
        with tempfile.TemporaryDirectory() as download:
            pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
            subprocess.run([*pip, "-d", download, f"redis=={VERSION}"], check=True)
            (sdist,) = Path(download).glob("redis-*.tar.gz")
            with tarfile.open(sdist) as tar:
                tar.extractall(CACHE, filter="data")
    shutil.copy(ROOT / "scripts" / "redis_py_route.py", home / "redis_py_route.py")
    return home


class Servers:
    """A fresh Redis on a free port, and with `broker`, a poolbroker in front of it."""

    def __init__(self, broker: bool) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="client-suite-"))
        redis_args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        redis_args += ["--appendonly", "no", "--dir", str(self.dir), "--enable-debug-command", "yes"]
        self.redis = subprocess.Popen([*redis_args, "--loglevel", "warning"], stdout=subprocess.DEVNULL)
        wait_until(self._redis_answers, "redis-server")
        self.broker = self.log = None
        if broker:  # two pools in front of it: RESP2 and RESP3 (a pool speaks one; the tests use both)
            pools = "".join(f"[pools.{name}]\n{POOL.format(port=self.port)}{resp}\n" for name, resp in RESP.items())
            self.endpoint, self.broker, self.log = start_broker(self.dir, pools)

    def _redis_answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        stop_process(self.broker)
        stop_process(self.redis)
        if self.log is not None:
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def direct_twin(variant: str) -> str:
    return variant


def servers(variant: str, through_broker: bool) -> Servers:
    return Servers(through_broker)


def argv(variant: str, servers: Servers, through_broker: bool) -> tuple[list[str], dict[str, str]]:
    args = [*VARIANTS[variant], "-p", "no:warnings", f"--redis-url=redis://127.0.0.1:{servers.port}/0"]
    if through_broker:
        return [*args, "-p", "redis_py_route"], {"PB_ENDPOINT": servers.endpoint}
    return args, {}
