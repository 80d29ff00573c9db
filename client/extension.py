"""The extension API: what an adapter (poolbroker's own, or one of yours) builds on besides the
public Client, AsyncClient, Lease and errors of `poolbroker.client`. Everything else in
`poolbroker.client` is private (its modules start with `_`) and may change without notice.

- `LeasedSocket`: a socket for a library that keeps its connections open (redis-py, requests,
  pymemcache): each conversation on it runs on a lease of its own, taken when the library writes
  and given back when the broker sees the conversation over.
- `AsyncConversations`: the same for asyncio libraries (redis.asyncio, httpx).
- `LentSocket`: LeasedSocket's twin over socket leases (the upstream socket itself, same host):
  each conversation takes the socket on its first bytes and gives it back with the verdict of a
  `poolbroker.sessions` tracker over its bytes; `AsyncLentConversations`, the same for asyncio.
- `described`, `described_async`: what the broker's pools speak, asked once per process and client;
  `require`: refuse a pool of the wrong kind at once (PoolMismatch names the setting); `lends`:
  whether an adapter's connections should run on socket leases (the pool lends, the client is on
  the broker's host).
- `Channel`: one broker socket (`Client.own_channel()`), for a connection that one thread drives
  and another may hand on; `Client.lease(..., channel=)` and `LeasedSocket(channel=)` take it.
- `DEFAULT_RECV`: the read size a lease's `recv` takes by default; `FIRST_POLL`: how soon a lazy
  lease's first blocking read comes back with its token (what `Client.cancel` needs).
"""

from poolbroker.client._channel import Channel
from poolbroker.client._exchanges import DEFAULT_RECV
from poolbroker.client._lease import FIRST_POLL
from poolbroker.client._leased_socket import AsyncConversations, LeasedSocket
from poolbroker.client._lent_socket import AsyncLentConversations, LentSocket
from poolbroker.client._pool_protocols import described, described_async, lends, require

__all__ = [
    "DEFAULT_RECV",
    "FIRST_POLL",
    "AsyncConversations",
    "AsyncLentConversations",
    "Channel",
    "LeasedSocket",
    "LentSocket",
    "described",
    "described_async",
    "lends",
    "require",
]
