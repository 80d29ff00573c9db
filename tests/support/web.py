"""gunicorn, run for real, and what its tests ask of it over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.processes import ROOT, free_port, wait_for


@contextmanager
def gunicorn(app: str, endpoint: str, log_dir: Path, *flags: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """gunicorn serving `app` (an examples module) with POOLBROKER_ENDPOINT=`endpoint` and the
    given flags, until it answers (404 on /); its URL and its master process. Stopped after."""
    port = free_port()
    log = open(log_dir / "gunicorn.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", *flags, app],
        cwd=ROOT,
        env={**os.environ, "POOLBROKER_ENDPOINT": endpoint, "PYTHONPATH": str(ROOT)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: status(url + "/") == 404, timeout=30, what="gunicorn to answer")
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def status(url: str) -> int | None:
    """An HTTP GET's status (None when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return str(response.read().decode())
