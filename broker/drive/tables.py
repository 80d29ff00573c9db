"""The pure tables' types as the driver fills them: its pools, upstream connections and timers
(decide/leases.py and decide/exchange.py hold them without knowing them)."""

from __future__ import annotations

from typing import TypeAlias

from poolbroker.broker.decide.exchange import Exchange
from poolbroker.broker.decide.leases import Holder, Lease, LeaseTable, Waiter
from poolbroker.broker.drive.pools import PoolState
from poolbroker.broker.drive.timers import Timer
from poolbroker.broker.drive.upstream import UpstreamConn

DriveHolder: TypeAlias = Holder[PoolState, UpstreamConn, Timer]
DriveWaiter: TypeAlias = Waiter[PoolState, UpstreamConn, Timer]
DriveLease: TypeAlias = Lease[PoolState, UpstreamConn, Timer]
DriveExchange: TypeAlias = Exchange[PoolState, UpstreamConn, Timer]
DriveLeaseTable: TypeAlias = LeaseTable[PoolState, UpstreamConn, Timer]
