"""The README's quick start, run as written: its broker command, its app, and its checks (with this
test's own Redis, socket and port in place of the README's)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT, RedisServer, free_port, short_tempdir, wait_for


def quick_start() -> list[str]:
    """The fenced blocks of the README's "Quick start" section, in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```[a-z]*\n(.*?)```", section, flags=re.S)


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for proc in processes:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_readme_quick_start_runs_as_written(own_redis: RedisServer, started: list[subprocess.Popen[bytes]]) -> None:
    serve, app, checks = quick_start()
    here = short_tempdir()
    port = free_port()
    python = sys.executable

    def ours(command: str) -> str:
        command = command.replace("127.0.0.1:6379", own_redis.address)
        command = command.replace("ipc:///tmp/", f"ipc://{here}/tmp/")  # (a /tmp of its own, as open as /tmp)
        command = command.replace("localhost:8000", f"127.0.0.1:{port}")
        command = re.sub(r"(^|\s)gunicorn ", rf"\1{python} -m gunicorn -b 127.0.0.1:{port} ", command)
        return re.sub(r"(^|\s)poolbroker ", rf"\1{python} -m poolbroker ", command)

    def shell(command: str, background: bool = False) -> subprocess.CompletedProcess[str] | None:
        if background:
            log = open(here / f"{len(started)}.log", "wb")  # noqa: SIM115 - the process holds it
            started.append(
                subprocess.Popen(["bash", "-c", f"exec env {ours(command)}"], cwd=here, stdout=log, stderr=log)
            )
            return None
        return subprocess.run(["bash", "-c", ours(command)], cwd=here, capture_output=True, text=True, timeout=60)

    (here / "tmp").mkdir()
    (here / "tmp").chmod(0o1777)  # (so a socket the README put straight in /tmp is refused here as there)
    (here / "app.py").write_text(app)
    shell(serve.replace("\\\n", " ").strip(), background=True)
    wait_for(
        lambda: (here / "tmp" / "poolbroker-quickstart" / "broker.sock").exists(),
        timeout=30,
        what="the broker to listen",
    )
    gunicorn, curls, stats = [line for line in checks.splitlines() if line.strip()]
    shell(gunicorn, background=True)
    wait_for(
        lambda: Path("/proc/net/tcp").read_text().find(f":{port:04X} ") >= 0, timeout=30, what="gunicorn to listen"
    )
    counted = shell(curls.split("#")[0])
    assert counted is not None and counted.stdout.split() == ["1", "2"], counted
    peak = shell(stats)
    assert peak is not None and peak.returncode == 0, peak
    [value] = re.findall(r"pool_peak\s+(\d+)", peak.stdout)
    assert 1 <= int(value) <= 4  # (the bound the README's broker command sets)
