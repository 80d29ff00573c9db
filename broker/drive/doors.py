"""The doors drive/'s helpers go through: small interfaces, each naming only what its user needs
of the loop it runs in (the Server is the one that has them all). A helper given a door can't
reach past it, so a second way to hand out leases (beside the ZeroMQ one) plugs in by providing
the same doors; the decisions behind them never change."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from poolbroker.broker.drive.pools import PoolState
    from poolbroker.broker.drive.resolver import Resolver
    from poolbroker.broker.drive.tables import DriveExchange, DriveLease, DriveLeaseTable
    from poolbroker.broker.drive.timers import Timers
    from poolbroker.broker.drive.upstream import UpstreamConn
    from poolbroker.broker.settings import BrokerConfig
    from poolbroker.wire.protocol import ErrorCode


class Loop(Protocol):
    """What every helper needs: the settings (replaced on reload), the timers, and the one place
    a pool core's actions are carried out, in order."""

    @property
    def config(self) -> BrokerConfig: ...

    @property
    def timers(self) -> Timers: ...

    def carry_out(self, pool: PoolState, actions: list[Any], now: float) -> None: ...  # (a pool core's actions)


class Connections(Protocol):
    """What leasing asks of the upstream connections' driver."""

    def watch(self, conn: UpstreamConn) -> None: ...  # poll it for what its state needs now

    def run_reset(self, conn: UpstreamConn, now: float) -> None: ...  # reset it; it rejoins the pool after


class Exchanges(Protocol):
    """What the upstream connections' driver asks of leasing: move a leased connection's exchange on."""

    def advance(self, exchange: DriveExchange, now: float) -> None: ...

    def finish_error(self, exchange: DriveExchange, code: ErrorCode, message: str, now: float) -> None: ...


class Poller(Protocol):
    """epoll's registration calls: the loop waits on what is registered."""

    def register(self, fd: int, eventmask: int = ...) -> None: ...

    def modify(self, fd: int, eventmask: int) -> None: ...

    def unregister(self, fd: int) -> None: ...


class LeasingDoors(Loop, Protocol):
    """Leasing's: the tables, the pools by name, replies to holders, and the connections' driver."""

    @property
    def table(self) -> DriveLeaseTable: ...

    @property
    def pools(self) -> dict[str, PoolState]: ...

    @property
    def upstreams(self) -> Connections: ...

    def reply(self, peer: bytes, reply: dict[str, Any]) -> bool: ...  # False: the peer is gone

    def lend(self, peer: bytes, grant: dict[str, Any], conn: UpstreamConn) -> bool: ...  # the grant, with its socket


class UpstreamDoors(Loop, Protocol):
    """The upstream connections' driver's: the poller, the name resolver, and leasing's exchanges."""

    @property
    def epoll(self) -> Poller: ...

    @property
    def resolver(self) -> Resolver[UpstreamConn]: ...

    @property
    def leasing(self) -> Exchanges: ...


T = TypeVar("T")


class Ending(Protocol):
    """What the cluster agent asks of leasing: end a lease (over a share that was lost)."""

    def end_lease(self, lease: DriveLease, now: float, *, keep: bool, reason: str | None = None) -> None: ...


class ClusterDoors(Loop, Protocol):
    """The cluster agent's, from its own thread: the pools, and a call into the loop (every use of
    a pool's state goes through it, but reading a count)."""

    @property
    def pools(self) -> dict[str, PoolState]: ...

    @property
    def leasing(self) -> Ending: ...

    def call_soon_threadsafe(self, call: Callable[[float], T]) -> Future[T]: ...
