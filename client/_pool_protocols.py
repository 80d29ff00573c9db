"""What a broker's pools speak, asked once per process: adapters check it before their first lease,
so a pool set up for another protocol fails at once, naming the setting, not after a pool timeout."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from poolbroker.client._errors import PoolMismatch
from poolbroker.wire.endpoint import lending_path

if TYPE_CHECKING:
    from poolbroker.client._aio import AsyncClient
    from poolbroker.client._client import Client

# (endpoint, pool) -> the broker's description of the pool (ping's "protocols"), or None for a
# pool the broker does not have (its leases say so). Kept for the process's life: a pool's
# protocol is set when the broker starts.
_described: dict[tuple[str, str], dict[str, Any] | None] = {}


def described(broker: Client, pool: str) -> dict[str, Any] | None:
    """The broker's description of `pool` (protocol, protects...), asked at most once per process."""
    key = (broker.endpoint, pool)
    if key not in _described:
        _described[key] = broker.ping()["protocols"].get(pool)
    return _described[key]


async def described_async(broker: AsyncClient, pool: str) -> dict[str, Any] | None:
    """described(), for asyncio."""
    key = (broker.endpoint, pool)
    if key not in _described:
        _described[key] = (await broker.ping())["protocols"].get(pool)
    return _described[key]


def lends(broker: Client | AsyncClient, description: dict[str, Any] | None, lend: bool | None = None) -> bool:
    """Whether an adapter's connections to a pool described so run on socket leases: `lend` if
    given (True asks for them, and the lease says why not where they can't be), else wherever the
    pool lends and this client can take them (an ipc endpoint: the broker's host)."""
    if lend is not None:
        return lend
    return description is not None and bool(description.get("lends")) and lending_path(broker.endpoint) is not None


def require(description: dict[str, Any] | None, pool: str, protocol: str, adapter: str, why: str) -> None:
    """PoolMismatch unless the pool speaks `protocol` (an unknown pool is left to its lease)."""
    if description is None or description.get("protocol") == protocol:
        return
    raise PoolMismatch(
        f"pool {pool!r} speaks {description.get('protocol')}: {adapter} needs"
        f' protocol = "{protocol}" in the pool\'s settings ({why})'
    )
