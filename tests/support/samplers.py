"""Samplers of an upstream's connection count (a bound must hold at every sample, not just at the end)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path


def upstream_connections(port: int, pid: int) -> int:
    """TCP sockets the process `pid` (a broker) holds to a loopback server's `port`, as the kernel
    holds them (/proc/net/tcp and tcp6, by inode): each counts from its creation, connecting or
    connected, until the broker closes it, whatever the broker's own counters say. So a pool that
    opened a replacement before closing the old connection, or forgot to close one, shows here.
    (The server's side lags: it may still hold a connection whose close it has not yet seen.)"""
    owned = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            owned.add(target[8:-1])
    # By (local, remote) address: the kernel writes these tables a page at a time, and a socket may
    # appear twice when others come and go between two pages.
    connections = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[9] in owned and int(fields[2].rsplit(":", 1)[1], 16) == port:
                connections.add((fields[1], fields[2]))
    return len(connections)


class PeakSampler:
    """Samples `count()` every few milliseconds until stopped: `peak` is the most seen, `samples`
    how many were taken."""

    def __init__(self, count: Callable[[], int], every: float = 0.003) -> None:
        self.count = count
        self.peak = 0
        self.samples = 0
        self._every = every
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self._sample()  # one at the end, whatever the thread managed meanwhile

    def _run(self) -> None:
        while not self._done.is_set():
            self._sample()
            self._done.wait(self._every)

    def _sample(self) -> None:
        self.peak = max(self.peak, self.count())
        self.samples += 1


class BoundSampler(PeakSampler):
    """Samples the sockets the broker process `pid` holds to `port` (upstream_connections)."""

    def __init__(self, port: int, pid: int, every: float = 0.003) -> None:
        super().__init__(lambda: upstream_connections(port, pid), every)
        self.port = port
        self.pid = pid
