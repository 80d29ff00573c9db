"""One client in two flavours: every public call of Client and Lease has its asyncio twin in
AsyncClient and AsyncLease (awaited where it waits on the broker), except the few listed here,
each with its reason. A call added to one side alone fails this test until it is listed."""

from __future__ import annotations

import inspect

import pytest

from poolbroker.client._aio import AsyncClient, AsyncLease
from poolbroker.client._client import Client
from poolbroker.client._lease import Lease

# Sync-only calls, and why (docs/guides/asyncio.md says the same).
SYNC_ONLY = {
    (Client, "own_channel"): "a broker socket for one thread to hand to another: asyncio's tasks share their loop's",
    (Client, "own_thread"): "the calling thread's broker socket: asyncio's is its event loop's",
    (Client, "close"): "asyncio's is aclose(), awaited",
    (Lease, "close"): "asyncio's is aclose(), awaited",
    (Lease, "makefile"): "a file object's reads block: asyncio code reads the lease itself",
}
ASYNC_ONLY = {
    (AsyncClient, "aclose"): "Client.close(), awaited",
    (AsyncLease, "aclose"): "Lease.close(), awaited",
}
SYNC_ONLY_ARGUMENTS = {
    (Client, "lease", "channel"): "a broker socket of own_channel()'s: asyncio's tasks share their loop's",
}
# Calls that never wait on the broker, and so are plain calls on both sides.
NEVER_WAIT = {"lease", "sendall", "send", "settimeout", "gettimeout", "discard"}


def public(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


@pytest.mark.parametrize(("sync", "flavour"), [(Client, AsyncClient), (Lease, AsyncLease)])
def test_every_call_has_its_twin_or_a_reason(sync: type, flavour: type) -> None:
    missing = {name for name in public(sync) - public(flavour) if (sync, name) not in SYNC_ONLY}
    extra = {name for name in public(flavour) - public(sync) if (flavour, name) not in ASYNC_ONLY}
    assert not missing, f"{flavour.__name__} lacks {sorted(missing)}: add them, or list them in SYNC_ONLY"
    assert not extra, f"{flavour.__name__} alone has {sorted(extra)}: add them to {sync.__name__}, or list them"
    stale = {name for cls, name in SYNC_ONLY if cls is sync and name in public(flavour)}
    assert not stale, f"listed as sync-only, yet {flavour.__name__} has {sorted(stale)}"


@pytest.mark.parametrize(("sync", "flavour"), [(Client, AsyncClient), (Lease, AsyncLease)])
def test_twins_take_the_same_arguments_and_the_async_ones_are_awaited(sync: type, flavour: type) -> None:
    for name in sorted(public(sync) & public(flavour)):
        ours, theirs = getattr(sync, name), getattr(flavour, name)
        if not callable(ours) or isinstance(ours, property):
            continue
        only_ours = [a for a in inspect.signature(ours).parameters if (sync, name, a) not in SYNC_ONLY_ARGUMENTS]
        assert only_ours == list(inspect.signature(theirs).parameters), name
        waits = name not in NEVER_WAIT
        assert inspect.iscoroutinefunction(theirs) == waits, f"{flavour.__name__}.{name}: awaited is {waits}"
