"""A real broker process (`python -m poolbroker serve`) on a private ipc endpoint."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from typing import Any

from tests.support.processes import ROOT, short_tempdir, wait_for


class Broker:
    """A real broker process (`python -m poolbroker serve`) on a private ipc endpoint."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        endpoint: str | None = None,
        log_level: str = "debug",
        client_options: dict[str, Any] | None = None,
    ) -> None:
        self.client_options = client_options or {}  # what a Client needs to reach it (CURVE keys)
        self.dir = short_tempdir()
        self.log_level = log_level
        self.endpoint = endpoint or f"ipc://{self.dir}/broker.sock"
        self.log_path = self.dir / "broker.log"
        self.args = args
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> Broker:
        argv = [
            sys.executable,
            "-m",
            "poolbroker",
            "serve",
            "--bind",
            self.endpoint,
            "--log-level",
            self.log_level,
            *self.args,
        ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        if wait:
            wait_for(self.ready, what="the broker to answer ping")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def ready(self) -> bool:
        from poolbroker import Client

        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"broker exited with {self.proc.returncode}:\n{self.log()}")
        client = Client(self.endpoint, broker_timeout=0.2, **self.client_options)
        try:
            return broker_answers(client)
        finally:
            client.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def dump_stack(self) -> bool:
        """`kill -USR1`: the broker writes every thread's stack to its log (faulthandler). True once
        the dump is there (within 5 s)."""
        assert self.proc is not None
        dumps = self.log().count("most recent call first")
        self.proc.send_signal(signal.SIGUSR1)
        try:
            wait_for(lambda: self.log().count("most recent call first") > dumps, timeout=5, what="the stack dump")
        except AssertionError:
            return False
        return True

    def signal(self, signum: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(signum)
        return self.proc.wait(15)

    def stop(self) -> None:
        """SIGTERM, and fail loudly (with a stack dump in the log) if it does not end in time."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.dump_stack()  # where is it stuck?
                    self.proc.kill()
                    self.proc.wait()
                    raise AssertionError(f"the broker ignored SIGTERM for 10 s:\n{self.log()}") from None
        finally:
            if hasattr(self, "_log"):
                self._log.close()
            shutil.rmtree(self.dir, ignore_errors=True)


def broker_answers(client: Any) -> bool:
    """Does the broker answer this client's ping (within the client's broker_timeout)?"""
    from poolbroker import BrokerUnavailable

    try:
        client.ping()
        return True
    except BrokerUnavailable:
        return False
