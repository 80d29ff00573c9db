"""etcd from Debian's etcd-server, on free loopback ports: one member (`EtcdServer`), or a cluster
of three (`EtcdCluster`) whose members can be killed and brought back, for the fault tests."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path

from tests.support.processes import free_port, short_tempdir, wait_for

# Elections within a second (the defaults: a heartbeat of 100 ms, elections after 1 s): a killed
# leader is replaced fast enough for a test to see the brokers carry on.
TIMING = ("--heartbeat-interval", "50", "--election-timeout", "500")


class EtcdMember:
    """One etcd process of a cluster; stop() and start() keep its ports and its data."""

    def __init__(self, name: str, data: Path) -> None:
        self.name = name
        self.client_port = free_port()
        self.peer_port = free_port()
        self.data = data
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self, initial_cluster: str, state: str = "new") -> None:
        exe = shutil.which("etcd")
        if exe is None:
            raise RuntimeError("etcd is not installed (./scripts/test installs Debian's etcd-server)")
        argv = [
            exe,
            *("--name", self.name, "--data-dir", str(self.data)),
            *("--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint),
            *("--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url),
            *("--initial-cluster", initial_cluster, "--initial-cluster-state", state),
            *("--initial-cluster-token", "poolbroker-tests", "--log-level", "error", "--logger", "zap"),
            *TIMING,
        ]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1) as answer:
                return bool(json.load(answer).get("health") == "true")
        except (OSError, ValueError):
            return False

    def is_leader(self) -> bool:
        request = urllib.request.Request(f"{self.endpoint}/v3/maintenance/status", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=1) as answer:
                status = json.load(answer)
        except (OSError, ValueError):
            return False
        return bool(status.get("leader") and status.get("leader") == status.get("header", {}).get("member_id"))

    def kill(self) -> None:
        """SIGKILL: no goodbye to the cluster."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None


class EtcdCluster:
    """`size` etcd members on loopback, started together; `endpoints` is what a broker's
    `[cluster] etcd` lists."""

    def __init__(self, size: int = 1) -> None:
        self.dir = short_tempdir()
        self.members = [EtcdMember(f"m{i}", self.dir / f"m{i}") for i in range(size)]
        self.initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def start(self) -> EtcdCluster:
        for member in self.members:
            member.start(self.initial_cluster)
        wait_for(lambda: all(m.healthy() for m in self.members), timeout=30, what="etcd to be healthy")
        return self

    def restart(self, *members: EtcdMember) -> None:
        """Bring stopped or killed members back, with their data (they rejoin as they were;
        together, when a quorum of them must be back before any answers)."""
        for member in members:
            member.start(self.initial_cluster, state="existing")
        wait_for(lambda: all(m.healthy() for m in members), timeout=30, what="etcd members back")

    def leader(self) -> EtcdMember:
        return wait_for(
            lambda: next((m for m in self.members if m.proc is not None and m.is_leader()), None),
            timeout=30,
            what="an etcd leader",
        )

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def stop(self) -> None:
        for member in self.members:
            member.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class EtcdServer(EtcdCluster):
    """A single-member etcd: most tests need no more."""

    def __init__(self) -> None:
        super().__init__(size=1)

    @property
    def endpoint(self) -> str:
        return self.members[0].endpoint
