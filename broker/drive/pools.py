"""A pool as the broker sees it: its config, its pure core, its probe, its protocol, where its
upstream is and how to speak TLS to it."""

from __future__ import annotations

import ssl
from collections import deque
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from poolbroker.broker.decide.checks import Check
from poolbroker.broker.decide.lease_rules import LeaseClock
from poolbroker.broker.decide.pool import PoolCore
from poolbroker.broker.decide.probes import ProbeSpec, probe_spec
from poolbroker.broker.decide.protocols import pool_protocol
from poolbroker.broker.drive import tls
from poolbroker.broker.drive.resolver import AddrInfo, numeric_address
from poolbroker.broker.settings import PoolConfig
from poolbroker.wire.protocol import ErrorCode, Request, error_reply

if TYPE_CHECKING:
    from poolbroker.broker.drive.tables import DriveLease, DriveWaiter
    from poolbroker.broker.drive.timers import Timer
    from poolbroker.broker.drive.upstream import UpstreamConn

TLS_KEYS = ("tls", "tls_ca_file", "tls_server_name", "tls_cert_file", "tls_key_file")


class PoolState:
    """A pool as the server sees it: its config, its pure core (and the upstream's health), its probe."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.core: PoolCore[UpstreamConn, DriveWaiter] = PoolCore(config)
        self.probe: ProbeSpec | None = probe_spec(config)  # None: the tcp check, done at once
        self.protocol = pool_protocol(config)  # its handshake, its reset, what a holder leaves
        self.address: AddrInfo | None = numeric_address(config.host, config.port)  # None: look it up
        self.tls: ssl.SSLContext | None = tls.client_context(config)  # raises ConfigError
        self.server_parameters: dict[str, str] = {}  # postgres: what the last login's server announced
        self.leases: LeaseClock[DriveLease] = LeaseClock()  # its leases, as their time limits fall due
        self.lease_timer: Timer | None = None  # the next look at them
        # Fences to run on its next probed connection ([cluster]: the agent waits on each Future).
        self.fences: deque[tuple[Check, Future[int]]] = deque()
        self.cluster: dict[str, int] = {}  # [cluster]: its share of the budget, as the agent last saw it

    def __repr__(self) -> str:
        return repr(self.core).replace("PoolCore", "Pool", 1)

    def reconfigure(self, config: PoolConfig, now: float) -> list[Any]:
        """New settings, live. A new upstream address drains the connections to the old one."""
        moved = (config.host, config.port) != (self.config.host, self.config.port)
        moved = moved or any(
            getattr(self.config, key) != getattr(config, key) for key in TLS_KEYS
        )  # another TLS: new connections
        self.tls = tls.client_context(config)
        self.config = config
        self.probe = probe_spec(config)
        self.protocol = pool_protocol(config)
        actions = self.core.reconfigure(config, now)
        if moved:
            self.address = numeric_address(config.host, config.port)
            actions += self.core.drain(now)
        return actions


def unknown_pool(pools: dict[str, PoolState], req: Request) -> dict[str, Any]:
    """The error reply to a request that names a pool this broker does not have."""
    known = ", ".join(sorted(pools)) or "none"
    return error_reply(req.id, ErrorCode.UNKNOWN_POOL, f"no pool named {req.pool!r} (pools: {known})")
